"""Closed-form merges that stream: safetensors files in, one key at a time (METHODS.md §1).

The merges are those of ``REGISTRY`` (weight averaging, Task Arithmetic, TIES, DARE + TA,
DARE + TIES, Fisher, RegMean), with the same formulas, hyper-parameters and defaults; e.g.
Task Arithmetic θ[k] = θ0[k] + λ Σt (θt[k] − θ0[k]), and TIES

    θ[k] = θ0[k] + λ · Σ_{t ∈ A} τ̂t[k] / |A|,   A = {t : sign τ̂t[k] = s[k]},   s[k] = sign Σt τ̂t[k],

with τ̂t the task vector τt = θt − θ0 trimmed to its k = round(density·n) entries of largest
magnitude over all n entries of the model. They are computed key by key from files instead
of from state dicts in memory, so merging eight ViT-L/14 experts (1.2 GB each in float32)
holds θ0's and one expert's tensor of one key and a few running sums of its size, never
nine models; memory does not grow with the number of experts.

The result is EXACTLY the in-memory method's, bit for bit (``tests/test_streaming_merges.py``
checks every method on every kind of key): each key is computed by the same operations in
the same order. TIES and DARE call their modules' own per-tensor functions
(``ties.ties_merge_tensor``, ``dare.dare_tensor``: DARE's masks are drawn per (seed, task,
key) already, so a key's mask does not depend on the others); averaging, Task Arithmetic,
Fisher and RegMean repeat their module's few lines per key, and the tests hold the two to
the same bits.

    from lib.merging.streaming import merge_to_file, stream_merge
    merge_to_file("ties", "theta0.safetensors", expert_paths, "merged.safetensors", scale=0.3)
    with stream_merge("fisher", None, expert_paths, {"fisher": fisher_paths}) as merged:
        for key, tensor in merged: ...

Passes over the files:

- weight averaging, Task Arithmetic, DARE + TA, Fisher, RegMean: one. Per key, θ0's tensor,
  then each expert's (with its Fisher or Gram) read and folded into running sums, one at a
  time.
- TIES, DARE + TIES: the trim's rank is GLOBAL (over all n entries of a task vector), so the
  merge pass needs each task's threshold, the k-th largest |τt|, first. It is found exactly,
  without sorting or holding the n magnitudes (``ties.KthLargest``): a sample of 0.5% of the
  entries brackets it; one pass counts the magnitudes above the bracket and keeps those
  inside it (~0.3-0.5% of them), and the k-th largest is among those. If the bracket misses
  (an unlucky sample) or lets through more than the memory budget, that pass counts the
  magnitudes into 2^16 bins of their float bit patterns instead (non-negative floats order
  like their bit patterns read as integers), and each further pass narrows to the bin that
  holds the k-th: two such passes pin a float32 to one value. So TIES reads its inputs twice
  and a bit (sample, threshold, merge), three or four times at worst. The threshold is the
  in-memory one (``ties._ties_thresholds``), ties included: the trim keeps |τ| >= threshold.

Cost, against one read of the inputs (``benchmarks/bench_streaming_merges.py``): averaging,
Task Arithmetic and Fisher do one or two float operations per entry and expert besides the
read, and cost a few reads. The element-wise merges (averaging, Task Arithmetic, TIES, DARE)
work through each key in pieces of ``PIECE`` entries, so that a piece of every input and the
running sums stay in the CPU's caches. TIES's and DARE's chains of operations per entry run
as one fused loop each on the CPU (``kernels``, numba): about 1 ns per entry and task for
TIES's threshold pass and again for its merge pass, where torch's one pass per operation
cost 3. What remains: RegMean does T − 1 products (in×in)·(in×out) and a solve per layer, far
longer on a CPU than reading the Grams; DARE draws a random number per entry, inside the
fused loops (a counter-based hash, ``dare``: ~0.3 ns an entry), twice for DARE + TIES;
TIES reads twice. While a merge computes on one key, the files' next
key is already being read from the disk (``_Inputs.keys_ahead``: the operating system's
read-ahead, asked for with ``posix_fadvise``).

Threads (``workers``, by default torch's thread count): the element-wise merges, and TIES's
threshold pass, hand their pieces to that many threads, each reading its pieces of the
inputs (positioned reads, ``os.preadv``, so threads share the files) and merging them; the
pieces come back in order. Every entry is computed alone, so the result is the same bits
for any number of workers (tested), and memory holds a few pieces per worker. The workers
run torch's operations on one thread each (``_on_one_torch_thread``). Fisher and RegMean
work a whole key at a time in the calling thread, on torch's threads: RegMean's products
and solves are what more cores speed up, and running them on another number of threads
would change their rounding (MKL splits the work by thread count), so the streamed result
would no longer equal the in-memory one bit for bit.

Conventions (those of ``lib.merging``, unchanged): buffers (BatchNorm running statistics, or
the keys in ``buffers``) are averaged over the experts, never trimmed or rescaled; tensors
that are not floating point are copied from the reference model (θ0 for Task Arithmetic,
TIES and DARE, the first expert otherwise); every input tensor must be finite, and a NaN or
Inf is a ValueError naming the file and key; all models need the same keys, shapes and
dtypes (checked on the files' headers before any tensor is read).

Deviations from the in-memory methods, and choices:

- Files are read with this module's small reader of the safetensors format
  (``SafetensorsReader``), not ``safetensors.safe_open``. ``safe_open`` maps the file into
  memory and hands out views of the map, and while its handle is open every page touched
  stays in this process's resident set: a pass over eight experts would show eight experts
  resident. Its "pread" backend (safetensors 0.8) copies instead, but reading part of a
  tensor through it costs as much as reading all of it, and the TIES sample reads small
  parts of every tensor. The reader copies each tensor (or a run of it) into memory the
  process owns with one ``readinto``; its bytes are those ``safetensors.torch.load_file``
  returns (tested). Files are written by ``write_safetensors``, header first, then one
  tensor at a time; they are ordinary safetensors files.
- Keys come in the order of the reference file's data, which is also the order of
  ``safetensors.torch.load_file``'s dict (so TIES ranks in the same dtype, that of the first
  key, as the in-memory merge of the loaded dicts does).
- Errors about a tensor's values (a NaN, a singular RegMean Gram) are raised when the pass
  reaches that key: keys ``stream_merge`` has yielded stay yielded, while ``merge_to_file``
  writes to a temporary file and renames it into place only when the merge has finished.
- Statistics: ``stats["fisher"]`` and ``stats["gram"]`` are paths to one safetensors file per
  expert (holding the keys that have a Fisher or a Gram, as the in-memory ``stats`` dicts
  do), and ``stats["gram_counts"]`` the per-expert row counts, as for ``REGISTRY["regmean"]``.
- SLERP and gradient matching do not stream (not needed yet; both are per key and could).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import sys
import tempfile
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from ._common import (_all_finite, _check_finite, _check_nonempty, _check_numbers, _check_same_layout, _float_keys,
                      _has_statistic, _normalized, _without, _work, _work_dtype, buffer_keys, in_step)
from .dare import SparseExpert
from .registry import REGISTRY
from .regmean import regmean_weight
from .ties import (KthLargest, _keep_count, _selection_sizes, _trivial_threshold, observe_magnitudes,
                   sample_bracket, ties_merge_tensor)

__all__ = ["DEVICE_METHODS", "STREAMING_METHODS", "MergeStream", "SafetensorsReader", "merge_to_file", "read_inputs",
           "stream_merge", "write_safetensors"]

PathLike = str | os.PathLike

STREAMING_METHODS = ("weight_average", "task_arithmetic", "ties", "dare_ta", "dare_ties", "fisher", "regmean")
DEVICE_METHODS = ("fisher", "regmean")  # key-at-a-time arithmetic, which ``device`` may move off the CPU

# ---------------------------------------------------------------------------- file format
# A safetensors file: 8 bytes (little-endian u64) giving the header's length N, N bytes of
# JSON {key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
# then the data, every tensor's bytes contiguous and little-endian, offsets relative to it.

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_DTYPES.update({name: getattr(torch, attr) for name, attr in (
    ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
    if hasattr(torch, attr)})
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # the format's own bound on the header's size
_PREADV = hasattr(os, "preadv")  # Linux, the BSDs, macOS 11+; not Windows


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    """A contiguous tensor's storage as a writable uint8 array (no copy)."""
    return t.reshape(-1).view(torch.uint8).numpy()


class SafetensorsReader:
    """One safetensors file, read one tensor at a time into memory this process owns.

    ``keys`` lists the tensors in storage order, ``layout`` maps each to a meta tensor of its
    shape and dtype (no memory), ``metadata`` is the header's string dict. ``read(key)``
    returns a fresh tensor (the caller may modify it), ``read_flat(key, start, count)`` the
    entries ``start:start + count`` of its flattened form. Use as a context manager, or
    ``close()``.
    """

    def __init__(self, path: PathLike):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors data is little-endian; this reader runs on little-endian machines only.")
        self.path = Path(path)
        self._file = open(self.path, "rb", buffering=0)
        self._lock = contextlib.nullcontext() if _PREADV else threading.Lock()
        try:
            self._parse_header()
        except Exception:
            self._file.close()
            raise

    def _parse_header(self) -> None:
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise ValueError(f"{self.path} is not a safetensors file: {size} bytes, shorter than the 8-byte "
                             "length of its header.")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{self.path} is not a safetensors file (header length {n} for a file of {size} bytes).")
        try:
            header = json.loads(self._file.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{self.path}: the safetensors header is not valid JSON ({err}).") from None
        self.metadata: dict[str, str] = dict(header.pop("__metadata__", None) or {})
        self._data_start = 8 + n
        data_size = size - self._data_start
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        for key, info in header.items():
            dtype = _DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise ValueError(f"{self.path}[{key!r}]: dtype {info.get('dtype')!r} is not one this reader knows "
                                 f"({sorted(_DTYPES)}).")
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
            if end - begin != math.prod(shape) * dtype.itemsize or not 0 <= begin <= end <= data_size:
                raise ValueError(f"{self.path}[{key!r}]: data_offsets {[begin, end]} do not fit shape {list(shape)} "
                                 f"of {info['dtype']} in {data_size} data bytes; the file is damaged.")
            self._entries[key] = (dtype, shape, begin)
        self.keys: list[str] = sorted(self._entries, key=lambda k: self._entries[k][2])
        self.layout: dict[str, torch.Tensor] = {
            k: torch.empty(self._entries[k][1], dtype=self._entries[k][0], device="meta") for k in self.keys}

    def _read_into(self, out: torch.Tensor, offset: int) -> None:
        # Positioned reads (pread) share no file position, so several threads can read one
        # file at once (the merges' workers); where the platform has none, one at a time.
        view, done, position = memoryview(_as_bytes(out)), 0, self._data_start + offset
        with self._lock:
            while done < len(view):
                if _PREADV:
                    got = os.preadv(self._file.fileno(), [view[done:]], position + done)
                else:
                    self._file.seek(position + done)
                    got = self._file.readinto(view[done:])
                if not got:
                    raise ValueError(f"{self.path} ends before its data does; the file is truncated.")
                done += got

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key``, in a fresh CPU tensor."""
        dtype, shape, begin = self._entry(key)
        out = torch.empty(shape, dtype=dtype)
        if out.numel():
            self._read_into(out, begin)
        return out

    def read_flat(self, key: str, start: int, count: int) -> torch.Tensor:
        """Entries ``start:start + count`` of the flattened tensor ``key`` (1-D)."""
        dtype, shape, begin = self._entry(key)
        if not 0 <= start <= start + count <= math.prod(shape):
            raise IndexError(f"{self.path}[{key!r}]: entries {start}:{start + count} of {math.prod(shape)}.")
        out = torch.empty(count, dtype=dtype)
        if count:
            self._read_into(out, begin + start * dtype.itemsize)
        return out

    def prefetch(self, key: str, start: int = 0, count: int | None = None) -> None:
        """Ask the operating system to start reading ``key``'s bytes (or entries ``start:start +
        count`` of it flattened) from the disk now, in the background (``POSIX_FADV_WILLNEED``),
        so that a later ``read`` finds them cached. A hint: where the platform has no such call,
        nothing happens."""
        if hasattr(os, "posix_fadvise"):
            dtype, shape, begin = self._entry(key)
            count = math.prod(shape) - start if count is None else count
            if count:
                os.posix_fadvise(self._file.fileno(), self._data_start + begin + start * dtype.itemsize,
                                 count * dtype.itemsize, os.POSIX_FADV_WILLNEED)

    def _entry(self, key: str):
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"{self.path} has no tensor {key!r}.") from None

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_safetensors(path: PathLike, tensors: Iterable[tuple[str, torch.Tensor]], layout: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` (pairs (key, tensor), in ``layout``'s order) to a safetensors file,
    one at a time: the header is written first from ``layout`` (key -> a tensor of the right
    shape and dtype, e.g. on the meta device), so no more than one tensor is ever held here.

    The file appears at ``path`` only once every tensor is written (a temporary file in the
    same folder is renamed), so a failure midway leaves no partial file.
    """
    path = Path(path)
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for key, t in layout.items():
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{key!r}: dtype {t.dtype} cannot be written to safetensors.")
        nbytes = t.numel() * t.dtype.itemsize
        header[key] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            expected = iter(layout.items())
            for key, tensor in tensors:
                want_key, want = next(expected, (None, None))
                if key != want_key or tensor.shape != want.shape or tensor.dtype != want.dtype:
                    announced = f"{want_key!r} {tuple(want.shape)} {want.dtype}" if want is not None else "none"
                    raise ValueError(f"got {key!r} {tuple(tensor.shape)} {tensor.dtype}, but the layout's next entry "
                                     f"is {announced}.")
                if tensor.numel():
                    f.write(memoryview(_as_bytes(tensor.detach().cpu().contiguous())))
            missing = [k for k, _ in expected]
            if missing:
                raise ValueError(f"the tensors ended before the layout: {missing[:5]} were not written.")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


# ------------------------------------------------------------------------ the inputs


@dataclass
class _Inputs:
    """The open files of one merge (and RegMean's row counts)."""

    pretrained: SafetensorsReader | None
    finetuned: list[SafetensorsReader]
    fisher: list[SafetensorsReader] | None = None
    gram: list[SafetensorsReader] | None = None
    gram_counts: Sequence[Mapping[str, int]] | None = None
    workers: int = 1  # threads computing pieces (``_in_order``)
    device: torch.device = torch.device("cpu")  # where Fisher's and RegMean's per-key arithmetic runs

    def readers(self) -> list[SafetensorsReader]:
        everything = [self.pretrained, *self.finetuned, *(self.fisher or []), *(self.gram or [])]
        return [r for r in everything if r is not None]

    def keys_ahead(self, keys: Sequence[str]) -> Iterator[str]:
        """``keys`` in order; as each is handed out, every file that holds the next one starts
        reading it from the disk in the background (``SafetensorsReader.prefetch``). So the
        disk reads key k + 1 while the merge computes on key k: from the disk, a merge costs
        about the larger of its reads and its arithmetic, not their sum."""
        readers = self.readers()
        for i, key in enumerate(keys):
            if i + 1 < len(keys):
                for r in readers:
                    if keys[i + 1] in r.layout:
                        r.prefetch(keys[i + 1])
            yield key

    def close(self) -> None:
        for r in self.readers():
            r.close()


def _label(what: str, reader: SafetensorsReader) -> str:
    return f"{what} ({reader.path})"


def _load_checked(reader: SafetensorsReader, key: str, what: str,
                  piece: tuple[int, int] | None = None) -> torch.Tensor:
    """``reader.read(key)`` (or, with ``piece`` = (start, count), ``reader.read_flat(key, start,
    count)``), refusing a float tensor with a NaN or ±Inf entry (as every merge refuses one in
    memory), the message naming ``what`` (e.g. "finetuned[2]") and the file."""
    x = reader.read(key) if piece is None else reader.read_flat(key, *piece)
    if torch.is_floating_point(x) and not _all_finite(x):
        _check_finite({key: x}, _label(what, reader))
    return x


def _expert_tensors(inputs: _Inputs, key: str, piece: tuple[int, int] | None = None) -> Iterator[torch.Tensor]:
    """The experts' tensors of ``key`` (or their ``piece``), read one at a time as the consumer
    asks for them."""
    return (_load_checked(r, key, f"finetuned[{t}]", piece) for t, r in enumerate(inputs.finetuned))


def _on_device(tensors: Iterable[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
    """``tensors`` moved to ``device`` one at a time, as the consumer asks for them (``map``:
    unlike a generator's frame, it keeps no reference to the tensor it last handed out)."""
    return map(lambda x: x.to(device), tensors)


# Element-wise merges (averaging, Task Arithmetic, TIES, DARE) work through a key PIECE entries
# at a time, every input's piece of it in turn: a piece of θ0, of an expert, the running sums
# and the temporaries then stay in the CPU's caches (1 MiB per float32 piece), where whole
# tensors (9 MiB per input for a ViT-B/32 MLP weight, ~60 MiB with the sums) go to memory and
# back for every torch operation: 4-5× slower per entry (AMD EPYC, 1 thread, before TIES and
# DARE were fused). The result is the same bits: every operation is per entry.
PIECE = 2**18


def _pieces(numel: int) -> Iterator[tuple[int, int]]:
    """(start, count) of each piece of a flat tensor of ``numel`` entries."""
    for start in range(0, numel, PIECE):
        yield start, min(PIECE, numel - start)


def _key_pieces(inputs: _Inputs, keys: Sequence[str], layout: Mapping[str, torch.Tensor]
                ) -> Iterator[tuple[str, int, int]]:
    """(key, start, count) of every piece of ``keys`` in order, each file asked for the next
    key as a key's first piece is handed out (``_Inputs.keys_ahead``)."""
    for k in inputs.keys_ahead(keys):
        for start, count in _pieces(layout[k].numel()):
            yield k, start, count


def _open_all(paths: Sequence[PathLike] | None, opened: list[SafetensorsReader]) -> list[SafetensorsReader] | None:
    if paths is None:
        return None
    readers = []
    for p in paths:
        readers.append(SafetensorsReader(p))
        opened.append(readers[-1])
    return readers


def _check_stat_layout(stat: SafetensorsReader, params: Mapping[str, torch.Tensor], label: str, shape_of=None) -> None:
    """A statistic file's keys name parameters, with the shape the merge expects (as
    ``_check_stats`` checks in memory; its values are checked when read)."""
    for k, v in stat.layout.items():
        if k not in params:
            raise ValueError(f"{label} has key {k!r}, which is not among the parameters merged.")
        want = shape_of(params[k]) if shape_of else tuple(params[k].shape)
        if tuple(v.shape) != want:
            raise ValueError(f"{label}[{k!r}] has shape {tuple(v.shape)}, expected {want} for parameter "
                             f"of shape {tuple(params[k].shape)}.")


# -------------------------------------------------------------------- per-key merges
# Each repeats its in-memory module's arithmetic for one key, op for op: floating-point
# sums depend on their order, and "exactly the same result" means the same bits. (RegMean's
# is the in-memory one itself: ``regmean.regmean_weight`` reads its inputs one at a time.)


def _average(tensors: Iterable[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ wt·xt in the working dtype, returned in the input dtype (``averaged_buffers``'s sum)."""
    it = iter(tensors)
    first = next(it)
    dtype, acc = first.dtype, _work(first) * weights[0]
    del first  # each input is dropped before the next is read
    for t, x in in_step(it):
        acc.add_(_work(x), alpha=weights[t + 1])
        del x
    return acc.to(dtype)


def _task_arithmetic(theta0: torch.Tensor, finetuned: Iterable[torch.Tensor], scale: float) -> torch.Tensor:
    """θ0 + scale·Σt (θt − θ0) for one tensor (``task_arithmetic``'s loop)."""
    dtype, theta0 = theta0.dtype, _work(theta0)
    it = iter(finetuned)
    tau_sum = _work(next(it)) - theta0
    for x in it:
        tau_sum.add_(_work(x)).sub_(theta0)
        del x  # dropped before the next is read
    return tau_sum.mul_(scale).add_(theta0).to(dtype)


def _fisher(finetuned: Iterable[torch.Tensor], fishers: Iterable[torch.Tensor], weights: Sequence[float],
            average_weights: Sequence[float], eps: float) -> torch.Tensor:
    """Σ wt Ft θt / (den + eps·mean(den)), den = Σ wt Ft, or the weighted average (with
    ``average_weights``) where den = 0, for one tensor (``fisher_merging``'s loop and its
    ``_average`` fallback)."""
    num = den = avg = None
    for t, x, f in in_step(finetuned, fishers):
        if num is None:
            out_dtype, dtype = x.dtype, _work_dtype(x.dtype)
            num = torch.zeros(x.shape, dtype=dtype, device=x.device)
            den = torch.zeros_like(num)
            avg = _work(x) * average_weights[0]
        else:
            avg.add_(_work(x), alpha=average_weights[t])
        wf = f.to(dtype) * weights[t]
        den.add_(wf)
        num.add_(wf.mul_(_work(x)))
        del wf, x, f
    merged = num.div_(den + eps * den.mean())
    average = _work(avg.to(out_dtype))
    return torch.where(den == 0, average, merged).to(out_dtype)


# ------------------------------------------------------------- TIES's exact threshold
# The search itself (``KthLargest``, ``sample_bracket``, the memory budget) is in ties.py,
# shared with the in-memory TIES; here, the sample and the passes read from files.

SAMPLE_RUNS = 8  # contiguous runs per large tensor, spread over it (one read each)
SAMPLE_WHOLE = 2**14  # tensors up to this size are read whole and sampled at even steps


def _sample_runs(numel: int, count: int) -> list[tuple[int, int]]:
    """The (start, length) runs of a flattened tensor of ``numel`` entries that ``_read_sample``
    reads for about ``count`` of them: the whole tensor when it is small, else SAMPLE_RUNS
    contiguous runs spread over it. Few reads per tensor: a read costs more than the entries it brings."""
    count = min(count, numel)
    if count <= 0:
        return []
    if numel <= SAMPLE_WHOLE:
        return [(0, numel)]
    runs = max(1, min(SAMPLE_RUNS, count // 64))
    length, stride = count // runs, numel // runs
    return [(i * stride + (stride - length) // 2, length) for i in range(runs)]


def _read_sample(reader: SafetensorsReader, key: str, count: int) -> torch.Tensor:
    """About ``count`` entries of ``key`` (flattened), the same ones from every file: a small
    tensor is read whole and taken at even steps, a large one as ``_sample_runs``' runs."""
    numel = reader.layout[key].numel()
    runs = _sample_runs(numel, count)
    if not runs:
        return reader.read_flat(key, 0, 0)
    if numel <= SAMPLE_WHOLE:
        count = min(count, numel)
        return reader.read(key).reshape(-1)[torch.arange(count) * numel // count]
    return torch.cat([reader.read_flat(key, start, length) for start, length in runs])


@dataclass
class _TaskVectors:
    """How the ranked |τt| of one key are formed: from the expert's tensor (TIES), or from its
    DARE-sparsified tensor (DARE + TIES, whose random masks exist only per whole tensor, so
    the sample stands in a Bernoulli(1 − p) mask of its own, rescaled by 1/(1 − p))."""

    drop_rate: float | None = None
    seed: int = 0

    def expert(self, theta0: torch.Tensor, x: torch.Tensor, task: int, key: str, offset: int):
        """The piece (from entry ``offset`` of ``key``) that TIES merges for this expert: θt's,
        or DARE's sparse θt's, with the mask applied as it is used (``dare.SparseExpert``)."""
        if self.drop_rate is None:
            return x
        return SparseExpert(theta0, x, self.drop_rate, self.seed, task, key, offset)

    def sample(self, theta0: torch.Tensor, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        tau = (_work(x) - _work(theta0)).abs_()
        if self.drop_rate is None:
            return tau
        keep = torch.rand(tau.shape, generator=generator) >= self.drop_rate
        return tau.mul_(keep).div_(1.0 - self.drop_rate)


def _ties_thresholds(inputs: _Inputs, keys: Sequence[str], density: float, vectors: _TaskVectors,
                     capacity: int | None = None, use_sample: bool = True) -> list[float]:
    """Each task's trim threshold, the n_keep-th largest |τt| over ``keys`` jointly, exactly
    as ``ties._ties_thresholds`` finds it in memory (in the first key's working dtype, as its
    flat buffer holds them), in one pass over the inputs after a small sample, unless the
    sample misleads. ``capacity``: magnitudes kept per task in a pass (default: see
    ``ties.SELECTION_TENSORS``)."""
    layout = inputs.pretrained.layout
    n = sum(layout[k].numel() for k in keys)
    n_keep = _keep_count(n, density)
    trivial = _trivial_threshold(n, n_keep)
    if trivial is not None:
        return [trivial] * len(inputs.finetuned)
    work = _work_dtype(layout[keys[0]].dtype)
    per_task, sample_size = _selection_sizes([layout[k].numel() for k in keys], len(inputs.finetuned))
    selections = [KthLargest(n_keep, work, per_task if capacity is None else capacity) for _ in inputs.finetuned]
    if use_sample:
        brackets = _sampled_brackets(inputs, keys, n, n_keep, vectors, work, sample_size / n)
        for selection, (low, high) in zip(selections, brackets):
            selection.bracket(low, high)

    def observe_piece(piece: tuple[str, int, int]) -> None:
        k, start, count = piece
        theta0 = _load_checked(inputs.pretrained, k, "pretrained", (start, count))
        theta0_work = _work(theta0)
        for t, (reader, selection) in enumerate(zip(inputs.finetuned, selections)):
            if selection.done:
                continue
            x = _load_checked(reader, k, f"finetuned[{t}]", (start, count))
            x = vectors.expert(theta0, x, t, k, start)
            observe_magnitudes(selection, theta0_work, x, work)  # thread-safe: KthLargest.take locks
            del x

    while not all(s.done for s in selections):
        for _ in _in_order(observe_piece, _key_pieces(inputs, keys, layout), inputs.workers):
            pass
        for s in selections:
            if not s.done:
                s.end_pass()
    return [s.value for s in selections]


def _sampled_brackets(inputs: _Inputs, keys: Sequence[str], n: int, n_keep: int, vectors: _TaskVectors,
                      work: torch.dtype, fraction: float) -> list[tuple[float, float]]:
    """Per task, ``sample_bracket`` of |τt| on about ``fraction`` of every key's entries,
    the same ones in θ0 and each expert (``_read_sample``)."""
    layout = inputs.pretrained.layout
    samples: list[list[torch.Tensor]] = [[] for _ in inputs.finetuned]
    generator = torch.Generator().manual_seed(vectors.seed)
    counts = {k: math.ceil(fraction * layout[k].numel()) for k in keys}
    # Every run asked of the disk at once: read one after another, thousands of small reads
    # each waited for the disk (8 ViT-B/32-sized experts: 0.6 s, 0.25 s with these hints).
    for k in keys:
        for start, length in _sample_runs(layout[k].numel(), counts[k]):
            for reader in (inputs.pretrained, *inputs.finetuned):
                reader.prefetch(k, start, length)
    for k in keys:
        count = counts[k]
        theta0 = _read_sample(inputs.pretrained, k, count)
        for t, reader in enumerate(inputs.finetuned):
            samples[t].append(vectors.sample(theta0, _read_sample(reader, k, count), generator).to(work))
    brackets = []
    for parts in samples:
        sample = torch.cat(parts).numpy() if parts else np.empty(0, dtype=np.float32)
        if not np.isfinite(sample).all():  # a NaN in the inputs: the full pass will name it
            brackets.append((0.0, math.inf))
        else:
            brackets.append(sample_bracket(sample, n, n_keep))
    return brackets


# ------------------------------------------------------------------ the merges, streamed


def _merge_keys(ref: SafetensorsReader, buffers: Collection[str] | None) -> tuple[list[str], list[str]]:
    """(buffer keys, other float keys) of the reference layout, in storage order."""
    names = buffer_keys(ref.layout, buffers)
    return names, _without(_float_keys(ref.layout), names)


def _in_order(compute: Callable, items: Iterable, workers: int) -> Iterator:
    """``compute(item)`` for each of ``items``, in their order. With several ``workers``,
    threads compute up to 2·workers items ahead of the one handed out (so memory holds a
    few items' inputs and results, however many items there are); with one, each in turn."""
    if workers <= 1:
        for item in items:
            yield compute(item)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="stream-merge")
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(_on_one_torch_thread, compute, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # also when the consumer stops early or a piece failed: no thread outlives the stream
        pool.shutdown(wait=True, cancel_futures=True)


def _on_one_torch_thread(compute: Callable, item):
    """``compute(item)`` with torch's operations in this thread on one thread each: the
    workers are the parallelism, and each also splitting its operations over every core
    would put several threads on each core (TIES took 5.0 s instead of 4.4 on 2 cores).
    ``torch.set_num_threads`` called in a worker sets that thread's OpenMP and MKL counts
    (and the default of threads created later, restored when the piece is done); the
    calling thread's own count is untouched."""
    threads = torch.get_num_threads()
    if threads == 1:
        return compute(item)
    torch.set_num_threads(1)
    try:
        return compute(item)
    finally:
        torch.set_num_threads(threads)


def _piecewise(inputs: _Inputs, ref: SafetensorsReader,
               merge_piece: Callable[[str, int, int], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every key of ``ref`` in order, each assembled from ``merge_piece(key, start, count)``
    (its flat entries start:start + count) over its pieces, computed by ``inputs.workers``
    threads. Every entry is computed alone, so the threads change no bit. Each piece is
    copied into its key's tensor by the thread that computed it: this thread does no torch
    operation while they work (its own OpenMP threads would spin on the workers' cores)."""
    def pieces() -> Iterator[tuple[str, torch.Tensor, int, int]]:
        out = None
        for k, start, count in _key_pieces(inputs, ref.keys, ref.layout):
            if start == 0:  # a key's first piece: its tensor, which its pieces fill
                out = torch.empty(ref.layout[k].numel(), dtype=ref.layout[k].dtype)
            yield k, out, start, count

    def fill(piece: tuple[str, torch.Tensor, int, int]) -> torch.Tensor:
        k, out, start, count = piece
        out[start:start + count] = merge_piece(k, start, count)
        return out

    filled = _in_order(fill, pieces(), inputs.workers)
    try:
        for k in ref.keys:
            like = ref.layout[k]
            out = torch.empty(0, dtype=like.dtype)
            for _ in _pieces(like.numel()):
                out = next(filled)
            yield k, out.view(like.shape)
    finally:
        filled.close()


def _stream_weight_average(inputs: _Inputs, hyper) -> Iterator[tuple[str, torch.Tensor]]:
    ref = inputs.finetuned[0]
    weights = _normalized(None, len(inputs.finetuned))
    floats = set(_float_keys(ref.layout))

    def merge_piece(k, start, count):
        if k in floats:
            return _average(_expert_tensors(inputs, k, (start, count)), weights)
        return ref.read_flat(k, start, count)

    return _piecewise(inputs, ref, merge_piece)


def _stream_with_theta0(inputs: _Inputs, hyper, merge_piece: Callable[[str, torch.Tensor, int, int], torch.Tensor]):
    """The loop of Task Arithmetic, TIES and DARE: non-float tensors from θ0, buffers averaged
    over the experts, every other key merged piece by piece, ``merge_piece(key, θ0's piece,
    start, count)``."""
    ref = inputs.pretrained
    buffer_names, others = _merge_keys(ref, hyper.get("buffers"))
    buffer_set, merged = set(buffer_names), set(others)
    weights = _normalized(None, len(inputs.finetuned))

    def piece(k, start, count):
        if k in buffer_set:
            return _average(_expert_tensors(inputs, k, (start, count)), weights)
        if k in merged:
            return merge_piece(k, _load_checked(ref, k, "pretrained", (start, count)), start, count)
        return ref.read_flat(k, start, count)

    return _piecewise(inputs, ref, piece)


def _sparse_experts(inputs: _Inputs, key: str, theta0: torch.Tensor, start: int, count: int, drop_rate: float,
                    seed: int, dense: bool = True) -> Iterator[torch.Tensor | SparseExpert]:
    """Each expert's DARE piece ``start:start + count`` of ``key``, one at a time: the sparse
    tensor, refused (like the in-memory merge that follows ``dare``) where it is not finite;
    or with ``dense=False`` a ``SparseExpert`` whose mask TIES applies in its fused loop."""
    for t, x in in_step(_expert_tensors(inputs, key, (start, count))):
        expert = SparseExpert(theta0, x, drop_rate, seed, t, key, start)
        del x
        if dense:
            expert = expert.dense()
        yield expert
        del expert  # before the next is read


def _stream_task_arithmetic(inputs, hyper):
    scale = hyper["scale"]
    return _stream_with_theta0(inputs, hyper, lambda k, theta0, start, count: _task_arithmetic(
        theta0, _expert_tensors(inputs, k, (start, count)), scale))


def _stream_dare_ta(inputs, hyper):
    scale, p, seed = hyper["scale"], hyper["drop_rate"], hyper["seed"]
    return _stream_with_theta0(inputs, hyper, lambda k, theta0, start, count: _task_arithmetic(
        theta0, _sparse_experts(inputs, k, theta0, start, count, p, seed), scale))


def _stream_ties_family(inputs, hyper, vectors: _TaskVectors):
    _, keys = _merge_keys(inputs.pretrained, hyper.get("buffers"))
    thresholds = _ties_thresholds(inputs, keys, hyper["density"], vectors, capacity=hyper.get("_capacity"),
                                  use_sample=hyper.get("_sample", True)) if keys else []
    scale, disjoint = hyper["scale"], hyper["disjoint"]

    def merge_piece(k, theta0, start, count):
        if vectors.drop_rate is None:
            experts = _expert_tensors(inputs, k, (start, count))
        else:
            experts = _sparse_experts(inputs, k, theta0, start, count, vectors.drop_rate, vectors.seed, dense=False)
        return ties_merge_tensor(theta0, experts, thresholds, disjoint, scale)

    yield from _stream_with_theta0(inputs, hyper, merge_piece)


def _stream_ties(inputs, hyper):
    return _stream_ties_family(inputs, hyper, _TaskVectors())


def _stream_dare_ties(inputs, hyper):
    return _stream_ties_family(inputs, hyper, _TaskVectors(hyper["drop_rate"], hyper["seed"]))


def _stream_fisher(inputs: _Inputs, hyper):
    ref, eps = inputs.finetuned[0], hyper["eps"]
    weights = _normalized(None, len(inputs.finetuned))
    # fisher_merging averages with _normalized(weights): normalised once more, which can move
    # a weight by an ulp (1/7 · 7 is not exactly 1), so this does too.
    average_weights = _normalized(weights, len(weights))
    others = _merge_keys(ref, hyper.get("buffers"))[1]
    with_fisher = {k for k in others if _has_statistic(k, [f.layout for f in inputs.fisher], "Fisher")}
    floats = set(_float_keys(ref.layout))
    for k in inputs.keys_ahead(ref.keys):
        if k in with_fisher:
            fishers = (_load_checked(f, k, f"fishers[{t}]") for t, f in enumerate(inputs.fisher))
            yield k, _fisher(_on_device(_expert_tensors(inputs, k), inputs.device),
                             _on_device(fishers, inputs.device), weights, average_weights, eps).cpu()
        elif k in floats:
            yield k, _average(_expert_tensors(inputs, k), average_weights)
        else:
            yield k, ref.read(k)


def _stream_regmean(inputs: _Inputs, hyper):
    ref = inputs.finetuned[0]
    alpha, ridge = hyper["alpha"], hyper["ridge"]
    weights = _normalized(None, len(inputs.finetuned))
    others = _merge_keys(ref, hyper.get("buffers"))[1]
    with_gram = {k for k in others if _has_statistic(k, [g.layout for g in inputs.gram], "Gram")}
    floats = set(_float_keys(ref.layout))
    for k in inputs.keys_ahead(ref.keys):
        if k in with_gram:
            counts = None if inputs.gram_counts is None else [
                _row_count(c, t, k) for t, c in enumerate(inputs.gram_counts)]
            grams = (_load_checked(g, k, f"grams[{t}]") for t, g in enumerate(inputs.gram))
            yield k, regmean_weight(_on_device(_expert_tensors(inputs, k), inputs.device),
                                    _on_device(grams, inputs.device), counts, alpha, ridge, k).cpu()
        elif k in floats:
            yield k, _average(_expert_tensors(inputs, k), weights)
        else:
            yield k, ref.read(k)


def _row_count(counts: Mapping[str, int], task: int, key: str) -> int:
    if key not in counts:
        raise ValueError(f"gram_counts[{task}] has no entry for {key!r}; pass the counts that "
                         "gram_matrices(..., return_counts=True) returned with the Grams.")
    n = counts[key]
    if n <= 0:
        raise ValueError(f"gram_counts[{task}][{key!r}] is {n}: a Gram over no rows cannot be normalised.")
    return n


_STREAMS = {"weight_average": _stream_weight_average, "task_arithmetic": _stream_task_arithmetic,
            "ties": _stream_ties, "dare_ta": _stream_dare_ta, "dare_ties": _stream_dare_ties,
            "fisher": _stream_fisher, "regmean": _stream_regmean}
_USES_THETA0 = {"task_arithmetic", "ties", "dare_ta", "dare_ties"}


# ------------------------------------------------------------------- checks, public API


def _hyper(method: str, hyper: dict) -> dict:
    """The registry entry's checks and defaults (``MergeMethod.__call__``), without merging."""
    if method not in _STREAMS:
        raise ValueError(f"{method!r} does not stream; the methods that do: {list(STREAMING_METHODS)}.")
    entry = REGISTRY[method]
    # Switches for tests: _sample=False (no sampled bracket), _capacity=n (values kept per pass).
    private = {k: hyper.pop(k) for k in list(hyper) if k in ("_sample", "_capacity")}
    hyper = entry.with_defaults(hyper)
    _check_numbers(method, **{k: v for k, v in hyper.items() if k != "buffers"})
    if "drop_rate" in hyper and not 0.0 <= hyper["drop_rate"] < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {hyper['drop_rate']}.")
    if "density" in hyper:
        _keep_count(0, hyper["density"])  # raises outside [0, 1]
    if "disjoint" in hyper and hyper["disjoint"] not in ("mean", "sum"):
        raise ValueError(f'disjoint must be "mean" or "sum", got {hyper["disjoint"]!r}.')
    if method == "fisher" and hyper["eps"] < 0:
        raise ValueError(f"eps must be >= 0, got {hyper['eps']}.")
    if method == "regmean":
        if not 0.0 <= hyper["alpha"] <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {hyper['alpha']}.")
        if hyper["ridge"] < 0:
            raise ValueError(f"ridge must be >= 0, got {hyper['ridge']}.")
        if hyper["gram_normalization"] not in ("mean", "sum"):
            raise ValueError(f'gram_normalization must be "mean" or "sum", got {hyper["gram_normalization"]!r}.')
    return {**hyper, **private}


def _open_inputs(method: str, pretrained, finetuned, stats, hyper) -> _Inputs:
    """Open every file the method reads and check what the headers can tell: one layout for
    all models, statistics naming known keys with the right shapes."""
    stats = {} if stats is None else stats
    _check_nonempty(finetuned, "finetuned")
    missing = [s for s in REGISTRY[method].needs if s not in stats]
    if missing:
        raise ValueError(f"{method} needs the statistics {missing} in stats (it has {sorted(stats)}): one "
                         "safetensors file per expert.")
    if method in _USES_THETA0 and pretrained is None:
        raise ValueError(f"{method} needs the pretrained model θ0's file.")
    opened: list[SafetensorsReader] = []
    try:
        inputs = _Inputs(pretrained=_open_all([pretrained], opened)[0] if method in _USES_THETA0 else None,
                         finetuned=_open_all(finetuned, opened))
        models = ([inputs.pretrained] if inputs.pretrained is not None else []) + inputs.finetuned
        labels = (["pretrained"] if inputs.pretrained is not None else []) + [
            f"finetuned[{i}]" for i in range(len(inputs.finetuned))]
        _check_same_layout([m.layout for m in models], [_label(label, m) for label, m in zip(labels, models)])
        params = inputs.finetuned[0].layout
        if method == "fisher":
            inputs.fisher = _open_all(stats["fisher"], opened)
            if len(inputs.fisher) != len(inputs.finetuned):
                raise ValueError(f"got {len(inputs.fisher)} Fisher files for {len(inputs.finetuned)} models.")
            for t, f in enumerate(inputs.fisher):
                _check_stat_layout(f, params, _label(f"fishers[{t}]", f))
        if method == "regmean":
            inputs.gram = _open_all(stats["gram"], opened)
            if len(inputs.gram) != len(inputs.finetuned):
                raise ValueError(f"got {len(inputs.gram)} Gram files for {len(inputs.finetuned)} models.")
            if hyper["gram_normalization"] == "mean":
                counts = stats.get("gram_counts")
                if counts is None:
                    raise ValueError(
                        'RegMean with gram_normalization="mean" divides each Gram by its number of rows: pass '
                        'stats["gram_counts"] (from lib.statistics.gram_matrices(..., return_counts=True)), or '
                        'gram_normalization="sum" to use the Grams as given.')
                if len(counts) != len(inputs.gram):
                    raise ValueError(f"got {len(counts)} count dicts for {len(inputs.gram)} Gram files.")
                inputs.gram_counts = counts
            for t, g in enumerate(inputs.gram):
                for k in g.layout:
                    if k in params and params[k].dim() != 2:
                        raise ValueError(f"grams[{t}] has key {k!r}, but {k!r} is not a 2-D (out×in) weight "
                                         "(flatten conv weights to (out, in·kh·kw) first).")
                _check_stat_layout(g, params, _label(f"grams[{t}]", g), shape_of=lambda w: (w.shape[1], w.shape[1]))
        return inputs
    except BaseException:
        for r in opened:
            r.close()
        raise


class MergeStream:
    """A merged state dict, one (key, tensor) pair at a time, read from files as it goes.

    ``layout`` maps every key it will yield, in that order, to a meta tensor of its shape
    and dtype. Iterate it once; the files close when it is exhausted, on ``close()``, or on
    leaving a ``with`` block.
    """

    def __init__(self, inputs: _Inputs, pairs: Iterator[tuple[str, torch.Tensor]], layout: dict[str, torch.Tensor]):
        self._inputs, self._pairs, self.layout = inputs, pairs, layout

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        try:
            yield from self._pairs
        finally:
            self.close()

    def close(self) -> None:
        self._pairs.close()
        self._inputs.close()

    def __enter__(self) -> "MergeStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stream_merge(method: str, pretrained: PathLike | None, finetuned: Sequence[PathLike],
                 stats: Mapping[str, Sequence] | None = None, *, workers: int | None = None,
                 device: str | torch.device | None = None, **hyper) -> MergeStream:
    """``REGISTRY[method]``'s merge of the models in these safetensors files, key by key.

    ``pretrained`` is θ0's file (Task Arithmetic, TIES and DARE read it; the others ignore it,
    as the registry does, and it may be None), ``finetuned`` the experts' files, ``stats`` the
    statistics the method needs: ``{"fisher": [file per expert]}``, ``{"gram": [file per
    expert], "gram_counts": [dict per expert]}``. ``hyper`` are the registry entry's
    hyper-parameters (its ``tuned`` ones are required, its ``fixed`` ones default) and
    ``buffers``. The result equals ``REGISTRY[method]`` on the loaded state dicts, bit for
    bit. TIES and DARE + TIES first read the inputs to find each task's trim threshold.
    ``workers``: threads that read and merge pieces of the keys at once (default: torch's
    thread count, ``torch.get_num_threads()``); the result does not depend on it.
    ``device`` (Fisher and RegMean only, default the CPU): where their per-key arithmetic runs,
    e.g. "cuda": each key's tensors are read on the CPU, moved there, merged, and the merged
    tensor comes back to the CPU. RegMean's products and solves are what a GPU speeds up; the
    other merges are bound by reading and stay on the CPU. The result is then the registry's
    on state dicts on that device (the same operations; tested on the CPU only).
    """
    workers = torch.get_num_threads() if workers is None else workers
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}.")
    device = torch.device("cpu" if device is None else device)
    if device.type != "cpu" and method not in DEVICE_METHODS:
        raise ValueError(f"device={str(device)!r}: only {list(DEVICE_METHODS)} run on another device; {method} is "
                         "bound by reading its files and runs on the CPU (leave device unset).")
    hyper = _hyper(method, dict(hyper))
    inputs = _open_inputs(method, pretrained, list(finetuned), stats, hyper)
    inputs.workers, inputs.device = workers, device
    ref = inputs.pretrained if method in _USES_THETA0 else inputs.finetuned[0]
    try:
        if hyper.get("buffers") is not None:
            buffer_keys(ref.layout, hyper["buffers"])  # unknown names fail now, not mid-stream
        if method == "regmean" and inputs.gram_counts is not None:
            for k in _merge_keys(ref, hyper.get("buffers"))[1]:
                if _has_statistic(k, [g.layout for g in inputs.gram], "Gram"):
                    for t, c in enumerate(inputs.gram_counts):
                        _row_count(c, t, k)
        if method == "fisher":
            for k in _merge_keys(ref, hyper.get("buffers"))[1]:
                _has_statistic(k, [f.layout for f in inputs.fisher], "Fisher")
    except BaseException:
        inputs.close()
        raise
    layout = {k: ref.layout[k] for k in ref.keys}
    return MergeStream(inputs, _STREAMS[method](inputs, hyper), layout)


def merge_to_file(method: str, pretrained: PathLike | None, finetuned: Sequence[PathLike], out: PathLike,
                  stats: Mapping[str, Sequence] | None = None, *, metadata: Mapping[str, str] | None = None,
                  workers: int | None = None, device: str | torch.device | None = None, **hyper) -> Path:
    """``stream_merge(...)`` written to the safetensors file ``out`` as it is computed (no
    more than one merged tensor held); ``out`` appears only once the merge has finished."""
    with stream_merge(method, pretrained, finetuned, stats, workers=workers, device=device, **hyper) as merged:
        return write_safetensors(out, merged, merged.layout, metadata)


def read_inputs(paths: Sequence[PathLike], workers: int = 1) -> int:
    """Read every tensor of every file once, as a merge reads them (the baseline a merge's
    cost is measured against), with ``workers`` threads reading tensors at once; returns the
    number of bytes read."""
    readers = [SafetensorsReader(p) for p in paths]
    try:
        tensors = ((r, k) for r in readers for k in r.keys)
        return sum(_in_order(lambda item: item[0].read(item[1]).nbytes, tensors, workers))
    finally:
        for r in readers:
            r.close()
