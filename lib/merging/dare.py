"""DARE."""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from ._common import (StateDict, _check_models, _float_keys,
                      _in_order, _passthrough, _work)


# -------------------------------------------------------------------------------- DARE


def _key_seed(seed: int, task: int, key: str) -> int:
    """A seed for one (task, tensor): masks do not depend on which other keys are passed."""
    digest = hashlib.sha256(f"{seed}:{task}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@torch.no_grad()
def dare(
    pretrained: StateDict, finetuned: Sequence[StateDict], drop_rate: float, seed: int
) -> list[dict[str, torch.Tensor]]:
    """DARE: each fine-tuned model as θ0 + m ⊙ τt / (1 − p), m ~ Bernoulli(1 − p) per entry.

    Returns the sparsified fine-tuned state dicts (E[τ̃] = τ), to be merged by
    ``task_arithmetic`` or ``ties_merging``. Deterministic given ``seed``: each (task, key)
    draws from its own generator, so a tensor's mask does not depend on which other keys
    are passed. Non-floating tensors are copied from each fine-tuned model.
    """
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}.")
    _check_models(pretrained, finetuned)
    out = []
    for t, ft in enumerate(finetuned):
        sparse = _passthrough(ft)
        for k in _float_keys(pretrained):
            theta0 = _work(pretrained[k])
            generator = torch.Generator(device=theta0.device).manual_seed(_key_seed(seed, t, k))
            keep = torch.rand(theta0.shape, generator=generator, device=theta0.device) >= drop_rate
            tau = _work(ft[k]) - theta0
            tau.masked_fill_(~keep, 0).div_(1.0 - drop_rate)
            sparse[k] = tau.add_(theta0).to(ft[k].dtype)
        out.append(_in_order(sparse, ft))
    return out
