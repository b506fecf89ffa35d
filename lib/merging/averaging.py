"""Weight averaging and SLERP (METHODS.md §1).

Weight averaging: θ = Σt wt θt with Σt wt = 1 (uniform by default): the "uniform soup" of
Wortsman et al. 2022, "Model soups" (ICML), and the baseline of every merging paper.

SLERP: spherical linear interpolation of two models, per tensor (flattened),
θ = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b, with Ω the angle between a and b
(Shoemake 1985, SIGGRAPH; used for model merging by mergekit; FS-Merge's baseline,
Kinderman et al. 2024). Default t = 0.5.

Deviations / conventions:

- SLERP falls back to linear interpolation where |cos Ω| > 0.9995 (mergekit's threshold,
  ``SLERP_COLINEAR_THRESHOLD``) or either tensor's norm is below ``eps``.
- SLERP's t must lie in [0, 1]: outside it the path leaves the arc between the two models
  (extrapolation, not a merge), and the buffers' weights (1 − t, t) turn negative, which can
  make a running variance negative.
- SLERP interpolates the raw weights, not task vectors (it has no θ0), as mergekit does.
- Buffers (BatchNorm running statistics): weight averaging treats them like any tensor,
  which is already the buffer rule; SLERP interpolates them linearly, (1 − t)·a + t·b, the
  average with SLERP's model weights, never along the sphere.
"""
from __future__ import annotations

from typing import Collection, Sequence

import torch

from ._common import (StateDict, _check_nonempty, _check_numbers, _check_state_dicts, _float_keys,
                      _in_order, _passthrough, _without, _work, averaged_buffers,
                      buffer_keys)


# SLERP falls back to linear interpolation when |cos(angle)| exceeds this (mergekit's value):
# sin(angle) is then too small to divide by safely, and the two paths agree anyway.
SLERP_COLINEAR_THRESHOLD = 0.9995


# ---------------------------------------------------------------------- weight averaging


@torch.no_grad()
def weight_average(
    state_dicts: Sequence[StateDict], weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """θ = Σ wt θt with the weights normalized to sum to 1 (uniform when None).

    Buffers are averaged like every other float tensor, which is the buffer rule itself.
    """
    _check_nonempty(state_dicts, "state_dicts")
    _check_numbers("weight_average", weights=weights)
    _check_state_dicts(state_dicts, [f"state_dicts[{i}]" for i in range(len(state_dicts))])
    return _average(state_dicts, weights)


def _average(state_dicts: Sequence[StateDict], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """``weight_average`` without its checks, for merges that have checked their inputs already
    (an ``isfinite`` pass over every model costs as much as the average itself)."""
    out = _passthrough(state_dicts[0])
    out.update(averaged_buffers(state_dicts, _float_keys(state_dicts[0]), weights))
    return _in_order(out, state_dicts[0])


# ------------------------------------------------------------------------------- SLERP


@torch.no_grad()
def slerp(state_dict_a: StateDict, state_dict_b: StateDict, t: float = 0.5, eps: float = 1e-8, *,
          buffers: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """Spherical interpolation per tensor (flattened), as in mergekit:
    θ = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b, with Ω the angle between a and b.

    Falls back to linear interpolation (1−t)·a + t·b where |cos Ω| > 0.9995
    (``SLERP_COLINEAR_THRESHOLD``) or either tensor has norm below ``eps``. Buffers (``buffers``,
    or by default the keys ending in running_mean / running_var) are interpolated linearly.
    ``t`` must be in [0, 1] (0 gives a, 1 gives b).
    """
    _check_numbers("slerp", t=t, eps=eps)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"slerp: t = {t} is outside [0, 1]; SLERP interpolates between the two models "
                         "(t = 0 gives the first, 1 the second). Pass t in [0, 1].")
    _check_state_dicts([state_dict_a, state_dict_b], ["state_dict_a", "state_dict_b"])
    out = _passthrough(state_dict_a)
    buffer_names = buffer_keys(state_dict_a, buffers)
    out.update(averaged_buffers([state_dict_a, state_dict_b], buffer_names, [1.0 - t, t]))
    for k in _without(_float_keys(state_dict_a), buffer_names):
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
