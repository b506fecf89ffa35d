"""Where things live: the data mirror, the download folder and the cache.

Everything is relative to the repository unless an environment variable says otherwise,
so a fresh clone works without configuration and a user can point at a local mirror:

- ``DATA_DIR``: a local mirror laid out like ``../shared/data`` (read-only). When unset,
  loaders download from the public source into ``data/downloads``.
- ``MERGE_CACHE_DIR``: experts, statistics and other expensive results (default ``.cache``).
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_mirror(override: str | os.PathLike | None = None) -> Path | None:
    """The offline mirror to read, or None to download from the public source."""
    value = override if override not in (None, "") else os.environ.get("DATA_DIR") or None
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = (Path.cwd() / path).resolve()
        if not path.exists():  # notebooks run from notebooks/: also try the repo root
            path = (REPO_ROOT / value).resolve()
    if not path.is_dir():
        raise FileNotFoundError(
            f"DATA_DIR={value!r} is not a directory. Point it at a mirror laid out like "
            "shared/data (text/senteval, text/tweeteval, vision/*.npz), or unset it to download."
        )
    return path


def download_dir() -> Path:
    """Where downloaded public data is kept between runs."""
    return Path(os.environ.get("MERGE_DOWNLOAD_DIR", REPO_ROOT / "data" / "downloads"))


def cache_dir() -> Path:
    """Where expensive results (experts, statistics) are cached."""
    return Path(os.environ.get("MERGE_CACHE_DIR", REPO_ROOT / ".cache"))


def models_mirror(models_dir: str | os.PathLike | None = None) -> Path | None:
    """The local model folder: ``models_dir``, else $MODELS_DIR, else the ``models`` folder beside
    $DATA_DIR (as the Makefile derives it); None when none is set (download instead)."""
    value = models_dir or os.environ.get("MODELS_DIR")
    if not value and os.environ.get("DATA_DIR"):
        value = str(Path(os.environ["DATA_DIR"]).expanduser() / ".." / "models")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / value  # notebooks run from notebooks/; paths are relative to the repo root
    return path
