"""Content-addressed cache of tensors in safetensors files.

A cached result is keyed by a hash of everything that produced it (a JSON-able dict of
config, data identity and code version), written atomically (temp file + rename) so an
interrupted run never leaves a half-written file that a later run would trust.

Every file also carries, in its metadata, a hash of its own tensors (``content_hash``), and
every load goes through :func:`load_cached`, which checks it. A file that cannot be read
(truncated, not safetensors) or whose tensors no longer match their hash (damaged in place)
is named in a warning, moved aside as ``<name>.corrupt-<time>``, and reported as not cached,
so the caller recomputes it by its normal path: a damaged cache costs time, never a number.
Files written before hashes were stored have none; they are loaded unverified (readable is all
that is checked) rather than recomputed, since that would retrain every cached expert.

Temporary files live beside their target (so the final rename stays on one file system);
those left by killed runs are removed the next time a process uses the cache
(:func:`remove_stale_temporaries`).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import socket
import tempfile
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..paths import cache_dir

# Bump when a change in code changes what *every* cached result would contain.
CACHE_VERSION = 2

# The metadata entry holding content_hash() of a file's tensors, written by save_tensors_atomic.
HASH_KEY = "content_hash"
# A temporary file this old (seconds) is a leftover whatever its name says: a write takes seconds.
STALE_TEMP_SECONDS = 24 * 3600
TEMP_SUFFIX = ".tmp"


class DamagedCacheWarning(UserWarning):
    """A cached file could not be read or failed its hash check; it was moved aside and is recomputed."""


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
        # bytes via a uint8 view of the flattened tensor: works for every dtype (bfloat16 too),
        # and hashlib reads the array's buffer in place (no copy of a large tensor)
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- temporaries
_swept: set[Path] = set()  # cache roots this process has already cleaned


def _writer_tag() -> str:
    """Who writes a temporary file: host and process id, no dots (they separate name parts)."""
    return f"{socket.gethostname().replace('.', '_')}-{os.getpid()}"


def _writer_is_gone(tmp: Path) -> bool:
    """Whether ``tmp`` was written by a process of this host that no longer runs."""
    tag = tmp.name[: -len(TEMP_SUFFIX)].rsplit(".", 1)[-1]
    host, _, pid = tag.rpartition("-")
    if os.name != "posix" or not pid.isdigit() or host != _writer_tag().rpartition("-")[0]:
        return False  # another machine's, or a name without a tag: only its age tells
    try:
        os.kill(int(pid), 0)  # signal 0 sends nothing: it only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, run by another user
        return False
    return False


def remove_stale_temporaries(root: Path, max_age: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Delete the temporary files under ``root`` that no write will finish: older than ``max_age``
    seconds, or written by a process of this host that has ended (a run killed mid-write).
    Returns the files removed."""
    removed, now = [], time.time()
    for tmp in Path(root).rglob(f"*{TEMP_SUFFIX}"):
        try:
            stale = now - tmp.stat().st_mtime > max_age or _writer_is_gone(tmp)
            if stale:
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            continue
    return removed


def _sweep_once(root: Path) -> None:
    """Remove stale temporaries under ``root`` the first time this process uses it."""
    root = Path(root)
    if root not in _swept:
        _swept.add(root)
        if root.is_dir():
            remove_stale_temporaries(root)


def cache_path(kind: str, spec: Mapping, root: Path | None = None) -> Path:
    """Where the result keyed by ``spec`` is cached (whether or not it is there yet)."""
    root = Path(root or cache_dir())
    _sweep_once(root)
    return root / kind / f"{cache_key(spec)}.safetensors"


# ----------------------------------------------------------------------------- saving, loading
def save_tensors_atomic(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping | None = None) -> None:
    """Write ``tensors`` (and JSON-able ``metadata``) to ``path`` with a hash of the tensors, so
    that a later load can tell a damaged file. The file appears complete or not at all: it is
    written to a temporary beside it, then renamed."""
    path = Path(path)
    if metadata and HASH_KEY in metadata:
        raise ValueError(f"metadata key {HASH_KEY!r} is reserved for the tensors' hash; name it otherwise.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {k: json.dumps(v, default=str) for k, v in {**(metadata or {}), HASH_KEY: content_hash(tensors)}.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=f".{_writer_tag()}{TEMP_SUFFIX}")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}


def _move_aside(path: Path, problem: str) -> None:
    """Rename a damaged cache file out of the way (kept for inspection) and say so."""
    aside = path.with_name(f"{path.name}.corrupt-{datetime.now():%Y%m%d-%H%M%S-%f}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:  # another process moved it first
        pass
    warnings.warn(
        f"cache file {path} {problem}. It was moved aside to {aside.name} and will be recomputed; "
        "delete that file once you no longer need it (make clean-cache empties the whole cache).",
        DamagedCacheWarning, stacklevel=3)


def load_cached(path: Path) -> dict[str, torch.Tensor] | None:
    """The tensors cached in ``path``, or None when there are none to trust.

    None when the file does not exist, and when it cannot be read (truncated, not a safetensors
    file, metadata that is not JSON) or its tensors do not match the hash saved with them
    (damaged in place): such a file is named in a :class:`DamagedCacheWarning` and moved aside,
    so the caller computes the result again. A file with no hash (written before hashes were
    stored) is returned unverified.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        tensors = load_file(str(path))
        saved = load_metadata(path).get(HASH_KEY)
    except FileNotFoundError:  # moved aside by another process meanwhile
        return None
    except (SafetensorError, ValueError) as err:  # ValueError: metadata that is not JSON
        _move_aside(path, f"cannot be read ({err}): it is truncated or not a safetensors file")
        return None
    if saved is None:
        return tensors
    found = content_hash(tensors)
    if found != saved:
        _move_aside(path, f"does not match the hash of its tensors saved with it ({found} != {saved}): "
                          "it was damaged after it was written")
        return None
    return tensors


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
    them recomputes instead of serving a stale artefact. A damaged file is recomputed
    (:func:`load_cached`).
    """
    if code:
        spec = {**spec, "code": code_hash(*code)}
    path = cache_path(kind, spec, root)
    cached = load_cached(path)
    if cached is not None:
        return cached
    result = compute()
    tensors, metadata = result if isinstance(result, tuple) else (result, {})
    save_tensors_atomic(tensors, path, {"spec": dict(spec), **metadata})
    return {k: v.detach().cpu() for k, v in tensors.items()}
