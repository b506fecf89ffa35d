"""TIES-Merging (METHODS.md §1).

Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS).
(1) Trim: keep each τt's top-k entries by |τt|, zero the rest (τ̂t); (2) elect a sign per
entry, s = sign(Σt τ̂t); (3) disjoint merge: per entry, the mean (paper) or sum (AdaMerging's
code) of the τ̂t whose sign equals s; θ = θ0 + λ·τ_merged.
Defaults: density k = 0.2, disjoint "mean", λ (``scale``) = 1 (the paper's value without
validation data; the studies tune it on ``LAMBDA_GRID``). AdaMerging's code uses "sum", λ = 0.3.

Deviations / conventions (public implementations disagree; METHODS.md §1):

- The top-k is GLOBAL per task: one ranking over all float entries given, jointly across
  tensors (the paper, the authors' code, FusionBench). MergeKit ranks per tensor.
- k = round(density·n) entries, at least one when density > 0; entries tied with the cut-off
  are all kept. FusionBench keeps int(density·n) + 1.
- Where Σt τ̂t is exactly 0 the elected sign is 0 and the entry gets 0 (θ0 there).
  FusionBench puts in the vector's majority sign, MergeKit elects + (it tests sum ≥ 0). The
  choice matters only where non-zero τ̂t cancel exactly (probability ~0 for real weights).
- The sign is elected from the sums of the τ̂t, not their means.
- A negative ``scale`` is allowed: TIES of the negated task vectors is the negated TIES vector
  (trimming ranks |τ|, and the elected signs flip with the τ's), so θ0 − |λ|·τ_merged is task
  negation done with TIES, as θ0 − λΣτ is with Task Arithmetic.
- Buffers (BatchNorm running statistics) are not task vectors: they are left out of the
  ranking (they do not use up any of the k entries) and get the plain average over the
  fine-tuned models, never trimmed or sign-elected. ``ties_trim_and_elect`` leaves them out
  of the τ's it returns: average them apart (``averaged_buffers``).
"""
from __future__ import annotations

from typing import Collection, Sequence

import torch

from ._common import (StateDict, _check_models, _check_numbers, _float_keys, _in_order, _passthrough,
                      _without, _work, _work_dtype, averaged_buffers, buffer_keys)


# -------------------------------------------------------------------------------- TIES


def _kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a 1-D tensor, consuming (reordering) ``values``.

    On CPU numpy's in-place introselect needs no extra memory; ``torch.kthvalue`` would
    clone the input and allocate an int64 index tensor (3 more copies' worth of float32).
    """
    pos = values.numel() - k  # 0-based position in ascending order
    if values.device.type == "cpu":
        array = values.numpy()
        array.partition(pos)
        return torch.tensor(array[pos].item(), dtype=values.dtype)
    return values.kthvalue(pos + 1).values


@torch.no_grad()
def _ties_thresholds(pretrained: StateDict, finetuned: Sequence[StateDict], density: float,
                     keys: Sequence[str]) -> list[float]:
    """Per task, the magnitude of its top-``density`` entry over ``keys`` jointly."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}.")
    n = sum(pretrained[k].numel() for k in keys)
    n_keep = round(density * n)
    if density > 0:
        n_keep = max(n_keep, 1)
    if n_keep >= n:
        return [0.0] * len(finetuned)  # |τ| >= 0 keeps every entry
    if n_keep == 0:
        return [float("inf")] * len(finetuned)  # |τ| >= inf keeps none (τ is finite)
    work = _work_dtype(pretrained[keys[0]].dtype) if keys else torch.float32
    # One flat buffer, reused across tasks: the only full-size copy this needs.
    buffer = torch.empty(n, dtype=work, device=pretrained[keys[0]].device)
    thresholds = []
    for ft in finetuned:
        offset = 0
        for k in keys:
            size = pretrained[k].numel()
            torch.sub(_work(ft[k]).reshape(-1), _work(pretrained[k]).reshape(-1),
                      out=buffer[offset:offset + size])
            offset += size
        buffer.abs_()
        thresholds.append(_kth_largest(buffer, n_keep).item())
    return thresholds


def _trimmed(pretrained: StateDict, ft: StateDict, key: str, threshold: float) -> torch.Tensor:
    """τ̂ for one tensor: τ where |τ| >= threshold, else 0 (working dtype, fresh tensor)."""
    tau = _work(ft[key]) - _work(pretrained[key])
    return tau.masked_fill_(tau.abs() < threshold, 0)


def _elected_sign(pretrained, finetuned, key, thresholds) -> torch.Tensor:
    """s = sign(Σt τ̂t) for one tensor."""
    total = _trimmed(pretrained, finetuned[0], key, thresholds[0])
    for ft, thr in zip(finetuned[1:], thresholds[1:]):
        total.add_(_trimmed(pretrained, ft, key, thr))
    return total.sign_()


@torch.no_grad()
def ties_trim_and_elect(
    pretrained: StateDict, finetuned: Sequence[StateDict], density: float = 0.2, *,
    buffers: Collection[str] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """TIES steps 1-2 per task: τt trimmed to its top-``density`` entries (ranked by |τt|
    over all float tensors jointly) and zeroed where its sign disagrees with the elected
    sign s = sign(Σt τ̂t). These are the task vectors AdaMerging++ combines.

    Returned in the input dtype; non-floating keys are left out, as in ``task_vectors``, and
    so are buffers (``buffers``, or by default the keys ending in running_mean / running_var):
    they take no part in the ranking, and the caller averages them apart.
    """
    _check_numbers("ties_trim_and_elect", density=density)
    _check_models(pretrained, finetuned)
    keys = _without(_float_keys(pretrained), buffer_keys(pretrained, buffers))
    thresholds = _ties_thresholds(pretrained, finetuned, density, keys)
    out = [{} for _ in finetuned]
    for k in keys:
        sign = _elected_sign(pretrained, finetuned, k, thresholds)
        for t, (ft, thr) in enumerate(zip(finetuned, thresholds)):
            tau = _trimmed(pretrained, ft, k, thr)
            out[t][k] = tau.masked_fill_(tau * sign <= 0, 0).to(pretrained[k].dtype)
    return out


@torch.no_grad()
def ties_merging(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    density: float = 0.2,
    scale: float = 1.0,
    disjoint: str = "mean",
    *,
    buffers: Collection[str] | None = None,
) -> dict[str, torch.Tensor]:
    """TIES-Merging: θ = θ0 + scale·τ_merged (trim, elect sign, disjoint merge).

    Trim keeps, per task, the round(density·n) entries of largest |τt| among all n float
    entries given, ranked jointly across tensors (at least one when density > 0; entries
    tied with the cut-off are all kept). The ranking holds one flat |τt| buffer at a time.
    ``disjoint="mean"`` (the paper) averages, per entry, the trimmed τt whose sign equals the
    elected sign; ``"sum"`` (AdaMerging's code) adds them. Entries where no task agrees are 0.
    Where Σt τ̂t is exactly 0 the elected sign is 0 and the entry gets 0 (the reference code
    breaks such ties by the majority sign; for real weights this has probability ~0).
    Buffers (``buffers``, or by default the keys ending in running_mean / running_var) are
    left out of the ranking and get the plain average over the fine-tuned models.
    """
    if disjoint not in ("mean", "sum"):
        raise ValueError(f'disjoint must be "mean" or "sum", got {disjoint!r}.')
    _check_numbers("ties_merging", density=density, scale=scale)
    _check_models(pretrained, finetuned)
    buffer_names = buffer_keys(pretrained, buffers)
    keys = _without(_float_keys(pretrained), buffer_names)
    thresholds = _ties_thresholds(pretrained, finetuned, density, keys)
    out = _passthrough(pretrained)
    out.update(averaged_buffers(finetuned, buffer_names))
    for k in keys:
        # One pass over the tasks, keeping the sums (and counts) of the positive and of the
        # negative τ̂t entries: the elected sign is that of their total, and the agreeing
        # entries are exactly the positive (or negative) ones. Memory stays a few copies of
        # one tensor rather than T copies.
        theta0 = _work(pretrained[k])
        pos_sum, neg_sum = torch.zeros_like(theta0), torch.zeros_like(theta0)
        if disjoint == "mean":
            pos_count, neg_count = torch.zeros_like(theta0), torch.zeros_like(theta0)
        for ft, thr in zip(finetuned, thresholds):
            tau = _trimmed(pretrained, ft, k, thr)
            pos_sum.add_(tau.clamp(min=0))
            neg_sum.add_(tau.clamp(max=0))
            if disjoint == "mean":
                pos_count.add_(tau > 0)
                neg_count.add_(tau < 0)
        sign = (pos_sum + neg_sum).sign_()  # the elected sign, from the sums (not the means)
        if disjoint == "mean":
            pos_sum.div_(pos_count.clamp_(min=1))
            neg_sum.div_(neg_count.clamp_(min=1))
            del pos_count, neg_count
        merged = torch.where(sign > 0, pos_sum, torch.where(sign < 0, neg_sum, 0.0))
        out[k] = merged.mul_(scale).add_(theta0).to(pretrained[k].dtype)
    return _in_order(out, pretrained)
