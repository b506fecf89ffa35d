"""Weight averaging and SLERP."""
from __future__ import annotations

from typing import Sequence

import torch

from ._common import (StateDict, _check_nonempty, _check_same_layout, _float_keys,
                      _in_order, _normalized, _passthrough, _work)


# SLERP falls back to linear interpolation when |cos(angle)| exceeds this (mergekit's value):
# sin(angle) is then too small to divide by safely, and the two paths agree anyway.
SLERP_COLINEAR_THRESHOLD = 0.9995


# ---------------------------------------------------------------------- weight averaging


@torch.no_grad()
def weight_average(
    state_dicts: Sequence[StateDict], weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """θ = Σ wt θt with the weights normalized to sum to 1 (uniform when None)."""
    _check_nonempty(state_dicts, "state_dicts")
    _check_same_layout(state_dicts, [f"state_dicts[{i}]" for i in range(len(state_dicts))])
    w = _normalized(weights, len(state_dicts))
    out = _passthrough(state_dicts[0])
    for k in _float_keys(state_dicts[0]):
        acc = _work(state_dicts[0][k]) * w[0]  # out of place: a fresh tensor to accumulate in
        for wt, sd in zip(w[1:], state_dicts[1:]):
            acc.add_(_work(sd[k]), alpha=wt)
        out[k] = acc.to(state_dicts[0][k].dtype)
    return _in_order(out, state_dicts[0])




# ------------------------------------------------------------------------------- SLERP


@torch.no_grad()
def slerp(state_dict_a: StateDict, state_dict_b: StateDict, t: float = 0.5, eps: float = 1e-8) -> dict[str, torch.Tensor]:
    """Spherical interpolation per tensor (flattened), as in mergekit:
    θ = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b, with Ω the angle between a and b.

    Falls back to linear interpolation (1−t)·a + t·b where |cos Ω| > 0.9995
    (``SLERP_COLINEAR_THRESHOLD``) or either tensor has norm below ``eps``.
    """
    _check_same_layout([state_dict_a, state_dict_b], ["state_dict_a", "state_dict_b"])
    out = _passthrough(state_dict_a)
    for k in _float_keys(state_dict_a):
        a, b = _work(state_dict_a[k]), _work(state_dict_b[k])
        norm_a, norm_b = a.norm(), b.norm()
        cos = (a.flatten() @ b.flatten()) / (norm_a * norm_b).clamp(min=eps)
        if min(norm_a, norm_b) < eps or cos.abs() > SLERP_COLINEAR_THRESHOLD:
            merged = torch.lerp(a, b, t)
        else:
            omega = torch.arccos(cos.clamp(-1.0, 1.0))
            sin_omega = torch.sin(omega)
            merged = (torch.sin((1 - t) * omega) / sin_omega) * a + (torch.sin(t * omega) / sin_omega) * b
        out[k] = merged.to(state_dict_a[k].dtype)
    return _in_order(out, state_dict_a)
