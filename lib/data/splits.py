"""Seeded, class-stratified index splits and subsamples, shared by the text and image loaders.

Everything here works on a label vector and returns sorted index arrays, so a split keeps
the order of the file it came from. The same labels and seed always give the same indices;
another seed gives another split (numbers measured on one split are not comparable with
numbers measured on another).
"""
from __future__ import annotations

from typing import Protocol, Sequence, TypeVar

import numpy as np


def stratified_split(labels: np.ndarray, held_out: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split ``range(len(labels))`` into ``[rest, part_1, part_2, ...]``.

    ``held_out`` gives the fraction of each class that goes to each held-out part
    (``(0.1, 0.1)`` gives an 80/10/10 split). Per-class counts are rounded half up, so a
    class with very few examples may contribute nothing to a held-out part.
    """
    labels = np.asarray(labels)
    if sum(held_out) >= 1:
        raise ValueError(f"held-out fractions {tuple(held_out)} leave nothing to train on")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(held_out) + 1)]
    for cls in np.unique(labels):  # sorted, so the order in which rng is used is fixed
        members = rng.permutation(np.flatnonzero(labels == cls))
        start = 0
        for k, count in enumerate(held_out_sizes(len(members), held_out), start=1):
            parts[k].append(members[start : start + count])
            start += count
        parts[0].append(members[start:])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def held_out_sizes(n: int, held_out: Sequence[float]) -> list[int]:
    """How many of a class's ``n`` examples each held-out part gets (rounded half up, not to even)."""
    return [int(np.floor(fraction * n + 0.5)) for fraction in held_out]


def smallest_carvable_class(held_out: Sequence[float]) -> int:
    """The fewest examples a class needs so that train and every held-out part get at least one."""
    if sum(held_out) >= 1:  # no class size would do: refuse rather than search forever
        raise ValueError(f"held-out fractions {tuple(held_out)} leave nothing to train on")
    n = 1
    while min(held_out_sizes(n, held_out)) < 1 or n - sum(held_out_sizes(n, held_out)) < 1:
        n += 1
    return n


# --- checks for a user's own task (text or images) ----------------------------------------


def describe_class(label: int, class_names: Sequence[str]) -> str:
    """``label 2`` or ``class 'cat' (label 2)``: how error messages name a class."""
    name = class_names[label]
    return f"label {label}" if name == str(label) else f"class {name!r} (label {label})"


def check_classes(
    train_labels: np.ndarray,
    class_names: Sequence[str],
    source: str,
    fix: str,
    elsewhere: dict[str, np.ndarray] | None = None,
) -> None:
    """Refuse a task with one class, or with a class that has no training examples.

    Both would train without complaint and fail (or mislead) later: a one-class "classifier"
    is always right, and a class never seen in training can never be predicted. ``source``
    names the training data and ``fix`` says what to change; ``elsewhere`` maps the names of
    the other splits' files to their labels, to say where a class without training data is.
    """
    if len(class_names) < 2:
        raise ValueError(
            f"{source}: only one class ({class_names[0]!r}); a classifier needs at least two. "
            "Add examples of another class."
        )
    counts = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=len(class_names))
    for label, count in enumerate(counts):
        if count == 0:
            seen = [where for where, labels in (elsewhere or {}).items() if np.any(np.asarray(labels) == label)]
            also = f" (it appears only in {', '.join(seen)})" if seen else ""
            raise ValueError(f"{source}: {describe_class(label, class_names)} has no training examples{also}. {fix}")


def carve(
    labels: np.ndarray, held_out: dict[str, float], seed: int, class_names: Sequence[str], source: str
) -> dict[str, np.ndarray]:
    """``stratified_split`` with named parts (``"train"`` plus ``held_out``'s keys).

    Refuses to carve when some class is too small for every part to get one example of it:
    a validation or test split missing a class measures nothing about that class.
    """
    labels = np.asarray(labels)
    need = smallest_carvable_class(tuple(held_out.values()))
    counts = np.bincount(labels, minlength=len(class_names))
    short = [label for label, count in enumerate(counts) if count < need]
    if short:
        shares = " and ".join(f"{split} ({fraction:g} of each class)" for split, fraction in held_out.items())
        which = ", ".join(f"{describe_class(c, class_names)} has {counts[c]}" for c in short[:5])
        more = f" and {len(short) - 5} more" if len(short) > 5 else ""
        raise ValueError(
            f"{source}: too few examples to carve {shares} from the training data: {which}{more}, "
            f"but each class needs at least {need} so that {', '.join(['train', *held_out][:-1])} and "
            f"{list(held_out)[-1]} get one each. "
            f"Add examples, provide {' and '.join(held_out)} data of your own, or change "
            f"{' / '.join(f'{split}_fraction' for split in held_out)} in the task description."
        )
    parts = stratified_split(labels, tuple(held_out.values()), seed)
    return dict(zip(("train", *held_out), parts))


def subsample_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` indices drawn without replacement, keeping class proportions where possible.

    Each class gets ``n * share`` examples rounded down; the remaining slots go to the
    classes with the largest rounding remainders (ties to the smaller class id).
    """
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    if n < 0:
        raise ValueError(f"cannot subsample {n} examples")
    classes, counts = np.unique(labels, return_counts=True)
    exact = n * counts / counts.sum()
    quota = np.floor(exact).astype(int)
    leftover = n - quota.sum()
    # Stable sort on the negated remainder: largest remainder first, ties by class id.
    quota[np.argsort(-(exact - quota), kind="stable")[:leftover]] += 1
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(labels == cls), size=q, replace=False)
        for cls, q in zip(classes, quota)
    ]
    return np.sort(np.concatenate(chosen))


class _Split(Protocol):
    labels: np.ndarray

    def take(self, indices: np.ndarray): ...


S = TypeVar("S", bound=_Split)


def subsample(split: S, n: int, seed: int = 0) -> S:
    """At most ``n`` examples of ``split`` (text or image), class-stratified and seeded.

    Use it to cap validation/test sizes; the result is the same for the same seed.
    """
    return split.take(subsample_indices(split.labels, n, seed))


# --- notes a loader records about its splits (shared by the text and image loaders) -------


def seed_note(seed: int) -> str:
    return f"(seed={seed}; another seed gives another split)"


def carving_note(fractions: dict[str, float], seed: int) -> str:
    """What carving ``fractions`` of each class out of train did."""
    shares = " and ".join(f"{s} {f:g}" for s, f in fractions.items())
    return f"carved from train, seeded and class-stratified: {shares} of each class {seed_note(seed)}"


def per_class_note(labels: np.ndarray, classes: Sequence[str], noun: str = "examples") -> str:
    """How many training ``noun`` each class has."""
    counts = np.bincount(labels, minlength=len(classes))
    return f"training {noun} per class: " + ", ".join(f"{c} {n:,}" for c, n in zip(classes, counts))
