"""The optional description of a user's own task: ``task.yaml`` (or ``task.json``).

A user task is a folder or a single file. Its description lies beside the data:

- for a folder: ``<folder>/task.yaml`` (or ``task.yml``, ``task.json``);
- for a single file ``<dir>/<stem>.<ext>``: ``<dir>/<stem>.task.yaml`` (or ``.yml``, ``.json``).

Every key is optional::

    name: movie_reviews            # default: the folder name or the file's stem
    classes: [negative, positive]  # label i is classes[i]; for image folders, the folder order
    metric: macro_f1               # a name lib.metrics.official_metric knows (default: accuracy)
    validation_fraction: 0.1       # share of each class carved from train when there is
    test_fraction: 0.1             # no validation / test data of its own (defaults: 0.1)

Unknown keys are errors (a typo such as ``metrics:`` must not silently fall back to a
default). Without a description the defaults apply, and the task's notes say so.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..metrics import OFFICIAL_METRICS

DEFAULT_METRIC = "accuracy"
DEFAULT_FRACTION = 0.1  # of each class, for a carved validation or test split
ALLOWED_KEYS = ("name", "classes", "metric", "validation_fraction", "test_fraction")
_SUFFIXES = (".yaml", ".yml", ".json")
# Metrics that read fixed class ids (irony: class 1; stance: classes 1 and 2).
_METRIC_MIN_CLASSES = {"irony_f1": 2, "stance_f1": 3}


@dataclass(frozen=True)
class TaskDescription:
    """What ``task.yaml`` says, with ``None`` for every key it leaves out."""

    path: Path | None = None  # the file it was read from; None when there is none
    name: str | None = None
    classes: tuple[str, ...] | None = None
    metric: str | None = None
    validation_fraction: float | None = None
    test_fraction: float | None = None

    @property
    def effective_metric(self) -> str:
        return self.metric or DEFAULT_METRIC

    def fraction(self, split: str) -> float:
        """The share of each class carved from train for ``split`` ("validation" or "test")."""
        value = getattr(self, f"{split}_fraction")
        return DEFAULT_FRACTION if value is None else value

    def check_metric_fits(self, num_classes: int) -> None:
        """Refuse a metric that needs more classes than the task has (it would fail later)."""
        needed = _METRIC_MIN_CLASSES.get(self.effective_metric, 0)
        if num_classes < needed:
            raise ValueError(
                f"{self.path}: metric {self.metric!r} needs at least {needed} classes but the task has "
                f"{num_classes}. Choose another metric, e.g. accuracy or macro_f1."
            )

    def notes(self, data: Path, default_name: str) -> list[str]:
        """Note lines: which description was read, and every default that applied."""
        where = f"task description {self.path}" if self.path else (
            f"no task description (looked for {', '.join(p.name for p in candidates(data))}): defaults apply"
        )
        lines = [where]
        if self.name is None:
            lines.append(f"name {default_name!r}: the {'folder' if data.is_dir() else 'file'} name (set name: to change it)")
        if self.metric is None:
            lines.append(
                f"metric {DEFAULT_METRIC} by default (set metric: to one of {', '.join(OFFICIAL_METRICS)}; "
                "accuracy flatters imbalanced tasks)"
            )
        else:
            lines.append(f"metric {self.metric} (from the task description)")
        return lines


def candidates(data: Path) -> list[Path]:
    """Where the description of the folder or file ``data`` may lie, in order of preference."""
    if data.is_dir():
        return [data / f"task{s}" for s in _SUFFIXES]
    return [data.with_name(f"{data.stem}.task{s}") for s in _SUFFIXES]


def is_description(path: Path) -> bool:
    """Whether ``path`` is a task description inside a folder (not a stray file)."""
    return path.name in {f"task{s}" for s in _SUFFIXES}


def ignored_note(names: list[str], why: str, shown: int = 5) -> str:
    """A note naming ignored files (the first ``shown`` of them and a count), never silence."""
    listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
    return f"ignored {len(names)} entr{'y' if len(names) == 1 else 'ies'} ({why}): {listed}"


def find_task_description(data: Path) -> TaskDescription:
    """Read the description beside ``data``, or return the defaults when there is none."""
    found = [p for p in candidates(data) if p.is_file()]
    if len(found) > 1:
        raise ValueError(f"{data}: several task descriptions ({', '.join(p.name for p in found)}); keep one.")
    return read_task_description(found[0]) if found else TaskDescription()


def read_task_description(path: Path) -> TaskDescription:
    """Parse and check one ``task.yaml``/``task.json``; every error names the file and the fix."""
    text = path.read_text(encoding="utf-8-sig")  # -sig: a BOM is not part of the first key
    if path.suffix == ".json":
        try:
            content = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err}). Fix the syntax, or write it as task.yaml.") from None
    else:
        import yaml  # PyYAML, which transformers and papermill already require

        try:
            content = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:  # its message gives the line and column
            where = " ".join(str(err).split())  # one line, with the line and column of the problem
            raise ValueError(f"{path}: not valid YAML ({where}). Fix the syntax: one 'key: value' per line.") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected key: value pairs with keys from {', '.join(ALLOWED_KEYS)}; got {content!r}.")
    unknown = sorted(str(k) for k in content if k not in ALLOWED_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}. Allowed keys: {', '.join(ALLOWED_KEYS)}.")

    def bad(key: str, expected: str) -> ValueError:
        return ValueError(f"{path}: {key} must be {expected}; got {content[key]!r}.")

    name = content.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise bad("name", "a non-empty string (quote it if it looks like a number)")
    classes = content.get("classes")
    if classes is not None:
        # YAML reads `classes: [0, 1, 10]` as integers; folder names are strings, so accept both.
        if not isinstance(classes, list) or any(isinstance(c, bool) or not isinstance(c, (str, int)) for c in classes):
            raise bad("classes", "a list of class names, e.g. classes: [negative, positive]")
        classes = tuple(str(c).strip() for c in classes)
        if len(classes) < 2 or "" in classes:
            raise bad("classes", "at least two non-empty class names (a classifier needs two classes)")
        duplicates = sorted({c for c in classes if classes.count(c) > 1})
        if duplicates:
            raise bad("classes", f"distinct names ({', '.join(duplicates)} repeated)")
    metric = content.get("metric")
    if metric is not None and (not isinstance(metric, str) or metric not in OFFICIAL_METRICS):
        raise bad("metric", f"one of {', '.join(OFFICIAL_METRICS)}")
    fractions = {}
    for key in ("validation_fraction", "test_fraction"):
        value = content.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1):
            raise bad(key, "a number between 0 and 1 (exclusive), e.g. 0.1")
        fractions[key] = None if value is None else float(value)
    total = sum(DEFAULT_FRACTION if v is None else v for v in fractions.values())
    if total >= 1:
        raise ValueError(
            f"{path}: validation_fraction + test_fraction = {total:g} leaves nothing to train on; "
            "make their sum less than 1 (0.1 + 0.1 is usual)."
        )
    return TaskDescription(path, name and name.strip(), classes, metric, **fractions)
