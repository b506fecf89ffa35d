"""Fisher merging (METHODS.md §1).

Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging" (NeurIPS).
θ = Σt wt Ft ⊙ θt / Σt wt Ft per entry, with Ft the diagonal Fisher of model t
(``lib.statistics.diagonal_fisher``: mean squared gradient of log p(ŷ|x), ŷ sampled from the
model) and model weights wt (uniform by default, normalized to sum to 1). Default floor
eps = 1e-10, relative (below).

Deviations / conventions:

- The denominator's floor is RELATIVE to the Fishers' scale: per tensor, with
  den = Σt wt Ft, θ = Σt wt Ft θt / (den + eps·mean(den)). An absolute floor (den + 1e-10)
  pulls entries toward 0 wherever Fishers are tiny (they can be ~1e-10 for a well-fit model),
  and the merge should not change when every Fisher is multiplied by the same constant; with
  the relative floor it does not (up to rounding).
- Where den is exactly 0 (no model has information about an entry) the entry is the plain
  weighted average instead of ~0/eps.
- FusionBench adds 1e-6 to every Fisher and by default divides each model's Fisher by its
  global L2 norm; neither is done here (the paper's rule).
- Float tensors with no Fisher in any model are weighted-averaged; a key must have a Fisher
  in all models or in none.
- Buffers (``buffers``, or by default the keys ending in running_mean / running_var) are
  averaged with the model weights, whatever Fishers are given for them.
- Model weights must be >= 0: a negative weight makes wt·Ft a negative precision, and the
  denominator can cross 0 (division by ~0), which is no weighted average.
"""
from __future__ import annotations

from typing import Collection, Sequence

import torch

from ._common import (_has_statistic, StateDict, _check_nonempty, _check_numbers, _check_state_dicts, _check_stats,
                      _float_keys, _normalized, _without, _work, _work_dtype, buffer_keys)
from .averaging import _average


# ---------------------------------------------------------------------- Fisher merging


@torch.no_grad()
def fisher_merging(
    state_dicts: Sequence[StateDict],
    fishers: Sequence[StateDict],
    weights: Sequence[float] | None = None,
    eps: float = 1e-10,
    *,
    buffers: Collection[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Fisher merging: θ = Σ wt Ft ⊙ θt / (den + eps·mean(den)), den = Σ wt Ft, per entry.

    ``eps`` is relative: the mean is over the entries of each tensor's den, so scaling every
    Fisher by one constant leaves the merge unchanged. Where den is exactly 0 (no model has
    information about an entry) the entry is the plain weighted average instead. Float
    tensors with no Fisher in any model, and buffers, are weighted-averaged; a key must have
    a Fisher in all models or in none. Weights are normalized to sum to 1 (uniform when None).
    """
    _check_nonempty(state_dicts, "state_dicts")
    _check_numbers("fisher_merging", weights=weights, eps=eps)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}.")
    if weights is not None and any(w < 0 for w in weights):
        raise ValueError(f"fisher_merging: weights {list(weights)} include a negative one; pass weights >= 0.")
    _check_state_dicts(state_dicts, [f"state_dicts[{i}]" for i in range(len(state_dicts))])
    if len(fishers) != len(state_dicts):
        raise ValueError(f"got {len(fishers)} Fisher dicts for {len(state_dicts)} models.")
    w = _normalized(weights, len(state_dicts))
    ref = state_dicts[0]
    for t, f in enumerate(fishers):
        _check_stats(f, ref, f"fishers[{t}]")
    out = _average(state_dicts, w)  # also the answer for buffers and keys without Fishers
    for k in _without(_float_keys(ref), buffer_keys(ref, buffers)):
        if not _has_statistic(k, fishers, "Fisher"):
            continue
        dtype = _work_dtype(ref[k].dtype)
        num = torch.zeros(ref[k].shape, dtype=dtype, device=ref[k].device)
        den = torch.zeros_like(num)
        for wt, sd, f in zip(w, state_dicts, fishers):
            wf = f[k].to(dtype) * wt
            den.add_(wf)
            num.add_(wf.mul_(_work(sd[k])))
        merged = num.div_(den + eps * den.mean())
        average = _work(out[k])
        out[k] = torch.where(den == 0, average, merged).to(ref[k].dtype)
    return out
