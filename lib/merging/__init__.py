"""Closed-form model merges over state dicts (METHODS.md, section 1), one family per file.

    from lib import merging
    merging.task_arithmetic(θ0, experts, scale=0.3)          # the plain functions, or
    merging.REGISTRY["ties"](θ0, experts, stats, scale=0.3)    # every method called one way

Every merge is a pure function: state dicts in, a new state dict out, inputs untouched, no I/O.
The conventions all of them share (key checks, dtypes, the buffer rule) are in ``_common.py``;
each family's file opens with its formula, paper, defaults and deviations.
"""
from __future__ import annotations

from typing import Callable

import torch

from ._common import BUFFER_SUFFIXES, averaged_buffers, buffer_keys
from .adamerging import (AdaMergingResult, adamerge, entropy, entropy_backward_per_batch, entropy_objective, learned_keys,
                         merged_state, ties_task_vectors, without_frozen)
from .averaging import SLERP_COLINEAR_THRESHOLD, slerp, weight_average
from .dare import dare
from .fisher import fisher_merging
from .gradient_matching import (DELTA, gradient_matching, gradient_mismatch, objective_gradient_norm, perturb_hessians,
                                relative_change, relative_damping, removal_amplification, remove_plain,
                                remove_uncertainty_weighted)
from .regmean import regmean
from .surgery import SurgeryResult, apply_surgery, frozen_features, init_adapter, train_surgery
from .registry import LAMBDA_GRID, REGISTRY, MergeMethod
from .task_arithmetic import TaskVector, task_arithmetic, task_vectors
from .ties import ties_merging, ties_trim_and_elect
from . import twin_merging  # Twin-Merging (METHODS.md §3): a module, used as merging.twin_merging.*

__all__ = [
    # learned merges (not in REGISTRY: they are not closed-form)
    "AdaMergingResult",
    "adamerge",
    "entropy",
    "entropy_backward_per_batch",
    "entropy_objective",
    "learned_keys",
    "merged_state",
    "ties_task_vectors",
    "without_frozen",
    "SurgeryResult",
    "apply_surgery",
    "frozen_features",
    "init_adapter",
    "train_surgery",
    "BUFFER_SUFFIXES",
    "LAMBDA_GRID",
    "MERGE_METHODS",
    "MergeMethod",
    "REGISTRY",
    "SLERP_COLINEAR_THRESHOLD",
    "TaskVector",
    "averaged_buffers",
    "buffer_keys",
    "dare",
    "fisher_merging",
    "DELTA",
    "gradient_matching",
    "gradient_mismatch",
    "objective_gradient_norm",
    "perturb_hessians",
    "relative_change",
    "relative_damping",
    "removal_amplification",
    "remove_plain",
    "remove_uncertainty_weighted",
    "regmean",
    "slerp",
    "task_arithmetic",
    "task_vectors",
    "ties_merging",
    "ties_trim_and_elect",
    "weight_average",
]

# ------------------------------------------------------------------------------ registry

# Name → merge function, kept for older callers; signatures differ (see each docstring).
# ``REGISTRY`` is the uniform interface. ``dare`` is not here: it returns sparsified models
# for another merge to use.
MERGE_METHODS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "weight_average": weight_average,
    "task_arithmetic": task_arithmetic,
    "ties": ties_merging,
    "fisher": fisher_merging,
    "regmean": regmean,
    "gradient_matching": gradient_matching,
    "slerp": slerp,
}
