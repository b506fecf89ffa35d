"""Verdicts as tested code: every "X beats Y" carries an uncertainty and names its trivial baseline.

Accuracy on a task's test set is a mean of per-example 0/1 outcomes, so its standard error is
known; a difference between two models on the *same* examples is paired, which removes the
variance the two share. Everything is in percentage points.

    d = paired_difference(correct_a, correct_b)        # {task: bool array} each -> Estimate
    verdict(d)                                          # "better" / "worse" / "within noise"
    Claim("layer-wise beats task-wise", held(d), f"{d}", baseline="θ0").markdown()

A score that is not a mean of per-example terms (Matthews correlation, F1, Pearson's r: GLUE's
official metrics) has no such formula; :func:`paired_bootstrap` estimates its standard error by
resampling the test examples, the same draw for both models (paired).

Notebooks build their claims from these functions (each notebook's module has a
``findings(...)`` that returns the Markdown), so no verdict is typed into a cell.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

# A difference counts when it exceeds this many standard errors (about a 95% two-sided test).
Z = 2.0


@dataclass(frozen=True)
class Estimate:
    """A value with its standard error, in the units of the value (percentage points here)."""

    value: float
    se: float

    def __str__(self) -> str:
        return f"{_shown(self.value):+.1f} ± {self.se:.1f}"

    def plain(self) -> str:
        return f"{_shown(self.value):.1f} ± {self.se:.1f}"


def _shown(value: float) -> float:
    """``value`` rounded as it is shown (one decimal), with a negative zero made +0: a difference
    of −0.0001 (float rounding, which differs between CPUs) reads "+0.0", not "-0.0"."""
    return round(value, 1) + 0.0


def _as_bool(outcomes) -> np.ndarray:
    array = np.asarray(outcomes)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"expected a non-empty 1-D array of per-example outcomes, got shape {array.shape}")
    return array.astype(float)


def mean_accuracy(correct: Mapping[str, Sequence[bool]]) -> Estimate:
    """The task-averaged accuracy (%) and its standard error (tasks independent, examples Bernoulli)."""
    if not correct:
        raise ValueError("no tasks given")
    means, variances = [], []
    for task, outcomes in correct.items():
        x = _as_bool(outcomes)
        means.append(x.mean())
        variances.append(x.var(ddof=1) / len(x) if len(x) > 1 else 0.0)
    t = len(means)
    return Estimate(100 * float(np.mean(means)), 100 * math.sqrt(sum(variances)) / t)


def paired_difference(a: Mapping[str, Sequence[bool]], b: Mapping[str, Sequence[bool]]) -> Estimate:
    """Task-averaged accuracy of ``a`` minus ``b`` (points), with the paired standard error.

    ``a[t]`` and ``b[t]`` are per-example outcomes on the same examples of task ``t``.
    """
    if set(a) != set(b):
        raise ValueError(f"the two models were scored on different tasks: {sorted(a)} vs {sorted(b)}")
    diffs, variances = [], []
    for task in a:
        xa, xb = _as_bool(a[task]), _as_bool(b[task])
        if xa.shape != xb.shape:
            raise ValueError(f"task {task!r}: {len(xa)} outcomes against {len(xb)}; score both on the same examples")
        d = xa - xb
        diffs.append(d.mean())
        variances.append(d.var(ddof=1) / len(d) if len(d) > 1 else 0.0)
    t = len(diffs)
    return Estimate(100 * float(np.mean(diffs)), 100 * math.sqrt(sum(variances)) / t)


def paired_bootstrap(score: Callable[[str, np.ndarray, np.ndarray], float], a: Mapping[str, Sequence],
                     b: Mapping[str, Sequence] | None = None, resamples: int = 1000, seed: int = 0) -> Estimate:
    """Task-averaged ``score`` of ``a`` minus that of ``b`` (points), with a paired bootstrap SE.

    ``a[t]`` and ``b[t]`` are per-example outcomes (e.g. predictions) on the same examples of task
    ``t``; ``score(t, outcomes, rows)`` is the task's score, in points, of the examples at
    ``rows`` (indices into ``outcomes``; a draw repeats some). The value is the difference on
    the examples as they are; its standard error is the standard deviation, over ``resamples``
    seeded draws, of the same difference computed on examples drawn with replacement: each
    task's examples drawn on their own, the same rows for ``a`` and ``b`` (the variance the two
    models share cancels, as in :func:`paired_difference`). Without ``b``: ``a``'s own average.
    """
    if b is not None and set(a) != set(b):
        raise ValueError(f"the two models were scored on different tasks: {sorted(a)} vs {sorted(b)}")
    if not a:
        raise ValueError("no tasks given")
    if resamples < 2:
        raise ValueError(f"resamples = {resamples}: a standard error needs at least 2 draws.")
    rng = np.random.default_rng(seed)
    value, draws = 0.0, np.zeros(resamples)
    for task in a:
        xa = np.asarray(a[task])
        xb = None if b is None else np.asarray(b[task])
        if len(xa) == 0 or (xb is not None and len(xb) != len(xa)):
            raise ValueError(f"task {task!r}: {len(xa)} outcomes against {len(xb) if xb is not None else '-'}; "
                             "score both models on the same, non-empty set of examples")

        def difference(rows, xa=xa, xb=xb, task=task):
            return score(task, xa, rows) - (0.0 if xb is None else score(task, xb, rows))

        n = len(xa)
        value += difference(np.arange(n))
        for r in range(resamples):
            draws[r] += difference(rng.integers(0, n, n))
    t = len(a)
    return Estimate(value / t, float(np.std(draws / t, ddof=1)))


def difference_of_estimates(a: Estimate, b: Estimate) -> Estimate:
    """``a − b`` for independent estimates (e.g. averages over different seeds)."""
    return Estimate(a.value - b.value, math.hypot(a.se, b.se))


def over_seeds(values: Sequence[float]) -> Estimate:
    """Mean over seeds and its standard error (sample sd / √n); se = nan for one seed."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no seeds given")
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")
    return Estimate(float(x.mean()), se)


def verdict(difference: Estimate, z: float = Z) -> str:
    """"better" / "worse" when the difference exceeds ``z`` standard errors, else "within noise"."""
    if not math.isfinite(difference.se):
        return "undetermined (no uncertainty)"
    if difference.value > z * difference.se:
        return "better"
    if difference.value < -z * difference.se:
        return "worse"
    return "within noise"


def held(difference: Estimate, z: float = Z) -> str:
    """A claim "the difference is positive": held / did not hold / inconclusive."""
    v = verdict(difference, z)
    return {"better": "held", "worse": "did not hold", "within noise": "inconclusive (within noise)"}.get(v, v)


@dataclass
class Claim:
    """One checked claim: what was claimed, whether it held, the numbers, and the trivial baseline."""

    claim: str
    outcome: str
    evidence: str
    baseline: str

    def markdown(self) -> str:
        return f"- **{self.claim}: {self.outcome}.** {self.evidence} Trivial baseline: {self.baseline}."


def findings_markdown(title: str, claims: Sequence[Claim], preamble: str = "", notes: Sequence[str] = ()) -> str:
    """The ``findings.md`` of a notebook: a title, a scale note, one bullet per claim, then notes."""
    lines = [f"# {title}", ""]
    if preamble:
        lines += [preamble, ""]
    lines += [c.markdown() for c in claims]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
