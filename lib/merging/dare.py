"""DARE: Drop And REscale (METHODS.md §1).

Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models
as a Free Lunch" (ICML). Per entry, keep τt with probability 1 − p and rescale it by
1/(1 − p): τ̃t = m ⊙ τt / (1 − p), m ~ Bernoulli(1 − p), so E[τ̃t] = τt. The sparsified models
θ0 + τ̃t are then merged by Task Arithmetic or TIES (the registry's "dare_ta", "dare_ties").
No defaults: the caller gives the drop rate p (the studies use 0.7; the paper 0.7–0.9) and
the seed (0 in the registry).

Deviations / conventions:

- The rescale is exactly 1/(1 − p), as in the paper. MergeKit instead rescales each tensor
  so that it keeps its L1 norm, which is not unbiased per entry.
- Each (seed, task, tensor) draws its mask from its own generator (a hash of the three), so
  a tensor's mask does not depend on which other keys are passed or in which order.
- Buffers (BatchNorm running statistics) are copied unchanged from each fine-tuned model:
  never dropped or rescaled. The merge that follows averages them.
"""
from __future__ import annotations

import hashlib
from typing import Collection, Sequence

import torch

from ._common import (StateDict, _check_models, _check_numbers, _float_keys, _in_order, _passthrough,
                      _without, _work, buffer_keys)


# -------------------------------------------------------------------------------- DARE


def _key_seed(seed: int, task: int, key: str) -> int:
    """A seed for one (task, tensor): masks do not depend on which other keys are passed."""
    digest = hashlib.sha256(f"{seed}:{task}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@torch.no_grad()
def dare(
    pretrained: StateDict, finetuned: Sequence[StateDict], drop_rate: float, seed: int, *,
    buffers: Collection[str] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """DARE: each fine-tuned model as θ0 + m ⊙ τt / (1 − p), m ~ Bernoulli(1 − p) per entry.

    Returns the sparsified fine-tuned state dicts (E[τ̃] = τ), to be merged by
    ``task_arithmetic`` or ``ties_merging``. Deterministic given ``seed``: each (task, key)
    draws from its own generator, so a tensor's mask does not depend on which other keys
    are passed. Non-floating tensors and buffers (``buffers``, or by default the keys ending in
    running_mean / running_var) are copied unchanged from each fine-tuned model.
    """
    _check_numbers("dare", drop_rate=drop_rate)
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}.")
    _check_models(pretrained, finetuned)
    buffer_names = buffer_keys(pretrained, buffers)
    out = []
    for t, ft in enumerate(finetuned):
        sparse = _passthrough(ft)
        sparse.update({k: ft[k].clone() for k in buffer_names})
        for k in _without(_float_keys(pretrained), buffer_names):
            theta0 = _work(pretrained[k])
            generator = torch.Generator(device=theta0.device).manual_seed(_key_seed(seed, t, k))
            keep = torch.rand(theta0.shape, generator=generator, device=theta0.device) >= drop_rate
            tau = _work(ft[k]) - theta0
            tau.masked_fill_(~keep, 0).div_(1.0 - drop_rate)
            sparse[k] = tau.add_(theta0).to(ft[k].dtype)
        out.append(_in_order(sparse, ft))
    return out
