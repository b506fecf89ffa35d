"""Task vectors and Task Arithmetic (METHODS.md §1).

θ = θ0 + λ Σt τt, with task vectors τt = θt − θ0 (Ilharco et al. 2023, "Editing Models with
Task Arithmetic", ICLR). λ (``scale``) is chosen on held-out validation data from
{0.0, 0.05, …, 1.0} (``lib.merging.LAMBDA_GRID``); AdaMerging's code fixes λ = 0.3. No default:
the caller always says which λ.

Deviations / conventions:

- Buffers (BatchNorm running statistics) are not task vectors: ``task_arithmetic`` returns
  their plain average over the fine-tuned models (never θ0 + λ Σ shifts, which at λ = 1 adds
  up every expert's shift of a running variance and can make it negative).
- A negative ``scale`` is allowed: θ0 − λτ is Ilharco et al.'s task negation (forgetting).
- ``TaskVector.apply_to`` refuses a τ with keys that θ0 lacks (they would be dropped, and θ0
  returned unchanged where every key is missing); keys of θ0 without a τ entry are copied.
- ``task_vectors`` and ``TaskVector`` are plain arithmetic on whatever keys they are given:
  buffer keys ARE in their τ's. Callers that learn coefficients over τ's (AdaMerging) should
  leave the buffers out of the τ's and average them apart (``buffer_keys``,
  ``averaged_buffers``).
"""
from __future__ import annotations

from typing import Collection, Mapping, Sequence

import torch

from ._common import (StateDict, _check_finite, _check_models, _check_numbers, _float_keys, _in_order,
                      _passthrough, _without, _work, averaged_buffers, buffer_keys)


# ------------------------------------------------------------------ task vectors, TA


@torch.no_grad()
def task_vectors(pretrained: StateDict, finetuned: Sequence[StateDict]) -> list[dict[str, torch.Tensor]]:
    """τt = θt − θ0 for every floating tensor (non-floating keys are left out).

    Buffers (running mean / variance) are float tensors, so they are in the τ's too; leave
    them out of the state dicts given if the τ's are to be scaled or learned (AdaMerging).
    """
    _check_models(pretrained, finetuned)
    return [
        {k: (_work(ft[k]) - _work(pretrained[k])).to(ft[k].dtype) for k in _float_keys(pretrained)}
        for ft in finetuned
    ]


class TaskVector:
    """A task vector τ with the arithmetic of Ilharco et al.'s ``task_vectors`` code.

    ``TaskVector(pretrained, finetuned)`` or ``TaskVector(vector=...)``; supports ``τ1 + τ2``,
    ``τ1 - τ2``, ``-τ``, ``c * τ`` and ``sum([...])``; ``τ.apply_to(θ0, scale)`` = θ0 + scale·τ.
    Buffers get no special treatment here (they are in τ, as in ``task_vectors``).
    """

    def __init__(self, pretrained: StateDict | None = None, finetuned: StateDict | None = None,
                 vector: Mapping[str, torch.Tensor] | None = None):
        if vector is not None:
            self.vector = dict(vector)
        elif pretrained is not None and finetuned is not None:
            self.vector = task_vectors(pretrained, [finetuned])[0]
        else:
            raise ValueError("pass either vector=..., or both pretrained and finetuned.")

    def _combine(self, other: "TaskVector", sign: float) -> "TaskVector":
        if set(other.vector) != set(self.vector):
            diff = sorted(set(other.vector) ^ set(self.vector))
            raise ValueError(f"task vectors have different keys: {diff[:5]}")
        return TaskVector(vector={k: v + sign * other.vector[k] for k, v in self.vector.items()})

    def __add__(self, other):
        if isinstance(other, (int, float)) and other == 0:  # lets sum() start from 0
            return self
        return self._combine(other, 1.0)

    __radd__ = __add__

    def __sub__(self, other):
        return self._combine(other, -1.0)

    def __neg__(self):
        return TaskVector(vector={k: -v for k, v in self.vector.items()})

    def __mul__(self, scalar: float):
        return TaskVector(vector={k: v * scalar for k, v in self.vector.items()})

    __rmul__ = __mul__

    @torch.no_grad()
    def apply_to(self, pretrained: StateDict, scale: float = 1.0) -> dict[str, torch.Tensor]:
        """θ0 + scale·τ; keys of θ0 without a task vector entry are copied unchanged. Every key of
        τ must be in θ0, and both must be finite."""
        unknown = [k for k in self.vector if k not in pretrained]
        if unknown:
            raise ValueError(
                f"the task vector has {len(unknown)} key(s) that the pretrained state dict lacks: "
                f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''} (its keys look like {list(pretrained)[:3]}). "
                "Make τ from state dicts with the same keys as θ0 (e.g. strip or add a 'module.' prefix).")
        _check_numbers("TaskVector.apply_to", scale=scale)
        _check_finite(pretrained, "pretrained")
        _check_finite(self.vector, "task vector")
        out = {}
        for k, v in pretrained.items():
            if k in self.vector:
                if self.vector[k].shape != v.shape:
                    raise ValueError(f"key {k!r}: task vector shape {tuple(self.vector[k].shape)} "
                                     f"but pretrained shape {tuple(v.shape)}.")
                out[k] = (_work(v) + scale * _work(self.vector[k])).to(v.dtype)
            else:
                out[k] = v.clone()
        return out


@torch.no_grad()
def task_arithmetic(pretrained: StateDict, finetuned: Sequence[StateDict], scale: float, *,
                    buffers: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """Task Arithmetic: θ = θ0 + scale·Σt τt.

    Buffers (``buffers``, or by default the keys ending in running_mean / running_var) get
    the plain average over the fine-tuned models instead. A negative scale negates the task
    vectors (task negation).
    """
    _check_numbers("task_arithmetic", scale=scale)
    _check_models(pretrained, finetuned)
    out = _passthrough(pretrained)
    buffer_names = buffer_keys(pretrained, buffers)
    out.update(averaged_buffers(finetuned, buffer_names))
    for k in _without(_float_keys(pretrained), buffer_names):
        theta0 = _work(pretrained[k])
        tau_sum = _work(finetuned[0][k]) - theta0
        for ft in finetuned[1:]:
            tau_sum.add_(_work(ft[k])).sub_(theta0)
        out[k] = tau_sum.mul_(scale).add_(theta0).to(pretrained[k].dtype)
    return _in_order(out, pretrained)
