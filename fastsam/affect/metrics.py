"""ABAW evaluation metrics in numpy: EXPR macro F1 over all 8 classes, AU mean binary F1 over 12 labels.

Conventions match scikit-learn's ``f1_score(..., zero_division=0)``: a class with no positives and no
predictions scores 0, and macro averages include every class, present or not.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from .tasks import Task


def _to_numpy(x, name: str) -> np.ndarray:
    # Accept torch tensors without importing torch here: they expose .detach().cpu().numpy().
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    if not isinstance(x, (np.ndarray, list, tuple)):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    return np.asarray(x)


def _int_array(x, name: str, ndim: int) -> np.ndarray:
    x = _to_numpy(x, name)
    if x.size and not np.issubdtype(x.dtype, np.integer) and not np.issubdtype(x.dtype, np.bool_):
        raise TypeError(f"{name} must hold integers, got dtype {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {x.shape}")
    return x.astype(np.int64)


def f1_from_counts(tp, fp, fn) -> np.ndarray:
    """F1 = 2tp / (2tp + fp + fn) elementwise, float64, 0 where the denominator is 0."""
    tp, fp, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn))
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros(np.broadcast(tp, fp, fn).shape), where=denom > 0)


def expr_f1(pred, target, num_classes: int = 8) -> Tuple[float, np.ndarray]:
    """Macro F1 over all ``num_classes`` classes, and the per-class F1 (float64 ``[num_classes]``).

    ``pred``/``target``: int arrays ``[n]`` with values in ``[0, num_classes)``.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    pred, target = _int_array(pred, "pred", 1), _int_array(target, "target", 1)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {pred.shape} vs {target.shape}")
    for name, x in (("pred", pred), ("target", target)):
        if x.size and (x.min() < 0 or x.max() >= num_classes):
            raise ValueError(f"{name} values must lie in [0, {num_classes}), got {x.min()}..{x.max()}")
    tp = np.bincount(target[pred == target], minlength=num_classes)
    fp = np.bincount(pred, minlength=num_classes) - tp
    fn = np.bincount(target, minlength=num_classes) - tp
    per_class = f1_from_counts(tp, fp, fn)
    return float(per_class.mean()), per_class


def au_f1(pred, target) -> Tuple[float, np.ndarray]:
    """Mean over labels of binary F1 (positive class 1), and the per-label F1 (float64 ``[L]``).

    ``pred``/``target``: 0/1 int arrays ``[n, L]``.
    """
    pred, target = _int_array(pred, "pred", 2), _int_array(target, "target", 2)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {pred.shape} vs {target.shape}")
    for name, x in (("pred", pred), ("target", target)):
        if not np.isin(x, (0, 1)).all():
            raise ValueError(f"{name} must hold only 0/1 values")
    tp = (pred & target).sum(axis=0)
    fp = (pred & (1 - target)).sum(axis=0)
    fn = ((1 - pred) & target).sum(axis=0)
    per_label = f1_from_counts(tp, fp, fn)
    return float(per_label.mean()), per_label


def au_predict(logits, threshold: float = 0.5) -> np.ndarray:
    """0/1 int64 predictions, same shape as ``logits``: sigmoid(logits) >= ``threshold``.

    ``logits``: float numpy array or torch tensor; ``threshold`` in (0, 1).
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold!r}")
    logits = _to_numpy(logits, "logits").astype(np.float64)
    # Compare in logit space: sigmoid(x) >= t  <=>  x >= log(t / (1 - t)), and no overflow for large |x|.
    return (logits >= np.log(threshold / (1.0 - threshold))).astype(np.int64)


def expr_predict(logits) -> np.ndarray:
    """Class predictions, int64 ``[n]``: argmax over the last axis of ``logits`` ``[n, C]``."""
    logits = _to_numpy(logits, "logits")
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D [n, classes], got shape {logits.shape}")
    return logits.argmax(axis=1).astype(np.int64)


def score_from_counts(task: Task, tp, fp, fn) -> dict:
    """:func:`score` from the per-class (EXPR) or per-AU counts of true positives, false positives and false
    negatives (int arrays ``[classes]``): what a loop that counts on the device reads once."""
    return _result(task, f1_from_counts(tp, fp, fn))


def _result(task: Task, per: np.ndarray) -> dict:
    """The score dict of per-class (or per-AU) F1 ``per``; their mean is the score."""
    if per.shape != (len(task.names),):
        raise ValueError(f"pred has {len(per)} labels but task {task.name} has {len(task.names)}")
    return {"f1": float(per.mean()), "per_class": {n: float(v) for n, v in zip(task.names, per)}}


def score(task: Task, pred, target) -> dict:
    """``{"f1": float, "per_class": {name: float}}`` for ``task`` (EXPR macro F1 or AU mean F1)."""
    if not isinstance(task, Task):
        raise TypeError(f"task must be a fastsam.affect.tasks.Task, got {type(task).__name__}")
    if task.multilabel:
        _, per = au_f1(pred, target)
    else:
        _, per = expr_f1(pred, target, num_classes=len(task.names))
    return _result(task, per)
