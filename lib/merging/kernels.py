"""Fused per-entry loops for TIES and DARE on the CPU (numba): the same bits as the torch code.

Why: TIES and DARE are chains of element-wise operations (a subtraction, a threshold, a sign,
two sums, a count, ...). In torch each operation is its own pass over the tensors, with its
own call overhead, so TIES cost about 3 ns per entry and task on the CPU, and DARE + TIES
5-7 ns, several times the cost of reading the experts (issue 12's ``make bench``). Each loop
here does one entry's whole chain in registers, in one pass.

Exactness: every loop does the float operations of the torch code it stands for, per entry,
in the same order and the same dtype (float32 stays float32: a Python float is rounded to the
array's dtype first, as torch rounds a scalar operand), so the results are the same bits;
numba compiles without fast-math, so nothing is reassociated or fused into an FMA.
``tests/test_kernels.py`` checks each loop against the torch code on values chosen to break
it: signed zeros, entries equal to a threshold, exact cancellations, sums that overflow.

Where they run: CPU tensors, contiguous, all float32 or all float64. The callers
(``ties.ties_merge_tensor``, ``dare.dare_tensor``, the TIES threshold passes) fall back to the
torch code otherwise (a GPU, bfloat16), so results never depend on which ran. Compiled on
first use and cached on disk (numba's ``cache=True``, next to this file, or in
``NUMBA_CACHE_DIR``).

Threads: a large tensor is split into blocks of at least ``MIN_BLOCK`` entries, one per torch
thread (``torch.get_num_threads()``), each looped over in its own thread (the loops release
the GIL); every entry is computed alone, so the blocks change no bit.

DARE + TIES applies DARE's mask inside TIES's loops (``DareMask``), so the sparsified expert
is never formed. numba is imported only by a process that runs a loop: the callers import
this module where they use it (~0.15 s and ~100 MiB).
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
from numba import njit

__all__ = ["DareMask", "dare_sparse", "fusable", "magnitudes_between", "ties_finish", "ties_fold"]

_FLOATS = (torch.float32, torch.float64)


def fusable(*tensors: torch.Tensor) -> bool:
    """Whether the loops here can take these tensors: plain tensors (not fake or meta ones, which
    have no memory to loop over) on the CPU, contiguous, and all of one dtype, float32 or float64."""
    dtype = tensors[0].dtype
    return dtype in _FLOATS and all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu"
                                    and t.dtype == dtype and t.is_contiguous() for t in tensors)


def _flat(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor as a flat numpy array sharing its memory."""
    return t.detach().reshape(-1).numpy()


# Blocks of at least this many entries. Handing a block to a thread and waiting for it costs
# ~0.1 ms from Python, what a loop does on ~2^17 entries; on 2 cores, 2 threads made the
# streaming merges' pieces of 2^18 entries slower, and gained little on whole ViT-B/32
# tensors in memory (1.7-2.1 against 2.0 ns per entry and task for TIES: the fold is then
# bound by memory). So only tensors of several million entries are split.
MIN_BLOCK = 2**20
_pool: ThreadPoolExecutor | None = None


def _blocks(n: int) -> list[tuple[int, int]]:
    """(start, end) of the blocks ``n`` entries are split into: one per torch thread, of at
    least MIN_BLOCK entries."""
    count = max(1, min(torch.get_num_threads(), n // MIN_BLOCK))
    size = max(1, math.ceil(n / count))
    return [(start, min(n, start + size)) for start in range(0, n, size)] or [(0, 0)]


def _each_block(blocks: list[tuple[int, int]], run) -> list:
    """``run(start, end)`` on each of ``blocks``, in threads when there are several; the
    results in block order."""
    global _pool
    if len(blocks) == 1:
        return [run(*blocks[0])]
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="merge-loop")
    return list(_pool.map(lambda block: run(*block), blocks))


class DareMask(NamedTuple):
    """DARE's mask for a run of entries, drawn as a loop goes (``dare``'s module docstring):
    entry i of the run has the counter ``start`` + i and the draw u = h(h(counter ⊕ k0) ⊕ k1);
    it is kept where u >= cutoff, and the kept τ divided by ``divisor`` = 1 − p."""

    k0: np.uint32
    k1: np.uint32
    start: np.uint32
    cutoff: np.uint32
    divisor: float


_NO_MASK = DareMask(np.uint32(0), np.uint32(0), np.uint32(0), np.uint32(0), 1.0)


@njit(inline="always")
def _lowbias32(x):
    # numba widens uint32 arithmetic to 64 bits: each step is cut back to 32 (products modulo 2^32)
    x = np.uint32(x ^ (x >> np.uint32(16)))
    x = np.uint32(x * np.uint32(0x21F0AAAD))
    x = np.uint32(x ^ (x >> np.uint32(15)))
    x = np.uint32(x * np.uint32(0x735A2D97))
    return np.uint32(x ^ (x >> np.uint32(15)))


@njit(inline="always")
def _draw(start, i, k0, k1):
    """Entry i's draw of a run whose first counter is ``start`` (``dare._keep_draws``)."""
    return _lowbias32(np.uint32(_lowbias32(np.uint32(np.uint32(start + i) ^ k0)) ^ k1))


@njit(cache=True, nogil=True)
def _draws(start, k0, k1, out):
    for i in range(out.size):
        out[i] = _draw(start, i, k0, k1)


def _block_start(mask: DareMask, offset: int) -> np.uint32:
    """The counter of a run's entry ``offset`` (where a block of it starts)."""
    return np.uint32(int(mask.start) + offset)


def draws(mask: DareMask, count: int) -> np.ndarray:
    """The draws of a run's first ``count`` entries, as the loops compute them (for tests)."""
    out = np.empty(count, dtype=np.uint32)
    _draws(mask.start, mask.k0, mask.k1, out)
    return out


# ------------------------------------------------------------------------------ DARE
# ``dare.dare_tensor``: θ0 + m ⊙ τ / (1 − p), with m drawn entry by entry (``_draw``).


@njit(inline="always")
def _sparse(theta0, expert, draw, cutoff, divisor, zero, one):
    """One entry of DARE's sparsified expert, as ``dare_tensor``'s torch code computes it."""
    keep = one if draw >= cutoff else zero
    tau = (expert - theta0) * keep / divisor + zero  # + 0 turns a dropped −0 into +0
    return tau + theta0


@njit(cache=True, nogil=True, error_model="numpy")
def _dare_sparse(theta0, expert, start, k0, k1, cutoff, divisor, out):
    zero, one = theta0.dtype.type(0), theta0.dtype.type(1)
    for i in range(theta0.size):
        out[i] = _sparse(theta0[i], expert[i], _draw(start, i, k0, k1), cutoff, divisor, zero, one)


def dare_sparse(theta0: torch.Tensor, expert: torch.Tensor, mask: DareMask) -> torch.Tensor:
    """θ0 + keep·(expert − θ0)/divisor + 0, keep = 1 where the draw >= cutoff, else 0 (a new
    tensor): ``dare.dare_tensor``."""
    out = torch.empty_like(theta0)
    a, x, o = _flat(theta0), _flat(expert), _flat(out)
    divisor = a.dtype.type(mask.divisor)
    _each_block(_blocks(a.size), lambda s, e: _dare_sparse(
        a[s:e], x[s:e], _block_start(mask, s), mask.k0, mask.k1, mask.cutoff, divisor, o[s:e]))
    return out


# ------------------------------------------------------------------------------ TIES
# ``ties.ties_merge_tensor``: per task, the trimmed τ̂t's positive entries are added to
# pos_sum (and counted), its negative ones to neg_sum; then the elected sign picks one.
# With ``dare``, the task's entries are first DARE's sparsified ones (DARE + TIES).


@njit(cache=True, nogil=True, error_model="numpy")
def _ties_fold(theta0, expert, cut, pos_sum, neg_sum, pos_count, neg_count, count, dare, start, k0, k1, cutoff,
               divisor):
    zero, one = theta0.dtype.type(0), theta0.dtype.type(1)
    not_finite = 0
    for i in range(theta0.size):
        x = expert[i]
        if dare:
            x = _sparse(theta0[i], x, _draw(start, i, k0, k1), cutoff, divisor, zero, one)
            not_finite += not math.isfinite(x)
        tau = x - theta0[i]
        up, down = tau > cut, -tau > cut  # |τ| >= threshold, the sign split out
        # Adding +0 where an entry is trimmed, as the torch code does: neither sum is ever −0,
        # so adding +0 leaves it unchanged, and a select keeps the loop branch-free.
        pos_sum[i] += tau if up else zero
        neg_sum[i] += tau if down else zero
        if count:
            pos_count[i] += one if up else zero
            neg_count[i] += one if down else zero
    return not_finite


def ties_fold(theta0: torch.Tensor, expert: torch.Tensor, cut: float, pos_sum: torch.Tensor, neg_sum: torch.Tensor,
              pos_count: torch.Tensor | None = None, neg_count: torch.Tensor | None = None,
              dare: DareMask | None = None) -> int:
    """Fold one task into TIES's running sums, in place: τ = expert − θ0, and where τ > cut
    pos_sum += τ (pos_count += 1), where −τ > cut neg_sum += τ (neg_count += 1). ``cut`` is
    just below the task's threshold (``ties._just_below``); counts only for the "mean". With
    ``dare``, ``expert`` is DARE-sparsified first, entry by entry; returns how many sparsified
    entries are not finite (0 without ``dare``), which the caller must refuse."""
    a, x, ps, ns = _flat(theta0), _flat(expert), _flat(pos_sum), _flat(neg_sum)
    count = pos_count is not None
    pc, nc = (_flat(pos_count), _flat(neg_count)) if count else (a[:0], a[:0])
    mask = _NO_MASK if dare is None else dare
    cut, divisor = a.dtype.type(cut), a.dtype.type(mask.divisor)

    # (an empty array sliced stays empty: the counts that are absent need no case)
    return sum(_each_block(_blocks(a.size), lambda s, e: _ties_fold(
        a[s:e], x[s:e], cut, ps[s:e], ns[s:e], pc[s:e], nc[s:e], count, dare is not None, _block_start(mask, s),
        mask.k0, mask.k1, mask.cutoff, divisor)))


@njit(cache=True, nogil=True, error_model="numpy")
def _ties_finish(theta0, pos_sum, neg_sum, pos_count, neg_count, mean, scale, out):
    zero, one = theta0.dtype.type(0), theta0.dtype.type(1)
    for i in range(theta0.size):
        total = pos_sum[i] + neg_sum[i]  # the elected sign is that of the sums (not the means)
        positive, negative = pos_sum[i], neg_sum[i]
        if mean:  # both sides' means, then a select: the compiler vectorises the loop only
            # when no division waits on a condition (a branch on the elected sign, a coin
            # flip, cost 9.7 ns an entry on 2^18 entries, AMD EPYC; this 1.2)
            positive, negative = positive / max(pos_count[i], one), negative / max(neg_count[i], one)
        elected = positive if total > 0 else (negative if total < 0 else zero)  # no sign elected: θ0
        out[i] = elected * scale + theta0[i]


def ties_finish(theta0: torch.Tensor, pos_sum: torch.Tensor, neg_sum: torch.Tensor, pos_count: torch.Tensor | None,
                neg_count: torch.Tensor | None, scale: float) -> torch.Tensor:
    """θ0 + scale·(the elected side's sum, divided by its count for the "mean" (counts
    given), 0 where the sums cancel): a new tensor shaped as θ0."""
    out = torch.empty_like(theta0)
    a, ps, ns, o = _flat(theta0), _flat(pos_sum), _flat(neg_sum), _flat(out)
    mean = pos_count is not None
    pc, nc = (_flat(pos_count), _flat(neg_count)) if mean else (a[:0], a[:0])
    scale = a.dtype.type(scale)
    _each_block(_blocks(a.size), lambda s, e: _ties_finish(a[s:e], ps[s:e], ns[s:e], pc[s:e], nc[s:e], mean, scale,
                                                           o[s:e]))
    return out


@njit(cache=True, nogil=True, error_model="numpy")
def _magnitudes_between(theta0, expert, low, high, out, dare, start, k0, k1, cutoff, divisor):
    zero, one = theta0.dtype.type(0), theta0.dtype.type(1)
    above = 0
    for i in range(theta0.size):  # every magnitude, into out: a loop the compiler vectorises
        x = expert[i]
        if dare:
            x = _sparse(theta0[i], x, _draw(start, i, k0, k1), cutoff, divisor, zero, one)
        magnitude = abs(x - theta0[i])
        out[i] = magnitude
        above += magnitude >= high
    inside = 0
    for i in range(theta0.size):  # those in [low, high) moved to the front, in order
        # Branch-free (which side a magnitude falls is a coin flip a branch would mispredict):
        # every magnitude is written at the next free place, which only moves past a kept one.
        magnitude = out[i]
        out[inside] = magnitude
        inside += (magnitude >= low) & (magnitude < high)
    return above, inside


def magnitudes_between(theta0: torch.Tensor, expert: torch.Tensor, low: float, high: float, out: np.ndarray,
                       dare: DareMask | None = None) -> tuple[int, np.ndarray]:
    """Of the magnitudes |expert − θ0| (``expert`` DARE-sparsified first with ``dare``): how
    many are >= ``high``, and those in [low, high), in their order. ``out`` is scratch space
    for as many entries as θ0 has; the kept magnitudes are returned as a view of it, or a
    new array. ``ties.KthLargest.take`` consumes the two."""
    a, x = _flat(theta0), _flat(expert)
    if out.size < a.size:
        raise ValueError(f"out has {out.size} entries; the loop may write all {a.size} entries of θ0.")
    mask = _NO_MASK if dare is None else dare
    low, high, divisor = a.dtype.type(low), a.dtype.type(high), a.dtype.type(mask.divisor)
    blocks = _blocks(a.size)
    counts = _each_block(blocks, lambda s, e: _magnitudes_between(
        a[s:e], x[s:e], low, high, out[s:e], dare is not None, _block_start(mask, s), mask.k0, mask.k1, mask.cutoff,
        divisor))
    above = sum(c[0] for c in counts)
    if len(blocks) == 1:
        return above, out[:counts[0][1]]
    return above, np.concatenate([out[s:s + c[1]] for (s, _), c in zip(blocks, counts)])
