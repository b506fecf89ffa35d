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
- Arithmetic: the solution is written as the first expert plus a correction,

      W*ᵀ = W1ᵀ + (Σt G̃t + εI)⁻¹ (Σt≥2 G̃t (Wt − W1)ᵀ + ε (W̄ − W1)ᵀ),

  equal to the formula above in exact arithmetic. The products G̃t (Wt − W1)ᵀ, the bulk of
  the work, run in the inputs' precision (float32), and their rounding then only touches the
  small correction, not W*; the summed Gram is factored and solved in float64 (Grams of
  activations are badly conditioned), by Cholesky (it is symmetric positive definite), or by
  LU where rounding leaves it not quite so. The public implementations do all of it in
  float32, with an explicit inverse.
- Convolutions are the caller's job: a Conv2d weight (out, in, kh, kw) is the linear map
  ``W.flatten(1)`` over unfolded input patches, so pass it flattened to (out, in·kh·kw) with
  the patch Gram from ``gram_matrices`` and reshape the result back. Only 2-D weights may
  have Grams here.
- Buffers (``buffers``, or by default the keys ending in running_mean / running_var) get the
  plain average over the models, like every key without a Gram.
"""
from __future__ import annotations

from typing import Collection, Iterable, Mapping, Sequence

import torch

from ._common import (_has_statistic, StateDict, _check_nonempty, _check_numbers, _check_state_dicts, _check_stats,
                      _float_keys, _without, _work_dtype, buffer_keys, in_step)
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
        rows = None if gram_normalization == "sum" else [_row_count(counts, t, k) for t in range(len(grams))]
        out[k] = regmean_weight((sd[k] for sd in state_dicts), (g[k] for g in grams), rows, alpha, ridge, k)
    return out


@torch.no_grad()
def regmean_weight(weights: Iterable[torch.Tensor], grams: Iterable[torch.Tensor], rows: Sequence[int] | None,
                   alpha: float, ridge: float, key: str) -> torch.Tensor:
    """RegMean of one (out×in) weight from the experts' weights Wt and their input Grams Gt,
    taken in step, one pair at a time (the streaming merge reads them from files):

        W*ᵀ = W1ᵀ + (S + εI)⁻¹ (Σt≥2 G̃t (Wt − W1)ᵀ + ε (W̄ − W1)ᵀ),   S = Σt G̃t,

    with G̃t = (alpha·Gt + (1 − alpha)·diag(Gt)) / rows[t] (rows None: divide by 1) and
    ε = ridge·mean(diag(S)). Products in the inputs' working precision, the solve in float64."""
    reference = summed_gram = correction = spread = None
    n = 0
    for t, weight, gram in in_step(weights, grams):
        scale = 1.0 if rows is None else 1.0 / rows[t]
        if reference is None:
            out_dtype = weight.dtype
            work = torch.promote_types(_work_dtype(weight.dtype), _work_dtype(gram.dtype))
            reference = weight.to(work)
            summed_gram = torch.zeros(gram.shape, dtype=work, device=gram.device)
            correction = torch.zeros_like(reference)  # the correction's transpose: (out, in), as the weights
            spread = torch.zeros_like(reference) if ridge > 0 else None
        gram = gram.to(work)
        diagonal = gram.diagonal().clone()  # contiguous: a strided view slows the products below
        summed_gram.add_(gram, alpha=alpha * scale)  # the shrunk off-diagonals, then the full diagonal
        summed_gram.diagonal().add_(diagonal, alpha=(1.0 - alpha) * scale)
        if t > 0:
            delta = weight.to(work) - reference
            # (G̃t·deltaᵀ)ᵀ = scale·(alpha·delta·Gtᵀ + (1 − alpha)·delta·diag(Gt))
            product = delta @ gram.mT
            product.mul_(alpha).addcmul_(delta, diagonal, value=1.0 - alpha)
            correction.add_(product, alpha=scale)
            if spread is not None:
                spread.add_(delta)
            del delta, product
        n += 1
        del weight, gram, diagonal
    lhs, rhs = summed_gram.to(torch.float64), correction.to(torch.float64).mT
    del summed_gram, correction
    if ridge > 0:  # ε (W̄ − W1)ᵀ = ε · Σt (Wt − W1)ᵀ / n
        epsilon = ridge * lhs.diagonal().mean().item()
        lhs.diagonal().add_(epsilon)
        rhs.add_(spread.to(torch.float64).mT, alpha=epsilon / n)
    return (reference.to(torch.float64) + _solve_symmetric(lhs, rhs, key).mT).to(out_dtype).contiguous()


def _solve_symmetric(lhs: torch.Tensor, rhs: torch.Tensor, key: str) -> torch.Tensor:
    """lhs⁻¹·rhs for the summed Gram ``lhs``: Cholesky (half LU's work), or LU where rounding
    leaves ``lhs`` not quite positive definite; a singular one is an error naming ``key``."""
    factor, info = torch.linalg.cholesky_ex(lhs)
    if info.item() == 0:
        return torch.cholesky_solve(rhs, factor)
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
