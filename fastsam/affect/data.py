"""Aff-Wild2 (ABAW) annotation readers: per-video label files -> frame lists with image names.

Layout: ``<images>/<video>/00001.jpg ...`` and ``<annotations>/{Train_Set,Validation_Set}/<video>.txt``
(``annotations`` may also name the split folder itself: see :func:`split_folder`).
A file's first line is the task's header (``Task.names`` joined by commas); data line i (1-based after
the header) labels image ``<video>/{i:05d}.jpg``. ``-1`` marks a frame without a valid label.
Videos named ``*_left``/``*_right`` (two subjects in one clip) have their own image folders and are
treated as ordinary names.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import List, Tuple, Union

import numpy as np

from .tasks import TASKS, Task

SPLITS = {"train": "Train_Set", "val": "Validation_Set"}

INVALID = -1


def _check_task(task) -> Task:
    if not isinstance(task, Task):
        raise TypeError(f"task must be a fastsam.affect.tasks.Task (EXPR or AU), got {type(task).__name__}")
    return task


def _header_task(header: str):
    """The task whose header this line is, or None."""
    fields = tuple(f.strip() for f in header.split(","))
    for t in TASKS.values():
        if fields == t.names:
            return t
    return None


def read_annotation(path, task: Task) -> np.ndarray:
    """Read one video's annotation file.

    Returns int64 ``[n]`` (EXPR class per frame) or ``[n, 12]`` (AU 0/1 per frame), one row per data
    line, raw values including -1. Trailing whitespace, CRLF line ends and blank trailing lines are
    tolerated; a blank line followed by more data is an error (it would shift the frame numbering).
    """
    task = _check_task(task)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file {path} does not exist")
    with open(path, "r", encoding="utf-8-sig", newline=None) as f:
        lines = [line.rstrip() for line in f]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise ValueError(f"{path}: empty file, expected the {task.name} header")
    seen = _header_task(lines[0])
    if seen != task:
        what = f"the {seen.name.upper()} header" if seen is not None else f"not a known header ({lines[0][:80]!r})"
        raise ValueError(
            f"{path}:1: header is {what}, but task is {task.name}: "
            f"point --annotations at the {task.name.upper()} folder"
        )
    width = len(task.names)
    allowed = {-1, 0, 1} if task.multilabel else set(range(-1, width))
    rows = []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split(",")
        if task.multilabel and len(fields) != width:
            raise ValueError(f"{path}:{lineno}: expected {width} comma-separated values, got {len(fields)}")
        if not task.multilabel and len(fields) != 1:
            raise ValueError(f"{path}:{lineno}: expected one class index, got {len(fields)} values")
        try:
            values = [int(v) for v in fields]
        except ValueError:
            raise ValueError(f"{path}:{lineno}: not an integer line: {line[:80]!r}") from None
        bad = [v for v in values if v not in allowed]
        if bad:
            want = "-1 (invalid), 0 or 1" if task.multilabel else f"-1 (invalid) or 0..{width - 1}"
            raise ValueError(f"{path}:{lineno}: value {bad[0]} out of range, expected {want}")
        rows.append(values if task.multilabel else values[0])
    shape = (len(rows), width) if task.multilabel else (len(rows),)
    return np.asarray(rows, dtype=np.int64).reshape(shape)


@dataclass(frozen=True)
class Frame:
    """One labelled frame: ``frame`` is 1-based; ``label`` is an int (EXPR) or a 12-tuple of 0/1 (AU)."""

    video: str
    frame: int
    label: Union[int, Tuple[int, ...]]

    @property
    def image(self) -> str:
        """The image's name relative to the images root, '/'-separated: ``video/00001.jpg``."""
        return f"{self.video}/{self.frame:05d}.jpg"


@dataclass
class ScanStats:
    """Counts from one ``scan_split``: ``frames`` kept; ``invalid`` skipped for a -1 label;
    ``missing`` had a valid label but no image file."""

    videos: int = 0
    frames: int = 0
    invalid: int = 0
    missing: int = 0

    def as_dict(self) -> dict:
        """The counts as a plain dict (for logs and JSON)."""
        return asdict(self)


def split_folder(annotations_dir, split: str) -> Tuple[str, bool]:
    """The folder of ``split``'s ``.txt`` files, and whether ``annotations_dir`` was its parent.

    ``annotations_dir`` is either the task's folder holding ``Train_Set``/``Validation_Set`` (the parent: its
    ``SPLITS[split]`` sub-folder is used) or a split folder itself, holding the ``.txt`` files. Raises
    FileNotFoundError when it is neither, and ValueError when it is the other split's folder."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    annotations_dir = os.fspath(annotations_dir)
    if not os.path.isdir(annotations_dir):
        raise FileNotFoundError(f"annotations_dir {annotations_dir} does not exist or is not a folder")
    inside = os.path.join(annotations_dir, SPLITS[split])
    if os.path.isdir(inside):
        return inside, True
    name = os.path.basename(os.path.normpath(annotations_dir))
    if any(n.endswith(".txt") for n in os.listdir(annotations_dir)):
        others = [f for s, f in SPLITS.items() if s != split and f == name]
        if others:
            raise ValueError(f"{annotations_dir} is the {others[0]} folder, but the split is {split} "
                             f"({SPLITS[split]}): point --annotations at {SPLITS[split]} or at their parent")
        return annotations_dir, False
    raise FileNotFoundError(f"{inside} not found: --annotations must be the task's folder holding "
                            f"{' and '.join(SPLITS.values())}, or the {SPLITS[split]} folder itself (one .txt "
                            "per video)")


def scan_split(images_dir, annotations_dir, task: Task, split: str) -> Tuple[List[Frame], ScanStats]:
    """All usable frames of one split, videos sorted by name, frames in file order.

    ``annotations_dir`` holds ``Train_Set``/``Validation_Set``, or is the split's folder itself (see
    :func:`split_folder`); ``split`` is "train" or "val".
    EXPR frames labelled -1 and AU frames with ANY -1 entry are skipped as invalid: in ABAW a -1
    marks the whole frame as unannotated, so a partial AU row is not trusted either.
    Frames whose image is absent (including a whole missing image folder) are counted as missing.
    """
    task = _check_task(task)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    images_dir = os.fspath(images_dir)
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"images_dir {images_dir} does not exist or is not a folder")
    split_dir, _ = split_folder(annotations_dir, split)
    names = sorted(n for n in os.listdir(split_dir) if n.endswith(".txt"))
    if not names:
        raise ValueError(f"{split_dir}: no .txt annotation files")

    frames: List[Frame] = []
    stats = ScanStats(videos=len(names))
    for name in names:
        video = name[: -len(".txt")]
        labels = read_annotation(os.path.join(split_dir, name), task)
        valid = (labels != INVALID).all(axis=1) if task.multilabel else labels != INVALID
        stats.invalid += int((~valid).sum())
        folder = os.path.join(images_dir, video)
        # One listdir per video instead of one stat per frame: Aff-Wild2 has millions of frames.
        present = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        for i in np.flatnonzero(valid):
            frame = int(i) + 1
            if f"{frame:05d}.jpg" not in present:
                stats.missing += 1
                continue
            label = tuple(int(v) for v in labels[i]) if task.multilabel else int(labels[i])
            frames.append(Frame(video, frame, label))
    stats.frames = len(frames)
    return frames, stats


def labels_array(frames, task: Task) -> np.ndarray:
    """The frames' labels stacked: int64 ``[n]`` (EXPR) or ``[n, 12]`` (AU)."""
    task = _check_task(task)
    shape = (len(frames), len(task.names)) if task.multilabel else (len(frames),)
    out = np.asarray([f.label for f in frames], dtype=np.int64)
    if out.size and out.shape != shape:
        raise ValueError(f"frames have labels of shape {out.shape[1:]}, not {task.name} labels")
    return out.reshape(shape)
