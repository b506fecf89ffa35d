"""Natural-language class descriptions for zero-shot text heads (``data/class_descriptions.yaml``).

The file maps each task to one or more *candidate sets*; a set gives every class of the task
one or more sentences. Which set a run uses is chosen on validation accuracy of θ0
(``lib.experiments.training.zero_shot_heads``), never on test. Class names are the loader's
(``load_text_task(task).classes``), so a renamed or missing class is caught here.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from ..paths import REPO_ROOT

DESCRIPTIONS_FILE = REPO_ROOT / "data" / "class_descriptions.yaml"


def class_descriptions(task: str, classes: list[str], path: str | Path | None = None) -> dict[str, list[list[str]]]:
    """``{candidate set name: [descriptions of class 0, of class 1, ...]}`` for ``task``."""
    path = Path(path or DESCRIPTIONS_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no class-descriptions file. Zero-shot heads need one "
                                "(see data/class_descriptions.yaml in the repository for the format).")
    with path.open(encoding="utf-8") as f:
        catalogue = yaml.safe_load(f) or {}
    if task not in catalogue:
        raise KeyError(f"{path} has no descriptions for task {task!r}. Add an entry '{task}:' with, for each "
                       f"class ({', '.join(classes)}), a list of sentences; or choose heads that need none "
                       "(notebook parameter text_heads = 'few_shot' or 'probe').")
    candidates = catalogue[task]
    if not isinstance(candidates, dict) or not candidates:
        raise ValueError(f"{path}, task {task!r}: expected named candidate sets, each mapping class -> sentences.")
    out = {}
    for name, per_class in candidates.items():
        where = f"{path}, task {task!r}, set {name!r}"
        if not isinstance(per_class, dict) or set(map(str, per_class)) != set(classes):
            given = sorted(map(str, per_class)) if isinstance(per_class, dict) else per_class
            raise ValueError(f"{where}: the classes must be exactly {classes}; got {given}.")
        sentences = [per_class[c] if isinstance(per_class[c], list) else [per_class[c]] for c in classes]
        if any(not s or not all(isinstance(x, str) and x.strip() for x in s) for s in sentences):
            raise ValueError(f"{where}: every class needs at least one non-empty sentence.")
        out[str(name)] = sentences
    return out
