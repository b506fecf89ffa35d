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
- The mask comes from a counter-based generator: entry i of the (seed, task, key)'s mask draws
  the 32-bit u_i = h(h(i ⊕ k0) ⊕ k1), and is kept where u_i >= round(p·2^32), i.e. with
  probability 1 − p to within 2^-33. (k0, k1) are two 32-bit words of a hash of (seed, task,
  key), and h is a 32-bit integer hash of the "lowbias32" form (x ⊕= x ≫ 16, x ·= 0x21f0aaad,
  x ⊕= x ≫ 15, x ·= 0x735a2d97, x ⊕= x ≫ 15, modulo 2^32: the constants TheIronBorn found for
  C. Wellons's hash-prospector, among its lowest-bias two-multiply hashes). Why a counter: any
  piece of a tensor gets its mask without drawing the rest, and the fused loops
  (``kernels``) compute each entry's draw in registers, ~0.3 ns an entry, where reading a
  stream (numpy's PCG64-DXSM, this module's generator up to commit 1d68888) cost ~1.5 ns and
  was most of DARE's cost, twice for DARE + TIES (issue 12's streaming benchmark). The draws
  are plain integer arithmetic, so they are the same on every machine and library version,
  and the mask of a tensor on a GPU, drawn there with torch's operations (``_keep_draws_on``),
  is the one a CPU draws. Masks drawn by earlier commits differ (torch's CPU generator before
  the PCG64-DXSM stream), and so do their DARE numbers.
  ``tests/test_streaming_merges.py`` checks the masks' statistics (the kept fraction, pairs
  of neighbours and of far entries, tasks against each other).
- Buffers (BatchNorm running statistics) are copied unchanged from each fine-tuned model:
  never dropped or rescaled. The merge that follows averages them.
- On the CPU, ``dare_tensor`` is one fused loop that draws and applies the mask entry by entry
  (``kernels.dare_sparse``), and DARE + TIES never forms the sparse tensors: ``SparseExpert``
  hands TIES the mask's words, and its loops draw and apply the mask as they go. Both give the
  torch code's bits (tested).
- The hash is written three times, once per place it runs: numba (the fused loops), numpy (the
  CPU off the fused path, ``_keep_draws``: uint32 arithmetic, several times faster there than
  torch's int64) and torch (other devices, ``_keep_draws_on``); tests hold all three to the
  same bits.
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


def _key_words(seed: int, task: int, key: str) -> tuple[np.uint32, np.uint32]:
    """The two 32-bit words (k0, k1) that key one (seed, task, tensor)'s mask: masks do not
    depend on which other keys are passed."""
    digest = hashlib.sha256(f"{seed}:{task}:{key}".encode()).digest()
    return np.uint32(int.from_bytes(digest[:4], "little")), np.uint32(int.from_bytes(digest[4:8], "little"))


def _lowbias32(x: np.ndarray) -> np.ndarray:
    """The integer hash h of the module docstring, on uint32 arrays (in place; products wrap
    modulo 2^32). ``kernels._lowbias32`` is the same per entry (tested)."""
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x21F0AAAD)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x735A2D97)
    x ^= x >> np.uint32(15)
    return x


MAX_MASKED = 2**32  # the counter i is 32 bits: a tensor of more entries (16 GiB in float32) has no mask


def _cutoff(drop_rate: float) -> np.uint32:
    return np.uint32(min(round(drop_rate * 2**32), 2**32 - 1))  # p < 1, but p·2^32 may round up to 2^32


def _check_counter(numel: int, offset: int, key: str) -> None:
    if offset + numel > MAX_MASKED:
        raise ValueError(f"DARE's mask numbers a tensor's entries with 32 bits; {key!r} would need entry "
                         f"{offset + numel - 1}, past 2^32 - 1. Split the tensor to merge it with DARE.")


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
    """(draws, cutoff): the 32-bit draws u_i of entries i = offset, offset + 1, ... (``numel``
    of them) of one (seed, task, key)'s keep mask, and the cutoff they are kept at or above
    (see the module docstring)."""
    _check_counter(numel, offset, key)
    k0, k1 = _key_words(seed, task, key)
    draws = np.arange(offset, offset + numel, dtype=np.uint32)
    draws ^= k0
    draws = _lowbias32(draws)
    draws ^= k1
    return _lowbias32(draws), _cutoff(drop_rate)


def _dare_mask(numel: int, drop_rate: float, seed: int, task: int, key: str, offset: int = 0) -> DareMask:
    """The mask of ``dare_keep_mask`` as the fused loops take it, to be drawn entry by entry
    as they go: the key's words, the first entry's counter, the cutoff, and the divisor 1 − p."""
    from .kernels import DareMask  # here, not at the top: numba loads only where a fused loop runs

    _check_counter(numel, offset, key)
    return DareMask(*_key_words(seed, task, key), np.uint32(offset), _cutoff(drop_rate), 1.0 - drop_rate)


def dare_keep_mask(shape: Sequence[int], drop_rate: float, seed: int, task: int, key: str,
                   offset: int = 0, device: str | torch.device | None = None) -> torch.Tensor:
    """The keep mask m ~ Bernoulli(1 − p) of one (seed, task, key), as float32 1 (kept) and
    0 (dropped) of ``shape``: entry i of the flattened tensor is kept where its draw
    u_i = h(h(i ⊕ k0) ⊕ k1) is at least round(p·2^32) (the module docstring). ``offset``: the
    mask of entries offset, offset + 1, ... of the key, the same bits the whole key's mask has
    there, so a merge can work through a large tensor piece by piece. ``device``: where it is
    drawn and returned (the CPU by default); the same bits on every device."""
    n = math.prod(shape)
    device = torch.device("cpu" if device is None else device)
    if device.type != "cpu":
        draws, cutoff = _keep_draws_on(device, n, drop_rate, seed, task, key, offset)
        return (draws >= int(cutoff)).to(torch.float32).reshape(tuple(shape))
    draws, cutoff = _keep_draws(n, drop_rate, seed, task, key, offset)
    keep = np.empty(n, dtype=np.float32)
    np.greater_equal(draws, cutoff, out=keep, casting="unsafe")  # compared straight into floats: one pass
    return torch.from_numpy(keep).reshape(tuple(shape))


def _keep_draws_on(device: torch.device, numel: int, drop_rate: float, seed: int, task: int, key: str,
                   offset: int = 0) -> tuple[torch.Tensor, np.uint32]:
    """``_keep_draws`` computed with torch's operations on ``device`` (a GPU: no mask drawn
    on the CPU and copied over), the draws as int64 holding the same 32-bit values (tested).
    torch has no unsigned 32-bit arithmetic on every device, so each product modulo 2^32 is
    formed from two that stay below 2^48 (``_times_mod_2_32``)."""
    _check_counter(numel, offset, key)
    k0, k1 = (int(k) for k in _key_words(seed, task, key))
    draws = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    draws = _lowbias32_torch(_lowbias32_torch(draws ^ k0) ^ k1)
    return draws, _cutoff(drop_rate)


def _times_mod_2_32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """x·constant modulo 2^32, for int64 x in [0, 2^32): the constant's low and high 16 bits
    multiplied in apart, so no product leaves int64."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & 0xFFFFFFFF


def _lowbias32_torch(x: torch.Tensor) -> torch.Tensor:
    """``_lowbias32`` on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _times_mod_2_32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _times_mod_2_32(x, 0x735A2D97)
    return x ^ (x >> 15)


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
    keep = dare_keep_mask(work.shape, drop_rate, seed, task, key, offset, device=work.device).to(work.dtype)
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
