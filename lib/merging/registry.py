"""The merge methods the studies compare, each with its statistics and hyper-parameters.

Like mergekit's method registry: one ``MergeMethod`` entry per method, all called the same way,

    REGISTRY["ties"](pretrained, finetuned, stats, scale=0.4)  # -> merged state dict

where ``stats`` may hold "fisher" (one dict per task), "gram" and "gram_counts" (per task),
"hessian" (per task) and "hessian_pretrained" (one dict), and the keyword arguments override
the entry's ``fixed`` defaults and supply its ``tuned`` hyper-parameters (each has a
validation grid; picking from it is the caller's job, on validation data only). Every entry
also takes ``buffers`` (see ``lib.merging._common``). Adding a method is adding one entry.

The grid for every λ is METHODS.md §1's {0.0, 0.05, …, 1.0} (``LAMBDA_GRID``); the fixed
defaults are those of METHODS.md §1 and of each method's module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from ._common import StateDict, _check_numbers
from .averaging import slerp, weight_average
from .dare import dare
from .fisher import fisher_merging
from .gradient_matching import gradient_matching
from .regmean import regmean
from .task_arithmetic import task_arithmetic
from .ties import ties_merging

# METHODS.md §1: "λ picked on held-out validation data from {0.0, 0.05, …, 1.0}".
LAMBDA_GRID = tuple(round(0.05 * i, 2) for i in range(21))

# What ``needs`` may name. "gram" comes with "gram_counts" and "hessian" with
# "hessian_pretrained" in ``stats`` (where the method uses them).
STATISTICS = ("fisher", "gram", "hessian")


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: ``method(pretrained, finetuned, stats, **hyper) -> state dict``.

    ``merge(pretrained, finetuned, stats, **hyper)`` does the work; ``needs`` names the
    statistics it reads from ``stats``; ``tuned`` maps each hyper-parameter chosen on
    validation data to its grid (the caller must pass a value); ``fixed`` holds the other
    hyper-parameters' defaults (the caller may override them).
    """

    name: str
    label: str  # the row label in result tables
    merge: Callable[..., dict[str, torch.Tensor]]
    needs: tuple[str, ...] = ()
    tuned: dict[str, tuple] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    paper: str = ""
    section: str = "METHODS.md §1"

    def __post_init__(self):
        unknown = set(self.needs) - set(STATISTICS)
        if unknown:
            raise ValueError(f"{self.name}: unknown statistics {sorted(unknown)}; known: {STATISTICS}.")

    def with_defaults(self, hyper: dict) -> dict:
        """``hyper`` completed with the fixed defaults, after checking that it names only this
        method's hyper-parameters (and ``buffers``) and gives every tuned one."""
        unknown = sorted(set(hyper) - set(self.tuned) - set(self.fixed) - {"buffers"})
        if unknown:
            raise ValueError(f"{self.name} takes no hyper-parameter {unknown}; it takes "
                             f"{sorted(self.tuned) + sorted(self.fixed)} and buffers.")
        untuned = [h for h in self.tuned if h not in hyper]
        if untuned:
            raise ValueError(f"{self.name}: pass {untuned} (tuned on validation data over "
                             f"{ {h: self.tuned[h] for h in untuned} }).")
        return {**self.fixed, **hyper}

    def __call__(self, pretrained: StateDict, finetuned: Sequence[StateDict],
                 stats: Mapping[str, Any] | None = None, **hyper) -> dict[str, torch.Tensor]:
        stats = {} if stats is None else stats
        missing = [s for s in self.needs if s not in stats]
        if missing:
            raise ValueError(f"{self.name} needs the statistics {missing} in stats (it has {sorted(stats)}).")
        hyper = self.with_defaults(hyper)
        _check_numbers(self.name, **hyper)  # NaN would make every entry NaN; the merge checks the tensors
        return self.merge(pretrained, finetuned, stats, **hyper)


# ------------------------------------------------------------------- uniform adapters
# Each takes (pretrained, finetuned, stats, **hyper) and calls the merge with its own
# signature; methods without θ0 (averaging, Fisher, RegMean, SLERP) ignore ``pretrained``.


def _weight_average(pretrained, finetuned, stats, buffers=None):
    return weight_average(finetuned)  # averages every float key: buffers included


def _task_arithmetic(pretrained, finetuned, stats, scale, buffers=None):
    return task_arithmetic(pretrained, finetuned, scale, buffers=buffers)


def _ties(pretrained, finetuned, stats, scale, density, disjoint, buffers=None):
    return ties_merging(pretrained, finetuned, density, scale, disjoint, buffers=buffers)


def _dare_ta(pretrained, finetuned, stats, scale, drop_rate, seed, buffers=None):
    sparse = dare(pretrained, finetuned, drop_rate, seed, buffers=buffers)
    return task_arithmetic(pretrained, sparse, scale, buffers=buffers)


def _dare_ties(pretrained, finetuned, stats, scale, drop_rate, seed, density, disjoint, buffers=None):
    sparse = dare(pretrained, finetuned, drop_rate, seed, buffers=buffers)
    return ties_merging(pretrained, sparse, density, scale, disjoint, buffers=buffers)


def _fisher(pretrained, finetuned, stats, eps, buffers=None):
    return fisher_merging(finetuned, stats["fisher"], eps=eps, buffers=buffers)


def _regmean(pretrained, finetuned, stats, alpha, gram_normalization, ridge, buffers=None):
    return regmean(finetuned, stats["gram"], alpha, counts=stats.get("gram_counts"),
                   gram_normalization=gram_normalization, ridge=ridge, buffers=buffers)


def _gradient_matching(pretrained, finetuned, stats, scale, delta, buffers=None):
    # H0 comes with the task Hessians ("hessian" in needs implies it).
    if "hessian_pretrained" not in stats:
        raise ValueError('gradient_matching needs stats["hessian_pretrained"] (H0) with stats["hessian"].')
    return gradient_matching(pretrained, finetuned, stats["hessian"], stats["hessian_pretrained"],
                             scale=scale, delta=delta, buffers=buffers)


def _slerp(pretrained, finetuned, stats, t, buffers=None):
    if len(finetuned) != 2:
        raise ValueError(f"slerp merges exactly 2 models, got {len(finetuned)}.")
    return slerp(finetuned[0], finetuned[1], t, buffers=buffers)


_DARE = {"drop_rate": 0.7, "seed": 0}
_TIES = {"density": 0.2, "disjoint": "mean"}

REGISTRY: dict[str, MergeMethod] = {m.name: m for m in [
    MergeMethod("weight_average", "Weight averaging", _weight_average,
                paper="Wortsman et al. 2022, Model soups (ICML)"),
    MergeMethod("task_arithmetic", "Task Arithmetic", _task_arithmetic, tuned={"scale": LAMBDA_GRID},
                paper="Ilharco et al. 2023, Editing Models with Task Arithmetic (ICLR)"),
    MergeMethod("ties", "TIES", _ties, tuned={"scale": LAMBDA_GRID}, fixed=dict(_TIES),
                paper="Yadav et al. 2023, TIES-Merging (NeurIPS)"),
    MergeMethod("dare_ta", "DARE + TA", _dare_ta, tuned={"scale": LAMBDA_GRID}, fixed=dict(_DARE),
                paper="Yu et al. 2024, Language Models are Super Mario (ICML)"),
    MergeMethod("dare_ties", "DARE + TIES", _dare_ties, tuned={"scale": LAMBDA_GRID},
                fixed={**_DARE, **_TIES}, paper="Yu et al. 2024, Language Models are Super Mario (ICML)"),
    MergeMethod("fisher", "Fisher", _fisher, needs=("fisher",), fixed={"eps": 1e-10},
                paper="Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging (NeurIPS)"),
    MergeMethod("regmean", "RegMean", _regmean, needs=("gram",),
                fixed={"alpha": 0.9, "gram_normalization": "mean", "ridge": 0.0},
                paper="Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models (ICLR)"),
    MergeMethod("gradient_matching", "Gradient matching", _gradient_matching, needs=("hessian",),
                fixed={"scale": 1.0, "delta": 1e-12},
                paper="Daheim et al. 2024, Model Merging by Uncertainty-Based Gradient Matching (ICLR)"),
    MergeMethod("slerp", "SLERP", _slerp, fixed={"t": 0.5},
                paper="Shoemake 1985 (SIGGRAPH); FS-Merge's baseline, Kinderman et al. 2024"),
]}
