"""Classification metrics, including each benchmark's official one, in plain numpy.

Official metrics (``official_metric(name, ...)``; ``TextTask.metric`` holds the name):

- ``accuracy``: SentEval tasks and the image tasks.
- ``macro_f1``: TweetEval emoji, emotion, hate and offensive.
- ``irony_f1``: TweetEval irony, the F1 of the ironic class (label 1).
- ``stance_f1``: TweetEval stance, the mean of the F1 of "against" (1) and "favor" (2);
  the official number is computed on the five targets' test sets concatenated.
- ``macro_recall``: TweetEval sentiment (not in the mirror; here for completeness).
- ``matthews``: the Matthews correlation coefficient (multi-class form), in [-1, 1]; a
  choice for a user's imbalanced task (0 for constant predictions, however common the class).

These follow TweetEval's evaluation script, which uses scikit-learn's
``classification_report``: a class's F1 is 0 when it has no true positives, and the macro
average runs over the classes that occur in ``y_true`` or ``y_pred`` (a class absent from
both has no defined score and is left out).
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def _check(y_true, y_pred, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true).astype(np.int64).ravel()
    y_pred = np.asarray(y_pred).astype(np.int64).ravel()
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels but y_pred has {len(y_pred)}")
    if len(y_true) == 0:
        raise ValueError("cannot score an empty set of predictions")
    if num_classes is not None:
        for name, y in (("y_true", y_true), ("y_pred", y_pred)):
            if y.min() < 0 or y.max() >= num_classes:
                raise ValueError(f"{name} has labels outside 0..{num_classes - 1}")
    return y_true, y_pred


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """``[num_classes, num_classes]`` counts; row = true class, column = predicted class."""
    y_true, y_pred = _check(y_true, y_pred, num_classes)
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def accuracy(y_true, y_pred) -> float:
    y_true, y_pred = _check(y_true, y_pred)
    return float(np.mean(y_true == y_pred))


def f1_per_class(y_true, y_pred, num_classes: int) -> np.ndarray:
    """F1 of each class, ``2 TP / (2 TP + FP + FN)``; 0 where that is 0/0."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(float)
    denominator = cm.sum(0) + cm.sum(1)  # (TP + FP) + (TP + FN)
    return np.divide(2 * tp, denominator, out=np.zeros(num_classes), where=denominator > 0)


def _present(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Mask of the classes that occur among the true or the predicted labels."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    return (cm.sum(0) + cm.sum(1)) > 0


def macro_f1(y_true, y_pred, num_classes: int) -> float:
    """Unweighted mean of the per-class F1 over the classes that occur (see module doc)."""
    return float(f1_per_class(y_true, y_pred, num_classes)[_present(y_true, y_pred, num_classes)].mean())


def macro_recall(y_true, y_pred, num_classes: int) -> float:
    """Unweighted mean of the per-class recall over the classes that occur."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    support = cm.sum(1)
    recall = np.divide(np.diag(cm), support, out=np.zeros(num_classes), where=support > 0)
    return float(recall[_present(y_true, y_pred, num_classes)].mean())


def irony_f1(y_true, y_pred, num_classes: int = 2) -> float:
    """F1 of the ironic class (label 1), TweetEval's irony metric."""
    return float(f1_per_class(y_true, y_pred, num_classes)[1])


def stance_f1(y_true, y_pred, num_classes: int = 3) -> float:
    """Mean F1 of "against" (1) and "favor" (2), TweetEval's stance metric."""
    f1 = f1_per_class(y_true, y_pred, num_classes)
    return float((f1[1] + f1[2]) / 2)


def matthews(y_true, y_pred, num_classes: int) -> float:
    """Matthews correlation coefficient from the confusion matrix ``C`` (Gorodkin's R_K).

    ``(c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2))`` with ``c`` the
    correct predictions, ``s`` all of them, ``t_k``/``p_k`` how often class k is true/predicted.
    For two classes this is the usual ``(TP TN - FP FN) / sqrt(...)``. 0 where the
    denominator is 0 (one class only among the labels or the predictions), as scikit-learn does.
    """
    cm = confusion_matrix(y_true, y_pred, num_classes).astype(float)
    t, p, c, s = cm.sum(1), cm.sum(0), np.trace(cm), cm.sum()
    denominator = np.sqrt((s**2 - p @ p) * (s**2 - t @ t))
    return float((c * s - p @ t) / denominator) if denominator > 0 else 0.0


OFFICIAL_METRICS: dict[str, Callable[..., float]] = {
    "accuracy": lambda y_true, y_pred, num_classes: accuracy(y_true, y_pred),
    "macro_f1": macro_f1,
    "irony_f1": irony_f1,
    "stance_f1": stance_f1,
    "macro_recall": macro_recall,
    "matthews": matthews,
}


def official_metric(metric_name: str, y_true, y_pred, num_classes: int) -> float:
    """The metric named ``metric_name`` (a key of ``OFFICIAL_METRICS``): in [0, 1], matthews in [-1, 1]."""
    if metric_name not in OFFICIAL_METRICS:
        raise ValueError(f"Unknown metric {metric_name!r}; known: {', '.join(OFFICIAL_METRICS)}")
    _check(y_true, y_pred, num_classes)
    return OFFICIAL_METRICS[metric_name](y_true, y_pred, num_classes)
