"""The one way a hyper-parameter is chosen on data: on the validation split, never on test.

    chosen = select("lambda", LAMBDA_GRID, score, track)   # score(value, validation_view) -> float
    chosen.best, chosen.scores, chosen.note

``score`` receives a :class:`ValidationOnly` view of the data, through which reading any split
but ``validation`` raises :class:`TestSplitAccessed`: selection cannot peek at test even by
mistake. When the best value lies on the edge of a numeric grid, the grid is extended by its
own step (within ``bounds``); if the optimum is still on the edge, or the edge is a bound,
``note`` says so, and notebooks print it in their findings (an optimum on the edge of a grid
is a finding, not a result).

``refinements`` searches coarse-to-fine: after the grid (and any extension), each refinement
halves the step and scores the two neighbours of the best value at that step. A coarse grid
with one refinement reaches the fine grid's resolution around the optimum at about 60% of its
evaluations, and picks the same value whenever the validation curve has a single peak at the
coarse resolution (in notebook 01's committed run it picked the same λ for all 8 merges).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


class TestSplitAccessed(RuntimeError):
    """Raised when code running inside a selection reads a split other than validation."""

    __test__ = False  # not a pytest test class, despite its name


class ValidationOnly:
    """A view of a track (anything with ``split(task, which)``) that serves only validation data.

    Every other attribute (tasks, name, encoders, identity) passes through unchanged.
    """

    _BLOCKED = ("raw", "_raw_task", "_load")

    def __init__(self, data):
        self._data = data

    def split(self, task: str, which: str):
        if which != "validation":
            raise TestSplitAccessed(
                f"selection read the {which!r} split of task {task!r}: hyper-parameters are chosen on "
                "'validation' only. Pass split='validation' in the scoring function."
            )
        return self._data.split(task, which)

    def __getattr__(self, name: str):
        if name in ValidationOnly._BLOCKED:
            raise TestSplitAccessed(f"selection may not read raw task data ({name}); use split(task, 'validation').")
        return getattr(self._data, name)


@dataclass
class Selection:
    """The outcome of :func:`select`: the chosen value, every score, and what a reader should know."""

    parameter: str
    best: Any
    best_score: float
    scores: list[tuple[Any, float]] = field(default_factory=list)  # (value, validation score), ascending
    on_edge: str | None = None      # "lower" / "upper" when the optimum stayed on an edge
    extended: list[Any] = field(default_factory=list)  # values added beyond the given grid
    at_bound: bool = False  # the edge optimum is a bound of the parameter: nothing lies beyond it

    @property
    def note(self) -> str:
        parts = []
        if self.extended:
            parts.append(f"grid extended by {', '.join(f'{v:g}' for v in self.extended)} because the optimum lay on its edge")
        if self.on_edge:
            where = (f"{self.parameter} = {self.best:g} is on the {self.on_edge} edge of the searched grid "
                     f"({self.scores[0][0]:g}…{self.scores[-1][0]:g})")
            parts.append(f"{where}, which is the bound of {self.parameter}" if self.at_bound
                         else f"{where}: the optimum may lie beyond it")
        return "; ".join(parts)


def _uniform_step(grid: Sequence[float], at: str) -> float | None:
    """The spacing of the two outermost values on one side of the grid."""
    if len(grid) < 2:
        return None
    return (grid[1] - grid[0]) if at == "lower" else (grid[-1] - grid[-2])


def _clamp(value: float, bounds: tuple[float | None, float | None]) -> float:
    """``value`` moved inside ``bounds`` (a step past a bound stops at it), rounded off float noise."""
    low, high = bounds
    if low is not None:
        value = max(value, low)
    if high is not None:
        value = min(value, high)
    return round(value, 10)


def select(
    parameter: str,
    grid: Sequence[Any],
    score: Callable[[Any, ValidationOnly], float],
    data,
    *,
    bounds: tuple[float | None, float | None] = (None, None),
    max_extensions: int = 4,
    refinements: int = 0,
) -> Selection:
    """The grid value with the highest validation ``score`` (the smallest such value on ties).

    ``refinements``: coarse-to-fine halvings of the step around the best value (module docstring).
    ``bounds`` limit how far a numeric grid may be extended (e.g. ``(0, None)`` for a scale that
    cannot be negative; a step past a bound stops at the bound); a non-numeric grid is never extended.
    """
    if len(grid) == 0:
        raise ValueError(f"empty grid for {parameter!r}: pass at least one value.")
    view = data if isinstance(data, ValidationOnly) else ValidationOnly(data)
    scores: dict[Any, float] = {}

    def evaluate(value):
        if value not in scores:
            scores[value] = float(score(value, view))

    for value in grid:
        evaluate(value)
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in grid)
    extended: list[Any] = []
    for _ in range(max_extensions if numeric else 0):
        ordered = sorted(scores)
        best = max(ordered, key=lambda v: (scores[v], -v))
        side = "lower" if best == ordered[0] and len(ordered) > 1 else "upper" if best == ordered[-1] and len(ordered) > 1 else None
        if side is None:
            break
        step = _uniform_step(ordered, side)
        new = _clamp(best - step if side == "lower" else best + step, bounds)
        if new in scores:  # the optimum is the bound itself
            break
        evaluate(new)
        extended.append(new)
    if numeric and len(grid) > 1:
        step = min(b - a for a, b in zip(sorted(grid), sorted(grid)[1:]))
        for _ in range(refinements):
            step /= 2
            best = max(sorted(scores), key=lambda v: (scores[v], -v))
            for neighbour in (best - step, best + step):
                evaluate(_clamp(neighbour, bounds))
    ordered = sorted(scores) if numeric else list(grid)
    best = max(ordered, key=lambda v: scores[v])  # first maximum in ascending order
    edge, at_bound = None, False
    if numeric and len(ordered) > 1:
        edge = "lower" if best == ordered[0] else "upper" if best == ordered[-1] else None
        at_bound = edge is not None and best == bounds[0 if edge == "lower" else 1]
    return Selection(parameter, best, scores[best], [(v, scores[v]) for v in ordered], edge, extended, at_bound)
