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
  a tensor's mask does not depend on which other keys are passed or in which order; the
  streaming merge (``lib.merging.streaming``), which sees one key at a time, draws the same
  masks through ``dare_tensor``.
- The generator is numpy's PCG64-DXSM bit generator, read raw (``dare_keep_mask``): an entry
  is kept where its 32-bit draw u satisfies u >= round(p·2^32), i.e. with probability 1 − p to
  within 2^-33. Not torch's CPU generator: the raw stream and the comparison cost ~1.5 ns an
  entry against ~3.7 for ``torch.rand``, which had made DARE's mask several times the cost of
  reading the experts (issue 12's streaming benchmark), and the stream can jump ahead, so a
  piece of a tensor gets its mask without drawing the rest. numpy keeps a bit generator's raw
  stream fixed across versions (NEP 19), and the mask is drawn on the CPU whatever the
  tensor's device, so a merge on a GPU draws the masks a CPU merge does (torch's CUDA
  generator would not). Commits before this one drew from torch's CPU generator: their DARE
  masks, and so their DARE numbers, differ.
- Buffers (BatchNorm running statistics) are copied unchanged from each fine-tuned model:
  never dropped or rescaled. The merge that follows averages them.
- On the CPU, ``dare_tensor`` is one fused loop over the raw draws (``kernels.dare_sparse``),
  and DARE + TIES never forms the sparse tensors: ``SparseExpert`` hands TIES the draws, and
  its loops apply the mask entry by entry. Both give the torch code's bits (tested). Drawing
  the stream (~1 ns an entry) is then most of DARE's cost, twice for DARE + TIES (ranking, merge).
"""
from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Collection, Sequence

import numpy as np
import torch

from ._common import (StateDict, _all_finite, _check_finite, _check_models, _check_numbers, _float_keys,
                      _in_order, _passthrough, _without, _work, buffer_keys)

if TYPE_CHECKING:
    from .kernels import DareMask


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
            sparse[k] = dare_tensor(pretrained[k], ft[k], drop_rate, seed, t, k)
        out.append(_in_order(sparse, ft))
    return out


def _keep_draws(numel: int, drop_rate: float, seed: int, task: int, key: str,
                offset: int = 0) -> tuple[np.ndarray, np.uint32]:
    """(draws, cutoff): the raw 32-bit draws behind entries offset, offset + 1, ... (``numel``
    of them) of one (seed, task, key)'s keep mask, and the cutoff they are kept at or above
    (see ``dare_keep_mask``)."""
    stream = np.random.PCG64DXSM(_key_seed(seed, task, key))
    stream.advance(offset // 2)
    skip = offset % 2
    draws = stream.random_raw((skip + numel + 1) // 2).view(np.uint32)[skip:skip + numel]
    cutoff = np.uint32(min(round(drop_rate * 2**32), 2**32 - 1))  # p < 1, but p·2^32 may round up to 2^32
    return draws, cutoff


def _dare_mask(numel: int, drop_rate: float, seed: int, task: int, key: str, offset: int = 0) -> DareMask:
    """The mask of ``dare_keep_mask`` as the fused loops take it: the raw draws, the cutoff,
    and the divisor 1 − p."""
    from .kernels import DareMask  # here, not at the top: numba loads only where a fused loop runs

    return DareMask(*_keep_draws(numel, drop_rate, seed, task, key, offset), 1.0 - drop_rate)


def dare_keep_mask(shape: Sequence[int], drop_rate: float, seed: int, task: int, key: str,
                   offset: int = 0) -> torch.Tensor:
    """The keep mask m ~ Bernoulli(1 − p) of one (seed, task, key), as float32 1 (kept) and
    0 (dropped) of ``shape``: entry i of the flattened tensor is kept where the i-th 32-bit
    draw of the PCG64-DXSM stream seeded by (seed, task, key) is at least round(p·2^32) (the
    low half of each raw 64-bit draw first: a little-endian machine's order, which every CPU
    torch supports has). ``offset``: the mask of entries offset, offset + 1, ... of the key,
    the same bits the whole key's mask has there (the stream jumps ahead, ``advance``), so a
    merge can work through a large tensor piece by piece."""
    n = math.prod(shape)
    draws, cutoff = _keep_draws(n, drop_rate, seed, task, key, offset)
    keep = np.empty(n, dtype=np.float32)
    np.greater_equal(draws, cutoff, out=keep, casting="unsafe")  # compared straight into floats: one pass
    return torch.from_numpy(keep).reshape(tuple(shape))


@torch.no_grad()
def dare_tensor(theta0: torch.Tensor, finetuned: torch.Tensor, drop_rate: float, seed: int, task: int,
                key: str, offset: int = 0) -> torch.Tensor:
    """One tensor of task ``task``'s sparsified model: θ0 + m ⊙ τ / (1 − p), in the input dtype
    (or, with ``offset``, the flat piece of it that starts at entry ``offset`` of ``key``).

    The mask (``dare_keep_mask``) depends on (seed, task, key) alone, so the streaming merge,
    which sees one key at a time, draws exactly the masks ``dare`` draws. It is kept as floats
    (1 kept, 0 dropped) and multiplied in: ``masked_fill`` costs more than drawing the mask.
    The dropped entries' ±0 is made +0 before θ0 is added, so the result equals the masked
    form bit for bit (θ0 = −0 included). On the CPU (float32 or float64, contiguous) this is
    one fused loop over the raw draws (``kernels.dare_sparse``), the same bits (tested).
    """
    from . import kernels  # here, not at the top: numba loads only where a fused loop runs

    if kernels.fusable(theta0, finetuned):
        return kernels.dare_sparse(theta0, finetuned, _dare_mask(theta0.numel(), drop_rate, seed, task, key, offset))
    work = _work(theta0)
    keep = dare_keep_mask(work.shape, drop_rate, seed, task, key, offset).to(work.device, work.dtype)
    tau = _work(finetuned) - work
    tau.mul_(keep).div_(1.0 - drop_rate).add_(0.0)
    return tau.add_(work).to(finetuned.dtype)


class SparseExpert:
    """Task ``task``'s tensor (or flat piece, from entry ``offset``) of ``key`` with DARE's mask
    not yet applied, for DARE + TIES: TIES's fused loops draw ``mask()`` and apply it entry by
    entry (the sparse tensor is never formed); ``dense()`` is ``dare_tensor``'s tensor."""

    def __init__(self, theta0: torch.Tensor, finetuned: torch.Tensor, drop_rate: float, seed: int, task: int,
                 key: str, offset: int = 0):
        self.theta0, self.finetuned = theta0, finetuned
        self.drop_rate, self.seed, self.task, self.key, self.offset = drop_rate, seed, task, key, offset

    def mask(self) -> DareMask:
        return _dare_mask(self.finetuned.numel(), self.drop_rate, self.seed, self.task, self.key, self.offset)

    def dense(self) -> torch.Tensor:
        """``dare_tensor``'s sparsified tensor; a ValueError naming the task and key if an entry
        is not finite (τ/(1 − p) can overflow), as a merge refuses any non-finite input."""
        sparse = dare_tensor(self.theta0, self.finetuned, self.drop_rate, self.seed, self.task, self.key, self.offset)
        if not _all_finite(sparse):
            _check_finite({self.key: sparse}, f"DARE's finetuned[{self.task}]")
        return sparse
