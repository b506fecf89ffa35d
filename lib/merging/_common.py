"""Conventions and checks shared by every merge in ``lib.merging`` (METHODS.md, section 1).

Every function here is pure: it takes state dicts (``dict[str, torch.Tensor]``) and
returns new ones, never modifying its inputs and doing no I/O. Conventions shared by all:

- Every floating-point tensor given is merged; the caller chooses the keys (for example,
  drops the task heads from every dict before calling). Non-floating tensors (BatchNorm's
  ``num_batches_tracked`` and the like) are copied unchanged from the first or pretrained
  model.
- Buffers (BatchNorm's running mean and variance) are not task vectors (METHODS.md §1,
  "Buffers"). Every merge takes them out of its own rule and returns their average over the
  models merged: uniform, or with the method's model weights where it has them
  (``weight_average``'s and ``fisher_merging``'s ``weights``, SLERP's ``(1 − t, t)``). They
  are never trimmed, sign-elected, dropped or rescaled. Which keys are buffers: the
  ``buffers`` keyword where a merge takes one, else every float key ending in
  ``running_mean`` or ``running_var`` (``BUFFER_SUFFIXES``).
- All models must have the same keys, and per key the same shape and dtype; otherwise a
  ``ValueError`` names the key and the models.
- Nothing non-finite goes in: a NaN or ±Inf entry in any model or statistic (Fisher, Gram,
  Hessian), or a NaN/infinite hyper-parameter, is a ``ValueError`` naming the model, the key
  and the count. One NaN would otherwise turn a whole merge into NaN (SLERP's norms, every
  weighted sum) or be silently replaced by θ0 (TIES's trim drops it). One sum per tensor
  (``_all_finite``; an exact ``isfinite`` pass only where the sum is not finite).
- Arithmetic runs in the input dtype, except that float16/bfloat16 inputs are computed
  (and accumulated) in float32; results are returned in the input dtype.

Notation follows METHODS.md: θ0 pretrained, θt fine-tuned on task t, τt = θt − θ0.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Collection, Iterable, Iterator, Mapping, Sequence

import torch

StateDict = Mapping[str, torch.Tensor]

# ----------------------------------------------------------------------------- helpers


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute in: float32 for half precisions, else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _work(x: torch.Tensor) -> torch.Tensor:
    """``x`` in its working dtype. May return ``x`` itself: never modify the result in place."""
    return x.to(_work_dtype(x.dtype))


def in_step(*iterables: Iterable) -> Iterator[tuple]:
    """(t, a_t, b_t, ...) for t = 0, 1, ...: like ``enumerate(zip(a, b))``, except that it
    keeps no reference to the items it has yielded. ``zip`` and ``enumerate`` reuse their
    result tuple, so they hold the previous tensor while the next is being read; with this
    (and a ``del`` at the end of the loop body) one expert's tensor is held at a time."""
    iterators = [iter(i) for i in iterables]
    t = 0
    while True:
        try:
            yield (t, *[next(it) for it in iterators])
        except StopIteration:
            return
        t += 1


def _float_keys(sd: StateDict) -> list[str]:
    return [k for k, v in sd.items() if torch.is_floating_point(v)]


def _check_nonempty(models: Sequence, what: str) -> None:
    if len(models) == 0:
        raise ValueError(f"{what} is empty: pass at least one state dict.")


def _check_same_layout(models: Sequence[StateDict], labels: Sequence[str]) -> None:
    """Raise ValueError unless all models share keys, and per key shape and dtype."""
    ref, ref_label = models[0], labels[0]
    for sd, label in zip(models[1:], labels[1:]):
        missing = [k for k in ref if k not in sd]
        extra = [k for k in sd if k not in ref]
        if missing or extra:
            raise ValueError(
                f"{label} and {ref_label} have different keys (missing from {label}: "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''}; only in {label}: "
                f"{extra[:5]}{' ...' if len(extra) > 5 else ''}). Pass state dicts of the same "
                "architecture restricted to the same keys (e.g. drop the heads from all of them)."
            )
        for k, v in ref.items():
            if sd[k].shape != v.shape:
                raise ValueError(
                    f"key {k!r} has shape {tuple(sd[k].shape)} in {label} but {tuple(v.shape)} "
                    f"in {ref_label}. Only models of the same architecture can be merged."
                )
            if sd[k].dtype != v.dtype:
                raise ValueError(
                    f"key {k!r} has dtype {sd[k].dtype} in {label} but {v.dtype} in {ref_label}. "
                    "Cast all models to one dtype before merging."
                )


def _nonfinite(x: torch.Tensor) -> str:
    """How many NaN and ±Inf entries ``x`` has, in words."""
    nan, inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
    parts = [f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else ""]
    return f"{' and '.join(p for p in parts if p)} entries (of {x.numel():,})"


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every entry of the float tensor ``x`` is finite.

    A NaN or ±Inf entry makes the sum NaN or ±Inf, so a finite sum proves every entry finite;
    only a non-finite sum (a NaN or Inf, or an overflow of finite entries) needs the exact
    ``isfinite`` pass. The sum is the cheapest reduction torch has (on CPU ``isfinite(x).all()``
    builds a bool tensor and costs tens of times more), and merges run this on every input.
    """
    return math.isfinite(x.sum().item()) or bool(torch.isfinite(x).all())


def _check_finite(sd: StateDict, label: str) -> None:
    """Raise ValueError naming the first float tensor of ``sd`` that holds NaN or ±Inf."""
    for k, v in sd.items():
        if torch.is_floating_point(v) and not _all_finite(v):
            raise ValueError(
                f"{label}[{k!r}] has {_nonfinite(v)}; a merge would spread them or silently drop them. "
                "Check where it came from (a diverged fine-tuning run, a damaged file, a statistic of bad "
                "data), recompute it, or leave that model out of the merge.")


def _check_numbers(where: str, **values) -> None:
    """Raise ValueError for a hyper-parameter that is NaN or infinite (a number, a 0-d tensor, or a
    sequence of them such as ``weights``); None and non-numbers (strings, flags) are left alone."""
    for name, value in values.items():
        several = isinstance(value, (list, tuple)) or (torch.is_tensor(value) and value.dim() == 1)
        items = value if several else [value]
        for v in items:
            if torch.is_tensor(v) and v.numel() == 1:
                v = float(v)
            if isinstance(v, Real) and not isinstance(v, bool) and not math.isfinite(v):
                raise ValueError(f"{where}: {name} = {value} is not finite (NaN or Inf); pass a finite value "
                                 f"for {name} (e.g. one of its validation grid).")


def _check_state_dicts(models: Sequence[StateDict], labels: Sequence[str]) -> None:
    """The models to merge: one layout (keys, shapes, dtypes) and finite entries."""
    _check_same_layout(models, labels)
    for sd, label in zip(models, labels):
        _check_finite(sd, label)


def _check_models(pretrained: StateDict | None, finetuned: Sequence[StateDict]) -> None:
    _check_nonempty(finetuned, "finetuned")
    models = ([pretrained] if pretrained is not None else []) + list(finetuned)
    labels = (["pretrained"] if pretrained is not None else []) + [
        f"finetuned[{i}]" for i in range(len(finetuned))
    ]
    _check_state_dicts(models, labels)


def _check_stats(stats: StateDict, params: StateDict, label: str, shape_of=None) -> None:
    """Statistics (Fishers, Grams, Hessians) must name known float tensors, with the right shape,
    and hold finite values."""
    _check_finite(stats, label)
    for k, v in stats.items():
        if k not in params:
            raise ValueError(f"{label} has key {k!r}, which is not among the parameters merged.")
        want = shape_of(params[k]) if shape_of else tuple(params[k].shape)
        if tuple(v.shape) != want:
            raise ValueError(
                f"{label}[{k!r}] has shape {tuple(v.shape)}, expected {want} for parameter "
                f"of shape {tuple(params[k].shape)}."
            )


def _normalized(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} weights for {n} models; pass one weight per model.")
    total = sum(weights)
    if total == 0:
        raise ValueError("weights sum to 0; pass weights with a non-zero sum.")
    return [w / total for w in weights]


def _passthrough(sd: StateDict) -> dict[str, torch.Tensor]:
    """The non-floating tensors of ``sd``, copied (so outputs never alias inputs)."""
    return {k: v.clone() for k, v in sd.items() if not torch.is_floating_point(v)}


def _in_order(result: dict, ref: StateDict) -> dict:
    """``result`` with its keys in the order of ``ref`` (as ``load_state_dict`` users expect)."""
    return {k: result[k] for k in ref}


# ----------------------------------------------------------------------------- buffers
# BatchNorm running statistics are not task vectors (METHODS.md §1, "Buffers"): every merge
# averages them over the models it merges (or the caller re-estimates them on data), and
# never trims, sign-elects or rescales them. Task Arithmetic at λ = 1 would otherwise add
# every expert's shift of a running variance, which can drive it negative.
BUFFER_SUFFIXES = ("running_mean", "running_var")


def buffer_keys(sd: StateDict, buffers: Collection[str] | None = None) -> list[str]:
    """The float keys of ``sd`` merged as buffers, in ``sd``'s order: those named in
    ``buffers`` if given, else every key whose last name ends in ``BUFFER_SUFFIXES``
    (BatchNorm's running mean and variance). Non-floating keys named in ``buffers`` are left
    out: they are copied unchanged like every non-floating tensor."""
    if buffers is not None:
        unknown = [k for k in buffers if k not in sd]
        if unknown:
            raise ValueError(f"buffers names keys that are not in the state dict: {unknown[:5]}")
        chosen = set(buffers)
        return [k for k in _float_keys(sd) if k in chosen]
    return [k for k in _float_keys(sd) if k.rsplit(".", 1)[-1] in BUFFER_SUFFIXES]


def averaged_buffers(finetuned: Sequence[StateDict], keys: Sequence[str],
                     weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """The average over the models of each buffer key: plain, or with ``weights``
    (normalized to sum to 1) when the method weights its models."""
    w = _normalized(weights, len(finetuned))
    out = {}
    for k in keys:
        acc = _work(finetuned[0][k]) * w[0]  # out of place: a fresh tensor to accumulate in
        for wt, sd in zip(w[1:], finetuned[1:]):
            acc.add_(_work(sd[k]), alpha=wt)
        out[k] = acc.to(finetuned[0][k].dtype)
    return out


def _without(keys: Sequence[str], drop: Sequence[str]) -> list[str]:
    """``keys`` minus ``drop``, order kept."""
    dropped = set(drop)
    return [k for k in keys if k not in dropped]


def _has_statistic(key: str, stats: Sequence[StateDict], what: str) -> bool:
    """Whether every model has a ``what`` (Fisher, Gram) for ``key``: True for all, False for none;
    a key that only some models describe is an error, since the merge could not weigh them alike."""
    present = [key in s for s in stats]
    if not any(present):
        return False
    if not all(present):
        raise ValueError(f"key {key!r} has a {what} in models {[i for i, p in enumerate(present) if p]} "
                         f"but not in the others; give every model a {what} for it, or none.")
    return True
