"""Reading the paper-scale task files (``data/clip_tasks.yaml``, ``data/glue_tasks.yaml``,
``data/sentiment_tasks.yaml``): each is a YAML mapping with a ``tasks`` mapping of name ->
settings, checked by the module that owns it."""
from __future__ import annotations

from pathlib import Path

import yaml


def read_task_file(path: str, holds: str) -> dict:
    """The parsed file at ``path``; ``holds`` says what lives there, for the error when it is missing."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: {holds} live there (data/{Path(path).name} in the "
                                "repository).") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), dict):
        raise ValueError(f"{path}: expected a mapping with a 'tasks' mapping of name -> settings.")
    return raw
