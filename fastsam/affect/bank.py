"""The feature bank: CLIP image features of one split, extracted once and memory-mapped from disk.

A bank is a folder holding
  features.npy   float16 [N, D], written row batch by row batch through a memmap;
  labels.npy     int64 [N] (EXPR) or [N, 12] (AU);
  index.csv      header ``image,video,frame`` then one row per feature row;
  manifest.json  what was extracted (task, split, encoder checkpoint and its sha256, preprocessing,
                 scan counts, a hash of the frame list) and how far: ``done`` rows, ``complete``.
An interrupted extraction resumes from ``done``; a complete one with the same checkpoint and frame list
is reused as is; a bank of anything else is never overwritten.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

from .data import Frame, ScanStats, labels_array
from .encoder import checkpoint_sha256, load_clip_visual
from .preprocess import MEAN, STD, load_image
from .progress import Progress
from .tasks import Task, get_task

FORMAT = 1
FEATURES, LABELS, INDEX, MANIFEST = "features.npy", "labels.npy", "index.csv", "manifest.json"
_MANIFEST_TMP = MANIFEST + ".tmp"
_BANK_FILES = {FEATURES, LABELS, INDEX, MANIFEST, _MANIFEST_TMP}


@dataclass(eq=False)
class Bank:
    """A loaded bank. ``features`` is a read-only memmap float16 ``[N, D]``; ``labels`` int64 ``[N]`` or
    ``[N, 12]``; ``images``/``videos`` the index columns; ``frames`` int64 ``[N]`` (1-based)."""

    path: str
    features: np.memmap
    labels: np.ndarray
    images: List[str]
    videos: List[str]
    frames: np.ndarray
    task: Task
    manifest: dict

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        """The feature width D."""
        return int(self.features.shape[1])


def frames_sha256(frames: Sequence[Frame]) -> str:
    """sha256 (hex) of the ordered image names and labels: two frame lists hash equal iff a bank of one
    is a bank of the other."""
    h = hashlib.sha256()
    for f in frames:
        label = ",".join(map(str, f.label)) if isinstance(f.label, tuple) else str(f.label)
        h.update(f"{f.image}\t{label}\n".encode("utf-8"))
    return h.hexdigest()


def _write_manifest(out: str, manifest: dict) -> None:
    # Write-then-rename: os.replace is atomic, so an interruption leaves the old or the new manifest,
    # never a truncated one.
    tmp = os.path.join(out, _MANIFEST_TMP)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(out, MANIFEST))


def _read_manifest(path: str) -> dict:
    file = os.path.join(path, MANIFEST)
    try:
        with open(file, "r", encoding="utf-8") as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e}); delete the folder {path} and extract again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{file}: unknown bank format (expected format {FORMAT})")
    return manifest


def _check_reusable(out: str, manifest: dict, wanted: dict) -> None:
    """Raise unless the bank in ``out`` was (or is being) extracted from the same inputs as ``wanted``."""
    diffs = []
    have, want = manifest.get("encoder", {}), wanted["encoder"]
    if have.get("sha256") != want["sha256"]:
        diffs.append(f"encoder checkpoint {have.get('checkpoint')} (sha256 {str(have.get('sha256'))[:12]}...) "
                     f"instead of {want['checkpoint']} (sha256 {want['sha256'][:12]}...)")
    for key in ("task", "split"):
        if manifest.get(key) != wanted[key]:
            diffs.append(f"{key} {manifest.get(key)!r} instead of {wanted[key]!r}")
    if manifest.get("frames_sha256") != wanted["frames_sha256"]:
        diffs.append(f"another frame list (frames_sha256 {str(manifest.get('frames_sha256'))[:12]}... instead of "
                     f"{wanted['frames_sha256'][:12]}...)")
    if diffs:
        raise ValueError(
            f"{out} already holds a feature bank of different inputs: " + "; ".join(diffs)
            + "; choose another --out or delete that folder"
        )


def _create(out: str, frames: Sequence[Frame], labels: np.ndarray, manifest: dict) -> np.memmap:
    os.makedirs(out, exist_ok=True)
    n, dim = len(frames), manifest["dim"]
    features = np.lib.format.open_memmap(os.path.join(out, FEATURES), mode="w+", dtype=np.float16, shape=(n, dim))
    np.save(os.path.join(out, LABELS), labels)
    with open(os.path.join(out, INDEX), "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "video", "frame"])
        w.writerows([fr.image, fr.video, fr.frame] for fr in frames)
    # The manifest comes last: a folder without one holds nothing worth keeping and is recreated.
    _write_manifest(out, manifest)
    return features


def extract_bank(frames: Sequence[Frame], stats: ScanStats, task: Task, split: str, images_dir, checkpoint, out,
                 batch_size: int = 64, device="cpu", progress: bool = True) -> Bank:
    """Encode every frame's image with the CLIP image tower in ``checkpoint`` into the bank folder ``out``.

    Rows follow ``frames`` order; each row is the encoder's fp32 output for
    ``load_image(images_dir/frame.image, encoder.resolution)`` stored as float16. A complete bank of the
    same checkpoint (by sha256) and frame list in ``out`` is reused without computing anything; an
    interrupted one is resumed; a bank of other inputs raises ValueError. Returns ``load_bank(out)``.
    """
    if not isinstance(task, Task):
        raise TypeError(f"task must be a fastsam.affect.tasks.Task (EXPR or AU), got {type(task).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if len(frames) == 0:
        raise ValueError(
            f"no frames to extract for task {task.name}, split {split!r}: "
            "check --images/--annotations/--split (every frame was invalid, missing or unlisted)"
        )
    out, images_dir, checkpoint = os.fspath(out), os.fspath(images_dir), os.path.abspath(os.fspath(checkpoint))
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out {out} exists and is not a folder; choose another --out")
    labels = labels_array(frames, task)
    wanted = {"encoder": {"checkpoint": checkpoint, "sha256": checkpoint_sha256(checkpoint)},
              "task": task.name, "split": split, "frames_sha256": frames_sha256(frames)}

    existing = None
    if os.path.isfile(os.path.join(out, MANIFEST)):
        existing = _read_manifest(out)
        _check_reusable(out, existing, wanted)
        if existing.get("complete"):
            print(f"reusing the complete feature bank in {out} ({existing['rows']} rows)", file=sys.stderr)
            return load_bank(out, task)
    elif os.path.isdir(out):
        foreign = sorted(set(os.listdir(out)) - _BANK_FILES)
        if foreign:
            raise ValueError(
                f"out {out} is a non-empty folder that is not a feature bank (it holds {foreign[0]!r}); "
                "choose another --out or delete that folder"
            )

    encoder = load_clip_visual(checkpoint, device=device).eval()
    n = len(frames)
    if existing is None:
        manifest = {
            "format": FORMAT,
            "task": task.name,
            "split": split,
            "encoder": {**wanted["encoder"], "resolution": int(encoder.resolution),
                        "output_dim": int(encoder.output_dim)},
            "preprocessing": {"resize": "bicubic short side", "crop": "center", "resolution": int(encoder.resolution),
                              "mean": [float(v) for v in MEAN], "std": [float(v) for v in STD]},
            "counts": stats.as_dict(),
            "frames_sha256": wanted["frames_sha256"],
            "rows": n,
            "dim": int(encoder.output_dim),
            "done": 0,
            "complete": False,
        }
        if getattr(encoder, "width", None) is not None:
            manifest["encoder"]["width"] = int(encoder.width)
        features = _create(out, frames, labels, manifest)
    else:
        manifest = existing
        features = np.load(os.path.join(out, FEATURES), mmap_mode="r+")
        if features.shape != (n, manifest["dim"]) or features.dtype != np.float16:
            raise ValueError(f"{out}/{FEATURES} has shape {features.shape} {features.dtype}, expected "
                             f"({n}, {manifest['dim']}) float16; delete the folder {out} and extract again")
        print(f"resuming the feature bank in {out} at row {manifest['done']}/{n}", file=sys.stderr)

    done = int(manifest["done"])
    with Progress(n, f"extract {task.name}/{split}", enabled=progress, start=done) as bar:
        for start in range(done, n, batch_size):
            batch = frames[start:start + batch_size]
            x = torch.stack([load_image(os.path.join(images_dir, f.image), encoder.resolution) for f in batch])
            with torch.inference_mode():
                y = encoder(x.to(device))
            if tuple(y.shape) != (len(batch), manifest["dim"]):
                raise RuntimeError(f"encoder returned shape {tuple(y.shape)}, "
                                   f"expected ({len(batch)}, {manifest['dim']})")
            features[start:start + len(batch)] = y.float().cpu().numpy().astype(np.float16)
            # Resume safety: the rows reach the disk BEFORE the manifest counts them, so "done" never
            # claims a row that an interruption could have lost.
            features.flush()
            manifest["done"] = start + len(batch)
            _write_manifest(out, manifest)
            bar.update(len(batch))
    del features  # close the writable memmap before reopening read-only
    manifest["complete"] = True
    _write_manifest(out, manifest)
    return load_bank(out, task)


def load_bank(path, task: Optional[Task] = None) -> Bank:
    """Open the complete bank in folder ``path`` (features memory-mapped read-only).

    ``task`` (a Task or its name), when given, must be the bank's task. Raises FileNotFoundError for a
    missing folder or manifest and ValueError for an interrupted, empty or inconsistent bank.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"feature bank {path} does not exist or is not a folder")
    if not os.path.isfile(os.path.join(path, MANIFEST)):
        raise FileNotFoundError(
            f"{path} is not a feature bank: no {MANIFEST}; create one with `python -m fastsam.affect extract`"
        )
    manifest = _read_manifest(path)
    rows = manifest.get("rows")
    if not manifest.get("complete"):
        raise ValueError(
            f"feature bank {path}: extraction was interrupted at {manifest.get('done')}/{rows} rows; "
            "rerun the same extract command to resume"
        )
    bank_task = get_task(manifest.get("task"))
    if task is not None:
        wanted = get_task(task) if isinstance(task, str) else task
        if wanted != bank_task:
            raise ValueError(f"bank {path} holds {bank_task.name} features, but --task is {wanted.name}")
    if not rows:
        raise ValueError(f"feature bank {path} is empty (0 rows)")

    features = np.load(os.path.join(path, FEATURES), mmap_mode="r")
    labels = np.load(os.path.join(path, LABELS))
    with open(os.path.join(path, INDEX), "r", encoding="utf-8", newline="") as f:
        table = list(csv.reader(f))
    label_shape = (rows, bank_task.outputs) if bank_task.multilabel else (rows,)
    problems = []
    if features.dtype != np.float16 or features.shape != (rows, manifest.get("dim")):
        problems.append(f"{FEATURES} is {features.dtype} {features.shape}, "
                        f"expected float16 ({rows}, {manifest.get('dim')})")
    if labels.dtype != np.int64 or labels.shape != label_shape:
        problems.append(f"{LABELS} is {labels.dtype} {labels.shape}, expected int64 {label_shape}")
    if not table or table[0] != ["image", "video", "frame"] or len(table) - 1 != rows:
        problems.append(f"{INDEX} has {max(len(table) - 1, 0)} rows under header {table[:1]}, expected "
                        f"{rows} rows under image,video,frame")
    if problems:
        raise ValueError(f"feature bank {path} is inconsistent: " + "; ".join(problems)
                         + f". Delete the folder {path} and extract again")
    body = table[1:]
    return Bank(
        path=path,
        features=features,
        labels=labels,
        images=[r[0] for r in body],
        videos=[r[1] for r in body],
        frames=np.asarray([int(r[2]) for r in body], dtype=np.int64),
        task=bank_task,
        manifest=manifest,
    )
