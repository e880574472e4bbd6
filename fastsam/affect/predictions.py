"""The predictions CSV of ``evaluate --predictions``: one column per label, as pandas, spreadsheets and the
ABAW submission scripts read it.

- AU: ``image,AU1,AU2,AU4,AU6,AU7,AU10,AU12,AU15,AU23,AU24,AU25,AU26``, one 0/1 per AU column.
- EXPR: ``image,expression``, the class index (0 Neutral ... 7 Other, in ``tasks.EXPR.names`` order).

Files of earlier fastsam versions (``image,label``, AU's 12 values joined in one quoted field) read back too.
"""
from __future__ import annotations

import csv
import os
from typing import List, Sequence, Tuple

import numpy as np

from .tasks import Task

EXPR_COLUMN = "expression"
LEGACY_HEADER = ["image", "label"]  # earlier versions: AU's 12 values in one quoted field


def header(task: Task) -> List[str]:
    """The CSV header of ``task``'s predictions."""
    return ["image", *task.names] if task.multilabel else ["image", EXPR_COLUMN]


def _check_values(pred: np.ndarray, task: Task, where: str) -> None:
    bad = (pred < 0) | (pred > 1) if task.multilabel else (pred < 0) | (pred >= task.outputs)
    if bad.any():
        what = "0 or 1" if task.multilabel else f"a class index in [0, {task.outputs})"
        raise ValueError(f"{where}: every prediction must be {what}, got {pred[bad].reshape(-1)[0]}")


def write_predictions(path, images: Sequence[str], pred: np.ndarray, task: Task) -> None:
    """Writes ``pred`` (int ``[n]`` classes for EXPR, ``[n, 12]`` 0/1 for AU) for ``images`` (``n`` names) to
    the CSV ``path``, in the layout of the module docstring."""
    pred = np.asarray(pred)
    shape = (len(images), task.outputs) if task.multilabel else (len(images),)
    if pred.shape != shape:
        raise ValueError(f"pred has shape {pred.shape}; {len(images)} {task.name} predictions have shape {shape}")
    _check_values(pred, task, "pred")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header(task))
        for image, p in zip(images, pred):
            writer.writerow([image, *(int(v) for v in p)] if task.multilabel else [image, int(p)])


def read_predictions(path, task: Task) -> Tuple[List[str], np.ndarray]:
    """The image names and predictions (int64 ``[n]`` for EXPR, ``[n, 12]`` for AU) of a predictions CSV in
    this layout or the earlier ``image,label`` one. Raises ValueError naming the file and line on another
    header, a short row or a value out of range."""
    path = os.fspath(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] not in (header(task), LEGACY_HEADER):
        raise ValueError(f"{path}: header {rows[0] if rows else None} is neither {','.join(header(task))} nor the "
                         f"earlier {','.join(LEGACY_HEADER)} ({task.name} predictions)")
    legacy = rows[0] == LEGACY_HEADER
    width = task.outputs if task.multilabel else 1
    images, values = [], []
    for line, row in enumerate(rows[1:], start=2):
        fields = row[1].split(",") if legacy and task.multilabel and len(row) == 2 else row[1:]
        if len(fields) != width:
            raise ValueError(f"{path}:{line}: {len(fields)} values, expected {width} ({task.name})")
        try:
            values.append([int(v) for v in fields])
        except ValueError:
            raise ValueError(f"{path}:{line}: not integers: {fields}") from None
        images.append(row[0])
    pred = np.asarray(values, dtype=np.int64).reshape(-1, width)
    pred = pred if task.multilabel else pred[:, 0]
    _check_values(pred, task, path)
    return images, pred
