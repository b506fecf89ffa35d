"""RegMean."""
from __future__ import annotations

from typing import Sequence

import torch

from ._common import (StateDict, _check_nonempty, _check_same_layout, _check_stats, _float_keys)
from .averaging import weight_average


# ----------------------------------------------------------------------------- RegMean


@torch.no_grad()
def regmean(
    state_dicts: Sequence[StateDict],
    grams: Sequence[StateDict],
    alpha: float = 0.9,
) -> dict[str, torch.Tensor]:
    """RegMean: for each linear weight W (out×in) with input Gram matrices Gt (in×in),
    W*ᵀ = (Σt G̃t)⁻¹ Σt G̃t Wtᵀ with G̃ = alpha·G + (1 − alpha)·diag(G).

    ``grams[t][name]`` is the Gram of the inputs to weight ``name`` in model t. Solved with
    ``torch.linalg.solve`` in float64 (Grams of activations are badly conditioned). Float
    tensors without a Gram (embeddings, LayerNorm, biases) are averaged; a key must have a
    Gram in all models or in none.
    """
    _check_nonempty(state_dicts, "state_dicts")
    _check_same_layout(state_dicts, [f"state_dicts[{i}]" for i in range(len(state_dicts))])
    if len(grams) != len(state_dicts):
        raise ValueError(f"got {len(grams)} Gram dicts for {len(state_dicts)} models.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    ref = state_dicts[0]
    for t, g in enumerate(grams):
        for k in g:
            if k in ref and ref[k].dim() != 2:
                raise ValueError(f"grams[{t}] has key {k!r}, but {k!r} is not a 2-D (out×in) weight.")
        _check_stats(g, ref, f"grams[{t}]", shape_of=lambda w: (w.shape[1], w.shape[1]))
    out = weight_average(state_dicts)
    for k in _float_keys(ref):
        present = [k in g for g in grams]
        if not any(present):
            continue
        if not all(present):
            raise ValueError(f"key {k!r} has a Gram in models {[i for i, p in enumerate(present) if p]} "
                             "but not in the others; give every model a Gram for it, or none.")
        lhs = torch.zeros(ref[k].shape[1], ref[k].shape[1], dtype=torch.float64, device=ref[k].device)
        rhs = torch.zeros(ref[k].shape[1], ref[k].shape[0], dtype=torch.float64, device=ref[k].device)
        for sd, g in zip(state_dicts, grams):
            gram = g[k].to(torch.float64)
            shrunk = alpha * gram + (1.0 - alpha) * torch.diag(torch.diagonal(gram))
            lhs.add_(shrunk)
            rhs.add_(shrunk @ sd[k].to(torch.float64).T)
        try:
            solution = torch.linalg.solve(lhs, rhs)
        except torch.linalg.LinAlgError as err:
            raise ValueError(
                f"RegMean: the summed Gram of {k!r} is singular ({err}). Use alpha < 1, more "
                "examples per task, or leave this key out of grams so it is averaged."
            ) from None
        out[k] = solution.T.to(ref[k].dtype).contiguous()
    return out
