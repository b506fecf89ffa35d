"""RegMean (METHODS.md §1).

Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models" (ICLR).
For every linear weight W (out×in) with Gram matrices Gt = XtᵀXt of its inputs on task t,

    W*ᵀ = (Σt G̃t + εI)⁻¹ (Σt G̃t Wtᵀ + ε W̄ᵀ),   G̃t = (a·Gt + (1 − a)·diag(Gt)) / nt,

the least-squares fit to every task's outputs, with the off-diagonal Gram entries shrunk by
a (``alpha``). Other parameters (embeddings, LayerNorm, biases) are averaged.
Defaults: alpha = 0.9, gram_normalization = "mean" (nt = the Gram's row count), ridge = 0
(ε = 0: the paper).

Deviations / conventions:

- Gram normalisation: "mean" divides each task's Gram by its number of rows (tokens or
  examples), as the public implementations (fusion_bench, MergeLM) do, so every task weighs
  the same whatever its token count; it needs the counts (``lib.statistics.gram_matrices(...,
  return_counts=True)``). "sum" uses the Grams as given, which weights tasks by their token
  counts (the paper's formula read literally).
- ``ridge`` is relative: ε = ridge · mean(diag(Σt G̃t)) per layer, and the ridge pulls toward
  the plain average W̄. Input directions no task excites (dead ReLUs, unused features) make
  Σt G̃t singular; with ridge > 0 the weights reading them come out as the average instead.
  ridge = 0 is the paper's rule, and a singular Gram then raises a ValueError.
- The solve runs in float64 (Grams of activations are badly conditioned).
- Convolutions are the caller's job: a Conv2d weight (out, in, kh, kw) is the linear map
  ``W.flatten(1)`` over unfolded input patches, so pass it flattened to (out, in·kh·kw) with
  the patch Gram from ``gram_matrices`` and reshape the result back. Only 2-D weights may
  have Grams here.
- Buffers (``buffers``, or by default the keys ending in running_mean / running_var) get the
  plain average over the models, like every key without a Gram.
"""
from __future__ import annotations

from typing import Collection, Mapping, Sequence

import torch

from ._common import (_has_statistic, StateDict, _check_nonempty, _check_numbers, _check_state_dicts, _check_stats,
                      _float_keys, _without, buffer_keys)
from .averaging import _average

GRAM_NORMALIZATIONS = ("mean", "sum")


# ----------------------------------------------------------------------------- RegMean


@torch.no_grad()
def regmean(
    state_dicts: Sequence[StateDict],
    grams: Sequence[StateDict],
    alpha: float = 0.9,
    *,
    counts: Sequence[Mapping[str, int]] | None = None,
    gram_normalization: str = "mean",
    ridge: float = 0.0,
    buffers: Collection[str] | None = None,
) -> dict[str, torch.Tensor]:
    """RegMean: for each linear weight W (out×in) with input Gram matrices Gt (in×in),
    W*ᵀ = (Σt G̃t + εI)⁻¹ (Σt G̃t Wtᵀ + ε W̄ᵀ) with G̃ = (alpha·G + (1 − alpha)·diag(G)) / n.

    ``grams[t][name]`` is the Gram of the inputs to weight ``name`` in model t and
    ``counts[t][name]`` the number of rows summed into it. ``gram_normalization="mean"``
    divides each Gram by its count (n), ``"sum"`` uses it as given (n = 1, counts not
    needed). ``ridge`` ≥ 0 sets ε = ridge·mean(diag(Σt G̃t)), pulling directions no task
    excites to the plain average W̄. Float tensors without a Gram (embeddings, LayerNorm,
    biases) and buffers are averaged; a key must have a Gram in all models or in none.
    4-D conv weights must be flattened to (out, in·kh·kw) by the caller.
    """
    _check_nonempty(state_dicts, "state_dicts")
    _check_numbers("regmean", alpha=alpha, ridge=ridge)
    _check_state_dicts(state_dicts, [f"state_dicts[{i}]" for i in range(len(state_dicts))])
    if len(grams) != len(state_dicts):
        raise ValueError(f"got {len(grams)} Gram dicts for {len(state_dicts)} models.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}.")
    if gram_normalization not in GRAM_NORMALIZATIONS:
        raise ValueError(f'gram_normalization must be "mean" or "sum", got {gram_normalization!r}.')
    if gram_normalization == "mean":
        if counts is None:
            raise ValueError(
                'RegMean with gram_normalization="mean" divides each Gram by its number of rows: pass '
                "counts=... (from lib.statistics.gram_matrices(..., return_counts=True)), or "
                'gram_normalization="sum" to use the Grams as given.')
        if len(counts) != len(grams):
            raise ValueError(f"got {len(counts)} count dicts for {len(grams)} Gram dicts.")
    ref = state_dicts[0]
    for t, g in enumerate(grams):
        for k in g:
            if k in ref and ref[k].dim() != 2:
                raise ValueError(f"grams[{t}] has key {k!r}, but {k!r} is not a 2-D (out×in) weight "
                                 "(flatten conv weights to (out, in·kh·kw) first).")
        _check_stats(g, ref, f"grams[{t}]", shape_of=lambda w: (w.shape[1], w.shape[1]))
    out = _average(state_dicts)  # the answer for buffers and keys without Grams
    for k in _without(_float_keys(ref), buffer_keys(ref, buffers)):
        if not _has_statistic(k, grams, "Gram"):
            continue
        lhs = torch.zeros(ref[k].shape[1], ref[k].shape[1], dtype=torch.float64, device=ref[k].device)
        rhs = torch.zeros(ref[k].shape[1], ref[k].shape[0], dtype=torch.float64, device=ref[k].device)
        for t, (sd, g) in enumerate(zip(state_dicts, grams)):
            gram = g[k].to(torch.float64)
            shrunk = alpha * gram + (1.0 - alpha) * torch.diag(torch.diagonal(gram))
            if gram_normalization == "mean":
                shrunk /= _row_count(counts, t, k)
            lhs.add_(shrunk)
            rhs.add_(shrunk @ sd[k].to(torch.float64).T)
        average = sum(sd[k].to(torch.float64) for sd in state_dicts) / len(state_dicts) if ridge > 0 else None
        out[k] = ridge_solve(lhs, rhs, average, ridge, k).T.to(ref[k].dtype).contiguous()
    return out


def ridge_solve(lhs: torch.Tensor, rhs: torch.Tensor, average: torch.Tensor | None, ridge: float,
                key: str) -> torch.Tensor:
    """W*ᵀ = (Σt G̃t + εI)⁻¹ (Σt G̃t Wtᵀ + ε W̄ᵀ), ε = ridge · mean(diag Σt G̃t), from the summed
    ``lhs`` and ``rhs`` (float64, modified in place) and the experts' average W̄ (unused when
    ridge = 0). The one solve of ``regmean`` and of the streaming merge."""
    if ridge > 0:
        epsilon = ridge * lhs.diagonal().mean().item()
        lhs.diagonal().add_(epsilon)
        rhs.add_(average.T, alpha=epsilon)
    try:
        return torch.linalg.solve(lhs, rhs)
    except torch.linalg.LinAlgError as err:
        raise ValueError(
            f"RegMean: the summed Gram of {key!r} is singular ({err}). Pass ridge > 0 (e.g. 1e-6) so "
            "directions no task excites go to the average, use alpha < 1 or more examples per "
            "task, or leave this key out of grams so it is averaged."
        ) from None


def _row_count(counts: Sequence[Mapping[str, int]], task: int, key: str) -> int:
    if key not in counts[task]:
        raise ValueError(f"counts[{task}] has no entry for {key!r}; pass the counts that "
                         "gram_matrices(..., return_counts=True) returned with the Grams.")
    n = counts[task][key]
    if n <= 0:
        raise ValueError(f"counts[{task}][{key!r}] is {n}: a Gram over no rows cannot be normalised.")
    return n
