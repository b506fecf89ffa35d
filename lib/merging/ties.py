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
- Steps 2-3 for one tensor are ``ties_merge_tensor``: on the CPU one fused loop per task
  (``kernels``, numba), elsewhere torch float arithmetic instead of boolean masks (the same
  bits as each other and as the masked form). The streaming merge (``lib.merging.streaming``)
  calls it too, with thresholds found in a pass over files.
"""
from __future__ import annotations

import math
import threading
from typing import Collection, Iterable, Sequence

import numpy as np
import torch

from .dare import SparseExpert
from ._common import (StateDict, _all_finite, _check_models, _check_numbers, _float_keys, _in_order,
                      _passthrough, _without, _work, _work_dtype, averaged_buffers, buffer_keys)


# ------------------------------------------------------------ exact threshold search
# The n_keep-th largest |τt| over all entries, without sorting them or holding them all:
# the in-memory TIES uses it on CPU, and the streaming merge (lib.merging.streaming) on
# magnitudes read from files, pass by pass.


def _bits_dtype(dtype: torch.dtype):
    """The numpy (float, same-width int) pair whose bit patterns order non-negative floats."""
    if dtype == torch.float32:
        return np.float32, np.int32
    if dtype == torch.float64:
        return np.float64, np.int64
    raise TypeError(f"magnitudes are ranked in float32 or float64, not {dtype}.")


class KthLargest:
    """The exact k-th largest of n non-negative floats (float32 or float64) that can be
    streamed past it several times, in memory independent of n.

    The answer is known to lie in a half-open interval [low, high) of bit patterns (for
    non-negative IEEE floats, value order is the order of the bit patterns read as
    integers). In each pass, ``observe`` is given every value once (in chunks, in any
    order); it counts the values at or above ``high`` and keeps those inside the interval,
    up to ``capacity`` of them. If they all fit, the k-th largest is the (k − above)-th
    largest of the kept values: found. Otherwise they are counted into at most 2^16 bins of
    equal width in bit space, and the bin that holds the k-th value becomes the next pass's
    interval (a float32 needs at most two such passes to be pinned to one bit pattern). A
    ``bracket`` from a sample can start the first pass on a narrow interval; when it misses,
    the pass's counts still say on which side the answer lies.

    Ties are kept as a rank counts them: the k-th largest of [3, 2, 2, 2, 1] is 2 for k = 2,
    3 and 4, exactly what ``torch.topk(x, k).values[-1]`` gives.
    """

    BINS_LOG2 = 16

    def __init__(self, k: int, dtype: torch.dtype, capacity: int = 2**20):
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}.")
        self.k, self.capacity = k, max(int(capacity), 1)
        self._float, self._int = _bits_dtype(dtype)
        self._top = int(np.array(np.inf, dtype=self._float).view(self._int))  # bits of +inf: above every finite value
        self.low, self.high = 0, self._top
        self.value: float | None = None
        self.passes = 0
        self._lock = threading.Lock()
        self._start_pass()

    def _float_of(self, bits: int) -> float:
        return float(np.array(bits, dtype=self._int).view(self._float))

    def _bits_of(self, value: float) -> int:
        return int(np.array(value, dtype=self._float).view(self._int))

    def bracket(self, low_value: float, high_value: float) -> None:
        """Start from [low_value, high_value): a guess (from a sample) of where the answer is."""
        if self.passes or self._seen:
            raise RuntimeError("a bracket can only be set before the first pass.")
        self.low = max(0, self._bits_of(max(low_value, 0.0)))
        self.high = min(self._top, max(self.low + 1, self._bits_of(high_value)))
        self._start_pass()

    @property
    def done(self) -> bool:
        return self.value is not None

    def _start_pass(self) -> None:
        self._above = 0  # values with bits >= high
        self._inside = 0  # values with bits in [low, high)
        self._kept: list[np.ndarray] = []
        self._hist: np.ndarray | None = None
        self._seen = 0

    def _shift(self) -> int:
        return max(0, (self.high - self.low - 1).bit_length() - self.BINS_LOG2)

    def _count_into_bins(self, values: np.ndarray) -> None:
        shift = self._shift()
        if self._hist is None:
            self._hist = np.zeros(((self.high - self.low - 1) >> shift) + 1, dtype=np.int64)
        bins = (values.view(self._int) - self._int(self.low)) >> shift
        self._hist += np.bincount(bins, minlength=len(self._hist))

    @property
    def dtype(self) -> np.dtype:
        """The numpy dtype of the values ranked."""
        return np.dtype(self._float)

    @property
    def interval(self) -> tuple[float, float] | None:
        """This pass's [low, high) as values: ``take`` wants the values >= high counted and
        those inside kept. None while every value is inside (no bracket yet)."""
        if self.low == 0 and self.high == self._top:
            return None
        return self._float_of(self.low), self._float_of(self.high)

    def observe(self, values: torch.Tensor) -> None:
        """One chunk of this pass's values (any shape; non-negative; the dtype given)."""
        a = values.detach().reshape(-1).numpy()
        if a.dtype != self._float:
            raise TypeError(f"expected {np.dtype(self._float)} values, got {a.dtype}.")
        if self.interval is None:
            self.take(a, 0, a.size)  # every finite value is inside
            return
        at_or_above = a >= self._float_of(self.high)
        inside = a[(a >= self._float_of(self.low)) & ~at_or_above]  # a copy
        self.take(inside, int(np.count_nonzero(at_or_above)), a.size, copy=False)

    def take(self, inside: np.ndarray, above: int, seen: int, copy: bool = True) -> None:
        """One chunk of this pass, filtered by the caller (a fused loop, ``kernels.
        magnitudes_between``): of ``seen`` values, ``above`` were at or above ``interval``'s
        high and ``inside`` are those within it. ``copy``: the caller may reuse ``inside``."""
        if inside.dtype != self._float:
            raise TypeError(f"expected {np.dtype(self._float)} values, got {inside.dtype}.")
        with self._lock:  # several threads may observe one pass (the streaming merges' workers)
            self._seen += seen
            self._above += above
            self._inside += inside.size
            if self._hist is None and self._inside <= self.capacity:
                self._kept.append(inside.copy() if copy else inside)
                return
            if self._hist is None:  # over capacity: bin what was kept, and bin from now on
                for kept in self._kept:
                    self._count_into_bins(kept)
                self._kept = []
            self._count_into_bins(inside)

    def end_pass(self) -> None:
        """Close the pass: find the value, or narrow the interval for the next pass."""
        self.passes += 1
        rank = self.k - self._above  # the answer's rank among the values inside [low, high)
        if rank <= 0:  # at or above high: the bracket was too low
            self.low, self.high = self.high, self._top
        elif rank > self._inside:  # below low: the bracket was too high
            self.low, self.high = 0, self.low
        elif self._hist is None:  # every value inside was kept: select among them
            kept = np.concatenate(self._kept) if self._kept else np.empty(0, dtype=self._float)
            position = kept.size - rank
            kept.partition(position)
            self.value = float(kept[position])
        else:  # walk the bins down from the top to the one holding the rank-th largest
            from_top = np.cumsum(self._hist[::-1])
            b = len(self._hist) - 1 - int(np.searchsorted(from_top, rank))
            shift = self._shift()
            self.low, self.high = self.low + (b << shift), min(self.high, self.low + ((b + 1) << shift))
            if self.high - self.low == 1:
                self.value = self._float_of(self.low)
        if self.high <= self.low:  # cannot happen with consistent passes; guard against an endless loop
            raise RuntimeError("KthLargest: the passes did not see the same values.")
        self._start_pass()


def sample_bracket(sample: np.ndarray, n: int, k: int, spread: float = 3.5) -> tuple[float, float]:
    """An interval [low, high) that holds the k-th largest of n values with high probability,
    given a uniform ``sample`` of them: the sample's values at the ranks k·m/n ∓ ``spread``
    binomial standard deviations (m = sample size), the upper one nudged up so that values
    equal to it fall inside. (0, inf) when the sample is empty."""
    m = sample.size
    if m == 0:
        return 0.0, math.inf
    q = min(max(k / n, 0.0), 1.0)
    centre = q * m
    half = spread * math.sqrt(m * q * (1 - q)) + 2
    upper_rank, lower_rank = math.floor(centre - half), math.ceil(centre + half)  # ranks from the top, 1-based
    positions = [m - r for r in (upper_rank, lower_rank) if 1 <= r <= m]  # in ascending order
    ordered = np.partition(sample, positions) if positions else sample
    high = math.inf if upper_rank < 1 else float(np.nextafter(ordered[m - upper_rank], np.inf))
    low = 0.0 if lower_rank > m else float(ordered[m - lower_rank])
    return low, high


def _dare_parts(expert, theta0: torch.Tensor, fuse: bool) -> tuple[torch.Tensor, object]:
    """(tensor, DARE mask or None) for one task's tensor. A ``dare.SparseExpert`` (DARE + TIES)
    gives its raw tensor and its mask where a fused loop will apply them (``fuse``, and the
    loops can take the tensors), and its sparsified tensor otherwise; a tensor is as it is."""
    from . import kernels

    if not isinstance(expert, SparseExpert):
        return expert, None
    if fuse and kernels.fusable(theta0, expert.finetuned):
        return expert.finetuned, expert.mask()
    return expert.dense(), None


def observe_magnitudes(selection: KthLargest, theta0: torch.Tensor, expert, work: torch.dtype) -> None:
    """``selection.observe(|expert − θ0|)`` (θ0 in its working dtype, the magnitudes in
    ``work``; ``expert`` a tensor, or a ``dare.SparseExpert`` whose sparsified τ is ranked): on
    the CPU one fused loop that counts and keeps them without forming them all
    (``kernels.magnitudes_between``), elsewhere or before a bracket with torch operations."""
    from . import kernels  # here, not at the top: numba loads only where a fused loop runs

    interval = selection.interval
    expert, mask = _dare_parts(expert, theta0, fuse=interval is not None and theta0.dtype == work)
    expert = _work(expert)
    if interval is None or expert.dtype != work or not kernels.fusable(theta0, expert):
        selection.observe((expert - theta0).abs_().to(work))
        return
    scratch = np.empty(expert.numel(), dtype=selection.dtype)
    above, inside = kernels.magnitudes_between(theta0, expert, *interval, scratch, mask)
    selection.take(inside, above, expert.numel(), copy=inside.size < expert.numel() // 2)


# The threshold search holds, over all tasks together, about SELECTION_TENSORS of the
# largest tensors' worth of magnitudes: per task, half for its sample, half for the values
# its bracket lets through. A sample of SAMPLE_FRACTION of the entries (at least SAMPLE_MIN)
# within that: its bracket then holds ~0.3-0.5% of the entries at density 0.2 (the width
# shrinks as 1/√sample), which fits for ViT-B/32 and ViT-L/14 alike, and choosing the bracket
# costs a few percent of a read.
SELECTION_TENSORS = 4
SAMPLE_FRACTION = 0.005
SAMPLE_MIN = 2**16


def _selection_sizes(numels: Sequence[int], tasks: int) -> tuple[int, int]:
    """(magnitudes kept per task in a pass, sample size per task) for tensors of ``numels``
    entries: see SELECTION_TENSORS."""
    n = sum(numels)
    per_task = max(SAMPLE_MIN, SELECTION_TENSORS * max(numels) // (2 * tasks))
    return per_task, min(n, per_task, max(SAMPLE_MIN, round(SAMPLE_FRACTION * n)))


# -------------------------------------------------------------------------------- TIES


def _keep_count(n: int, density: float) -> int:
    """How many of a task's ``n`` entries trim keeps: round(density·n), at least 1 when
    density > 0. The one statement of the rule, shared by the in-memory and streaming TIES."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}.")
    n_keep = round(density * n)
    return max(n_keep, 1) if density > 0 else n_keep


def _trivial_threshold(n: int, n_keep: int) -> float | None:
    """The threshold when no ranking is needed: 0 when every entry is kept (|τ| >= 0), inf
    when none is (|τ| >= inf never holds, τ being finite); None when it must be searched."""
    if n_keep >= n:
        return 0.0
    if n_keep == 0:
        return float("inf")
    return None


@torch.no_grad()
def _ties_thresholds(pretrained: StateDict, finetuned: Sequence[StateDict], density: float,
                     keys: Sequence[str]) -> list[float]:
    """Per task, the magnitude of its top-``density`` entry over ``keys`` jointly: the
    n_keep-th largest |τt| (``_keep_count``), ties included."""
    n = sum(pretrained[k].numel() for k in keys)
    n_keep = _keep_count(n, density)
    trivial = _trivial_threshold(n, n_keep)
    if trivial is not None:
        return [trivial] * len(finetuned)
    # Ranked in the working dtype of the first key, for every key (one flat buffer held them).
    work = _work_dtype(pretrained[keys[0]].dtype)
    if pretrained[keys[0]].device.type != "cpu":
        return _ties_thresholds_on_device(pretrained, finetuned, n_keep, keys, work)
    per_task, sample_size = _selection_sizes([pretrained[k].numel() for k in keys], len(finetuned))
    step = max(1, n // sample_size)
    thresholds = []
    for ft in finetuned:
        # A strided sample brackets the threshold; one pass over the magnitudes then finds it
        # exactly (``KthLargest``): a few float operations per entry, where a selection over a
        # flat copy of all n magnitudes costs several times more.
        sample = torch.cat([(_work(ft[k].reshape(-1)[::step]) - _work(pretrained[k].reshape(-1)[::step])).abs_()
                            .to(work) for k in keys])
        selection = KthLargest(n_keep, work, per_task)
        selection.bracket(*sample_bracket(sample.numpy(), n, n_keep))
        while not selection.done:
            for k in keys:
                observe_magnitudes(selection, _work(pretrained[k]), ft[k], work)
            selection.end_pass()
        thresholds.append(selection.value)
    return thresholds


def _ties_thresholds_on_device(pretrained: StateDict, finetuned: Sequence[StateDict], n_keep: int,
                               keys: Sequence[str], work: torch.dtype) -> list[float]:
    """``_ties_thresholds`` on an accelerator: the n_keep-th largest of a flat copy of every
    |τt| by ``kthvalue`` there (``KthLargest`` works in numpy, on the CPU)."""
    n = sum(pretrained[k].numel() for k in keys)
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
        thresholds.append(buffer.kthvalue(n - n_keep + 1).values.item())
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
        out[k] = ties_merge_tensor(pretrained[k], (ft[k] for ft in finetuned), thresholds, disjoint, scale)
    return _in_order(out, pretrained)


def _just_below(threshold: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` value below ``threshold`` (for threshold > 0), else 0: for x in
    ``dtype``, x > _just_below(t) exactly when x >= t and x > 0. ``torch.threshold`` tests
    ``>``, and the trim keeps ``|τ| >= t``."""
    if threshold <= 0:
        return 0.0
    t = torch.tensor(threshold, dtype=dtype)
    return torch.nextafter(t, torch.zeros_like(t)).item()


@torch.no_grad()
def ties_merge_tensor(theta0: torch.Tensor, finetuned: Iterable[torch.Tensor], thresholds: Sequence[float],
                      disjoint: str = "mean", scale: float = 1.0) -> torch.Tensor:
    """TIES for one tensor: θ0 + scale·τ_merged, given each task's trim threshold.

    ``finetuned`` yields the tasks' tensors one at a time (a generator that loads each
    from disk is enough: the streaming merge uses this too), so memory is a few copies of
    one tensor whatever the number of tasks. One pass over the tasks keeps the sums (and for
    "mean" the counts) of the positive and of the negative trimmed entries τ̂t: the elected
    sign is that of their total, and the entries agreeing with it are exactly the positive
    (or negative) ones. A task may also come as a ``dare.SparseExpert`` (DARE + TIES): its
    DARE mask is then applied inside the fused loop (or first, where there is none).

    On the CPU (float32 or float64, contiguous) each task's fold and the final step are one
    fused loop each (``kernels.ties_fold``, ``kernels.ties_finish``); elsewhere, torch
    operations (``_fold``, ``_finish``). The two give the same bits (tested).
    """
    from . import kernels  # here, not at the top: numba loads only where a fused loop runs

    if disjoint not in ("mean", "sum"):
        raise ValueError(f'disjoint must be "mean" or "sum", got {disjoint!r}.')
    dtype = theta0.dtype
    theta0 = _work(theta0)
    mean = disjoint == "mean"
    pos_sum, neg_sum = torch.zeros_like(theta0), torch.zeros_like(theta0)
    pos_count, neg_count = (torch.zeros_like(theta0), torch.zeros_like(theta0)) if mean else (None, None)
    thresholds = iter(thresholds)
    for ft in finetuned:  # not zip(): it would hold the previous tensor while the next is read
        cut = _just_below(next(thresholds), theta0.dtype)
        given = ft
        ft, mask = _dare_parts(ft, theta0, fuse=True)  # DARE + TIES: the mask applied inside the fused loop
        ft = _work(ft)
        if kernels.fusable(theta0, ft):
            if kernels.ties_fold(theta0, ft, cut, pos_sum, neg_sum, pos_count, neg_count, mask):
                given.dense()  # a sparsified entry overflowed: raises, naming the task and key
        else:
            _fold(theta0, ft, cut, pos_sum, neg_sum, pos_count, neg_count)
        del given, ft, mask  # before the next task's tensor is read
    if kernels.fusable(theta0):
        return kernels.ties_finish(theta0, pos_sum, neg_sum, pos_count, neg_count, scale).to(dtype)
    return _finish(theta0, pos_sum, neg_sum, pos_count, neg_count, scale).to(dtype)


def _fold(theta0: torch.Tensor, ft: torch.Tensor, cut: float, pos_sum: torch.Tensor, neg_sum: torch.Tensor,
          pos_count: torch.Tensor | None, neg_count: torch.Tensor | None) -> None:
    """One task's τ̂t into the running sums (and counts), in place, with torch operations.

    Float arithmetic rather than boolean masks (``masked_fill`` and ``torch.where`` cost
    10-30 float operations each on CPU), bit for bit the masked form it replaces: τ̂t's
    positive part is ``threshold(τt, c)`` (τt where τt > c, else 0) with c just below the
    threshold, its negative part ``−threshold(−τt, c)``, and a count adds the part's sign;
    even the sign of a zero entry is unchanged (tested on signed zeros and exact cancellations).
    """
    tau = ft - theta0
    kept_pos = torch.threshold(tau, cut, 0.0)  # τ̂ where > 0, else +0
    pos_sum.add_(kept_pos)
    kept_neg = torch.threshold_(tau.neg_(), cut, 0.0)  # −τ̂ where τ̂ < 0, else +0
    neg_sum.sub_(kept_neg)  # a − b is a + (−b), bit for bit
    if pos_count is not None:
        pos_count.add_(kept_pos.sign_())
        neg_count.add_(kept_neg.sign_())


def _finish(theta0: torch.Tensor, pos_sum: torch.Tensor, neg_sum: torch.Tensor, pos_count: torch.Tensor | None,
            neg_count: torch.Tensor | None, scale: float) -> torch.Tensor:
    """θ0 + scale·(the side of the elected sign: its sum, over its count for the "mean"),
    with torch operations; the sums (and counts) are used up."""
    sign = (pos_sum + neg_sum).sign_()  # the elected sign, from the sums (not the means)
    if pos_count is not None:
        pos_sum.div_(pos_count.clamp_(min=1))
        neg_sum.div_(neg_count.clamp_(min=1))
    if _all_finite(pos_sum) and _all_finite(neg_sum):
        # pos·[s > 0] + neg·[s < 0]: the products by 0 or 1 are exact, and where s = 0 the sum
        # is +0 as selecting gives (pos_sum is never −0: it starts at +0 and only adds
        # positive values and +0, so s is never −0 and pos·[s > 0] is +0 there).
        elected_pos = sign.clamp(min=0)
        elected_neg = sign.clamp_(max=0).neg_()
        merged = pos_sum.mul_(elected_pos).add_(neg_sum.mul_(elected_neg))
    else:  # a sum overflowed to ±inf, and inf·0 is NaN: select instead
        merged = torch.where(sign > 0, pos_sum, torch.where(sign < 0, neg_sum, 0.0))
    return merged.mul_(scale).add_(theta0)
