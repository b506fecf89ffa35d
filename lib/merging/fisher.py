"""Fisher merging."""
from __future__ import annotations

from typing import Sequence

import torch

from ._common import (StateDict, _check_nonempty, _check_same_layout, _check_stats, _float_keys,
                      _normalized, _work, _work_dtype)
from .averaging import weight_average


# ---------------------------------------------------------------------- Fisher merging


@torch.no_grad()
def fisher_merging(
    state_dicts: Sequence[StateDict],
    fishers: Sequence[StateDict],
    weights: Sequence[float] | None = None,
    eps: float = 1e-10,
) -> dict[str, torch.Tensor]:
    """Fisher merging: θ = Σ wt Ft ⊙ θt / (Σ wt Ft + eps), per entry.

    Where the weighted Fisher sum is exactly 0 (no model has information about an entry)
    the entry is the plain weighted average instead of ~0/eps. Float tensors with no Fisher
    in any model are weighted-averaged; a key must have a Fisher in all models or in none.
    Weights are normalized to sum to 1 (uniform when None).
    """
    _check_nonempty(state_dicts, "state_dicts")
    _check_same_layout(state_dicts, [f"state_dicts[{i}]" for i in range(len(state_dicts))])
    if len(fishers) != len(state_dicts):
        raise ValueError(f"got {len(fishers)} Fisher dicts for {len(state_dicts)} models.")
    w = _normalized(weights, len(state_dicts))
    ref = state_dicts[0]
    for t, f in enumerate(fishers):
        _check_stats(f, ref, f"fishers[{t}]")
    out = weight_average(state_dicts, w)  # also the answer for keys without Fishers
    for k in _float_keys(ref):
        present = [k in f for f in fishers]
        if not any(present):
            continue
        if not all(present):
            raise ValueError(f"key {k!r} has a Fisher in models {[i for i, p in enumerate(present) if p]} "
                             "but not in the others; give every model a Fisher for it, or none.")
        dtype = _work_dtype(ref[k].dtype)
        num = torch.zeros(ref[k].shape, dtype=dtype, device=ref[k].device)
        den = torch.zeros_like(num)
        for wt, sd, f in zip(w, state_dicts, fishers):
            wf = f[k].to(dtype) * wt
            den.add_(wf)
            num.add_(wf.mul_(_work(sd[k])))
        merged = num.div_(den + eps)
        average = _work(out[k])
        out[k] = torch.where(den == 0, average, merged).to(ref[k].dtype)
    return out
