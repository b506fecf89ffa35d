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
        for k, fraction in enumerate(held_out, start=1):
            count = int(np.floor(fraction * len(members) + 0.5))  # round half up, not to even
            parts[k].append(members[start : start + count])
            start += count
        parts[0].append(members[start:])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


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
