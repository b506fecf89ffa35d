"""Content-addressed cache of tensors in safetensors files.

A cached result is keyed by a hash of everything that produced it (a JSON-able dict of
config, data identity and code version), written atomically (temp file + rename) so an
interrupted run never leaves a half-written file that a later run would trust.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file

from ..paths import cache_dir

# Bump when a change in code changes what *every* cached result would contain.
CACHE_VERSION = 2


def code_hash(*functions: Callable) -> str:
    """A hash of the source code of ``functions``: put it in a cache key so that editing the code
    that produced an artefact invalidates it (comments and docstrings count as edits too, which
    errs on the side of recomputing)."""
    digest = hashlib.sha256()
    for fn in functions:
        fn = inspect.unwrap(fn)
        try:
            source = inspect.getsource(fn)
        except (OSError, TypeError):  # built-ins, lambdas typed in a REPL: fall back to the name
            source = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"
        digest.update(source.encode())
    return digest.hexdigest()[:16]


def cache_key(spec: Mapping) -> str:
    """A short stable hash of a JSON-able spec."""
    if "v" in spec:  # it would replace the cache version in the key
        raise ValueError("'v' is reserved in cache specs for CACHE_VERSION; name the setting otherwise.")
    blob = json.dumps({"v": CACHE_VERSION, **spec}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def content_hash(state: Mapping[str, torch.Tensor]) -> str:
    """A hash of a state dict's names, dtypes, shapes and bytes: equal iff the tensors are."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # bytes via a uint8 view of the flattened tensor: works for every dtype (bfloat16 too)
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_path(kind: str, spec: Mapping, root: Path | None = None) -> Path:
    return Path(root or cache_dir()) / kind / f"{cache_key(spec)}.safetensors"


def save_tensors_atomic(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        meta = {k: json.dumps(v, default=str) for k, v in (metadata or {}).items()}
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}


def cached_tensors(
    kind: str,
    spec: Mapping,
    compute: Callable[[], dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], dict]],
    root: Path | None = None,
    code: Sequence[Callable] = (),
) -> dict[str, torch.Tensor]:
    """Load ``kind/<hash(spec)>.safetensors`` or compute, save and return it.

    ``compute`` returns the tensors, or ``(tensors, metadata)`` to store alongside them.
    ``code``: the functions that produce the result; their source enters the key, so an edit to
    them recomputes instead of serving a stale artefact.
    """
    if code:
        spec = {**spec, "code": code_hash(*code)}
    path = cache_path(kind, spec, root)
    if path.exists():
        return load_file(str(path))
    result = compute()
    tensors, metadata = result if isinstance(result, tuple) else (result, {})
    save_tensors_atomic(tensors, path, {"spec": dict(spec), **metadata})
    return {k: v.detach().cpu() for k, v in tensors.items()}
