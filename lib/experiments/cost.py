"""Wall time and peak memory of one call: the measurement shared by the benchmarks and notebooks.

Peak memory is the growth of this process's resident set during the call (whatever the
call allocates and still holds at its peak, its result included), read from Linux's VmHWM
after resetting it through ``/proc/self/clear_refs``. Freed memory is handed back to the
OS (``malloc_trim``) before each call, so one call's leftovers do not hide the next one's
allocations. Where ``/proc`` is unavailable (not Linux) the peak is NaN.

tracemalloc would not see torch's allocations (they bypass Python's allocator), which is
why the resident set is read instead. On a GPU this measures host memory only.

    result, seconds, peak_mib = measured_call(lambda: merge(models))
    seconds, peak_mib = measure(lambda: merge(models))      # result discarded
"""
from __future__ import annotations

import ctypes
import gc
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def release_freed_memory() -> None:
    """Hand memory freed by earlier calls back to the OS.

    glibc keeps freed heap memory resident; a later call reusing it would not show in the
    resident set, so its peak would read too low. Reuse within one call is real and counts.
    """
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def status_kib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    raise KeyError(field)


def reset_peak() -> float | None:
    """Reset VmHWM to the current resident set; return that (KiB), or None if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return status_kib("VmRSS")
    except (OSError, KeyError):
        return None


def measured_call(fn: Callable[[], T]) -> tuple[T, float, float]:
    """``(fn(), seconds, peak MiB above the starting resident set)``."""
    release_freed_memory()
    start_kib = reset_peak()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak_mib = float("nan") if start_kib is None else (status_kib("VmHWM") - start_kib) / 1024
    return result, seconds, peak_mib


def measure(fn: Callable[[], object]) -> tuple[float, float]:
    """(seconds, peak MiB above the starting resident set) of one call of ``fn``; the result is dropped."""
    result, seconds, peak_mib = measured_call(fn)
    del result
    release_freed_memory()
    return seconds, peak_mib


def matmul_rate(size: int = 2048, seconds: float = 1.0, dtype=None, device="cpu") -> float:
    """Sustained matrix-multiply rate of this machine in ``dtype`` (float32 by default), FLOP/s,
    on ``device`` (the CPU with torch's current number of threads by default): ``size × size``
    products repeated for about ``seconds`` after a warm-up. No method built on matrix products
    runs faster than this, which makes it the ceiling against which a measured speed-up can be
    judged (a roofline)."""
    import torch

    dtype, device = dtype or torch.float32, torch.device(device)
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    out = torch.empty(size, size, dtype=dtype, device=device)
    # a GPU runs the products after they are asked for: wait for them before reading the clock
    wait = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        torch.mm(a, b, out=out)
    wait()
    reps, start = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - start < seconds:
        torch.mm(a, b, out=out)
        reps += 1
        if reps % 8 == 0:
            wait()
    wait()
    return 2 * size**3 * reps / (time.perf_counter() - start)


__all__ = ["matmul_rate", "measure", "measured_call", "release_freed_memory"]


def _inplace_addmm_flops(self_shape, mat1_shape, mat2_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * mat1_shape[0] * mat1_shape[1] * mat2_shape[1]


def matrix_flops(fn: Callable[..., object], *args) -> float:
    """FLOPs of the matrix work of one call ``fn(*args)``: matrix products, convolutions and
    attention, as torch's ``FlopCounterMode`` counts them (2 per multiply-add), plus in-place
    ``addmm_`` (which it skips, and Twin-Merging's merge accumulates low-rank products with);
    element-wise work (additions, activations, norms) is not counted, so this is a lower bound
    on the arithmetic."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _inplace_addmm_flops}) as counter:
        fn(*args)
    return float(counter.get_total_flops())
