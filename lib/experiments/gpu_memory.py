"""GPU memory of a computation, predicted on a CPU: fake tensors, live storage bytes, and CUDA
autocast's float32 policy.

The paper-scale notebooks must fit a 24 GB card by default, and a GPU is lent to this project
only now and then. What a CUDA run's ``torch.cuda.max_memory_allocated`` reports is, to a good
approximation, the largest total size of the tensor storages alive at one time, each rounded up
to the caching allocator's 512-byte blocks. That total depends on shapes, dtypes and lifetimes,
not on values, so it can be counted on a CPU without doing the arithmetic:

- the computation runs under ``torch._subclasses.FakeTensorMode``: every tensor has its shape,
  dtype and autograd graph, but no data (a ViT-L/14 step with 8 task vectors "runs" in about a
  minute in a few hundred MiB of host memory);
- ``LiveTensorBytes``, a ``TorchDispatchMode``, sees every storage an operation creates and
  counts it until Python frees it (a ``weakref.finalize`` on the storage), keeping the peak;
- CPU autocast stands in for CUDA autocast. The two cast the same matrix products to bf16, but
  CUDA's runs layer norm and softmax in float32 (their outputs, and the copies autograd saves,
  are float32), where CPU's leaves them in bf16. ``cuda_autocast_policy`` upcasts those calls'
  inputs while CPU autocast is on, so the saved tensors have CUDA's sizes (patched at the
  function level, so activation checkpointing's recomputation sees the same policy).

What it does not see: the CUDA context (~0.5 GiB outside ``max_memory_allocated``), cuBLAS and
attention workspaces, and the allocator's fragmentation (the reserved pool can exceed the
allocated peak). Attention: CPU fake mode picks ``_scaled_dot_product_flash_attention_for_cpu``,
which saves what CUDA's flash kernel saves (the output and the log-sum-exp). ``.item()`` on a
fake tensor has no value to return; it returns 1 (1.0, True), which is enough for the control
flow of the steps measured here (Adam's step counter, a loss printed to a history). Two shims
keep ordinary code running on fake tensors: ``module.to`` a device and dtype the module already
has returns it untouched, and ``copy.deepcopy`` of a fake tensor clones it in the same fake mode.
An operation whose output size depends on values (``torch.unique``, boolean-mask indexing) cannot
run on fake tensors; ``embedding_sums_at_their_largest`` stands in for the one such step the
notebooks' statistics take (the Fisher's per-example sums over embedding rows), at its largest.

``make bench-gpu-memory`` checks the prediction against the peaks measured on an H200
(``make bench-gpu-paper``) and predicts the paper-scale notebooks' steps on open_clip's towers.

    peak_bytes = predicted_cuda_peak(lambda: train_step(build_model()))
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

BLOCK = 512  # bytes: the CUDA caching allocator rounds every allocation up to a multiple of this


def allocated_bytes(nbytes: int) -> int:
    """What the CUDA caching allocator hands out for a request of ``nbytes``."""
    return -(-nbytes // BLOCK) * BLOCK


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages alive at once: ``current`` now, ``peak`` the most so far.

    Storages created by operations inside the mode are counted from creation until Python frees
    them; tensors made before it are counted only once passed to ``add``. Views share their
    base's storage and add nothing. Works on real and on fake tensors alike.
    """

    def __init__(self):
        super().__init__()
        self._seen = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0

    def add(self, *tensors: torch.Tensor) -> None:
        """Count tensors that existed before the mode was entered (once per storage)."""
        for t in tensors:
            self._count(t)

    def _count(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage in self._seen:
            return
        size = allocated_bytes(storage.nbytes())
        self._seen[storage] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, size)

    def _release(self, size: int) -> None:
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
            dtype = args[0].dtype  # .item() of a fake tensor: no value exists (module docstring)
            return 1.0 if dtype.is_floating_point else True if dtype == torch.bool else 1
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._count(t)
        return out


# CUDA autocast's float32 list, the calls among it that a ViT or a Transformer makes
_FLOAT32_ON_CUDA = [(F, "layer_norm"), (F, "group_norm"), (F, "softmax"), (F, "log_softmax"),
                    (torch, "layer_norm"), (torch, "softmax"), (torch, "log_softmax"),
                    (torch.Tensor, "softmax"), (torch.Tensor, "log_softmax")]


def _float32_inputs(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.is_autocast_enabled("cpu"):
            up = lambda a: a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a  # noqa: E731
            args, kwargs = tuple(up(a) for a in args), {k: up(v) for k, v in kwargs.items()}
        return fn(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def cuda_autocast_policy() -> Iterator[None]:
    """While CPU autocast is on, layer norm and softmax run in float32, as CUDA autocast runs them
    (module docstring). Patches the functions for the duration of the block; restores them after."""
    originals = [(owner, name, getattr(owner, name)) for owner, name in _FLOAT32_ON_CUDA]
    for owner, name, fn in originals:
        setattr(owner, name, _float32_inputs(fn))
    try:
        yield
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)


@contextlib.contextmanager
def _moves_in_place_skipped() -> Iterator[None]:
    """``module.to(device, dtype)`` returns the module untouched when every tensor already has that
    device and dtype. Fake parameters cannot be swapped for themselves (torch refuses to swap a
    tensor that its fake mode holds a weak reference to), and on the CPU there is nothing to move."""
    original = nn.Module.to

    def to(module, *args, **kwargs):
        device, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
        tensors = [*module.parameters(), *module.buffers()]
        if all((device is None or t.device == device) and (dtype is None or not t.is_floating_point()
                                                           or t.dtype == dtype) for t in tensors):
            return module
        return original(module, *args, **kwargs)

    nn.Module.to = to
    try:
        yield
    finally:
        nn.Module.to = original


def _fake_deepcopy(tensor: torch.Tensor, memo: dict) -> torch.Tensor:
    """``copy.deepcopy`` of a fake tensor as a clone in the active fake mode (torch's own copy
    lands in a new fake mode, which no operation can then mix with the others)."""
    if id(tensor) not in memo:
        with torch.no_grad():
            clone = tensor.detach().clone()
        memo[id(tensor)] = (nn.Parameter(clone, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter)
                            else clone.requires_grad_(tensor.requires_grad))
    return memo[id(tensor)]


def _deepcopy_fakes_in_mode(original: Callable) -> Callable:
    """``original`` (a ``__deepcopy__``) for real tensors, ``_fake_deepcopy`` for fake ones."""
    def deepcopy(tensor: torch.Tensor, memo: dict) -> torch.Tensor:
        data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
        return _fake_deepcopy(tensor, memo) if isinstance(data, FakeTensor) else original(tensor, memo)
    return deepcopy


@contextlib.contextmanager
def _deepcopies_in_mode() -> Iterator[None]:
    originals = [(cls, cls.__deepcopy__) for cls in (torch.Tensor, nn.Parameter)]
    for cls, original in originals:
        cls.__deepcopy__ = _deepcopy_fakes_in_mode(original)
    try:
        yield
    finally:
        for cls, original in originals:
            cls.__deepcopy__ = original


def _distinct_pairs(pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(pairs, return_inverse=True)``'s outputs (new tensors of the same sizes) when
    every entry of ``pairs`` is distinct: the keys are the pairs, the inverse 0, 1, 2, ..."""
    return pairs.clone(), torch.arange(pairs.shape[0], device=pairs.device)


def _embedding_sq_sum_every_pair_distinct(total: torch.Tensor, module: nn.Embedding, ids: torch.Tensor,
                                          g: torch.Tensor, weights: torch.Tensor | None) -> None:
    """``statistics._embedding_sq_sum_`` when every (example, token id) pair is distinct and no id
    is padding: step for step the same tensors, at their largest, and the same ``total``. Where
    the original indexes with a boolean mask and calls ``torch.unique`` (output sizes that depend
    on values), this reshapes and copies: with every pair distinct, unique's keys are the pairs
    (in another order, which the final sums do not depend on) and its inverse is 0, 1, 2, ..."""
    batch, vocabulary = g.shape[0], module.num_embeddings
    ids = ids.reshape(batch, -1)
    g = g.reshape(batch, ids.shape[1], -1).float()
    example = torch.arange(batch, device=ids.device)[:, None].expand_as(ids)
    keep = torch.ones_like(ids, dtype=torch.bool)  # noqa: F841  (the original's mask, allocated as it is there)
    keys, where = _distinct_pairs((example * vocabulary + ids).reshape(-1).clone())  # [keep] is a copy
    rows = torch.zeros(keys.shape[0], g.shape[-1], device=g.device).index_add_(
        0, where, g.reshape(-1, g.shape[-1]).clone())  # g[keep]: a copy
    sq = rows.square_()
    if weights is not None:
        sq = sq * weights.float()[keys // vocabulary, None]
    total.index_add_(0, keys % vocabulary, sq)


@contextlib.contextmanager
def embedding_sums_at_their_largest() -> Iterator[None]:
    """While active, the Fisher's per-example embedding sums (``lib.statistics``, method "hooks")
    allocate what they allocate when every (example, token) pair is distinct, their largest case,
    so that a step through them runs on fake tensors and is predicted from above."""
    from lib import statistics

    original = statistics._embedding_sq_sum_
    statistics._embedding_sq_sum_ = _embedding_sq_sum_every_pair_distinct
    try:
        yield
    finally:
        statistics._embedding_sq_sum_ = original


def predicted_cuda_peak(fn: Callable[[], object]) -> int:
    """The peak bytes of live tensors while ``fn()`` runs on fake tensors: a prediction of
    ``torch.cuda.max_memory_allocated`` for the same code on CUDA (module docstring).

    ``fn`` builds what it needs (models, inputs) and runs; everything it creates is counted.
    Code in it that asks for CUDA autocast should ask for CPU autocast here, which
    ``cuda_autocast_policy`` (active throughout) turns into CUDA's dtypes.
    """
    tracker = LiveTensorBytes()
    with FakeTensorMode(), cuda_autocast_policy(), _moves_in_place_skipped(), _deepcopies_in_mode(), tracker:
        fn()
    return tracker.peak


__all__ = ["BLOCK", "LiveTensorBytes", "allocated_bytes", "cuda_autocast_policy", "embedding_sums_at_their_largest",
           "predicted_cuda_peak"]
