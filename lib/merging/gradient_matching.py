"""Uncertainty-based gradient matching."""
from __future__ import annotations

from typing import Sequence

import torch

from ._common import (StateDict, _check_models, _check_stats, _float_keys,
                      _in_order, _passthrough, _work, _work_dtype)
from .task_arithmetic import task_arithmetic


# ------------------------------------------------------------------- gradient matching


@torch.no_grad()
def gradient_matching(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    hessians: Sequence[StateDict],
    pretrained_hessian: StateDict,
    scale: float = 1.0,
    delta: float = 1e-12,
) -> dict[str, torch.Tensor]:
    """Uncertainty-based gradient matching (Daheim et al. 2024), diagonal form:
    θ = θ0 + α Σt (H0 + α Σs Hs + δ)⁻¹ ⊙ (H0 + Ht + δ) ⊙ τt, α = ``scale``.

    ``hessians[t][k]`` and ``pretrained_hessian[k]`` are diagonals (shaped like the
    parameter), e.g. Ht = Nt·F̂t. Float tensors with no Hessian anywhere get Task Arithmetic
    with the same α (the rule's limit when H0 dominates, i.e. no data information); a key
    with Hessians must have one for every task and for θ0.
    """
    _check_models(pretrained, finetuned)
    if len(hessians) != len(finetuned):
        raise ValueError(f"got {len(hessians)} Hessian dicts for {len(finetuned)} fine-tuned models.")
    _check_stats(pretrained_hessian, pretrained, "pretrained_hessian")
    for t, h in enumerate(hessians):
        _check_stats(h, pretrained, f"hessians[{t}]")
    out = _passthrough(pretrained)
    for k in _float_keys(pretrained):
        present = [k in h for h in hessians] + [k in pretrained_hessian]
        if not any(present):
            out[k] = task_arithmetic({k: pretrained[k]}, [{k: ft[k]} for ft in finetuned], scale)[k]
            continue
        if not all(present):
            raise ValueError(f"key {k!r} has Hessians for some models but not all (tasks, then "
                             f"pretrained: {present}); give it one everywhere, or nowhere.")
        dtype = _work_dtype(pretrained[k].dtype)
        theta0 = _work(pretrained[k])
        h0 = pretrained_hessian[k].to(dtype)
        denom = h0 + delta  # fresh tensor: H0 + α Σs Hs + δ
        for h in hessians:
            denom.add_(h[k].to(dtype), alpha=scale)
        update = torch.zeros_like(theta0)
        for ft, h in zip(finetuned, hessians):
            update.add_((h0 + h[k].to(dtype) + delta).mul_(_work(ft[k]) - theta0))
        out[k] = update.div_(denom).mul_(scale).add_(theta0).to(pretrained[k].dtype)
    return _in_order(out, pretrained)
