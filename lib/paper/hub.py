"""Hugging Face hub datasets, downloaded once and kept as a ``save_to_disk`` folder.

The paper-scale readers (``vision_data``, ``glue``) read a task from a folder of the local
mirror; on a connected machine without a mirror, this fills the same folder from the hub so
that later runs read it offline. The copy is written to a temporary folder beside the target
and renamed into place, so an interrupted download never leaves a half-written task behind.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..paths import download_dir


def download_to_folder(repo: str, config: str | None, folder: Path, offline_hint: str) -> None:
    """``datasets.load_dataset(repo, config)`` saved to ``folder`` (atomically). ``offline_hint``
    says where the files can go instead when the hub cannot be reached."""
    import datasets

    cache = folder.parent.parent / "hub_cache"
    try:
        copy = datasets.load_dataset(repo, config, cache_dir=str(cache))
    except Exception as err:  # offline, or the repository moved: say where the files can go instead
        named = f"{repo} ({config})" if config else repo
        raise RuntimeError(f"Could not download {named} ({type(err).__name__}: {err}). {offline_hint}") from err
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        copy.save_to_disk(str(partial))
        os.replace(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def hub_folder_of(mirror: Path | None, relative: str | Path, missing: Callable[[Path], str],
                  download: Callable[[Path], None]) -> Path:
    """The folder ``relative`` under the mirror, which must exist (``missing(folder)`` says what
    to put there), or without a mirror under ``download_dir()``, filled once by ``download(folder)``."""
    folder = (mirror if mirror is not None else download_dir()) / relative
    if not folder.is_dir():
        if mirror is not None:
            raise FileNotFoundError(f"{folder} not found: {missing(folder)}")
        download(folder)
    return folder
