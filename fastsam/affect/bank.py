"""The feature bank: CLIP image features of one split, extracted once and memory-mapped from disk.

A bank is a folder holding
  features.npy   float16 [N, D], written row batch by row batch through a memmap;
  labels.npy     int64 [N] (EXPR) or [N, 12] (AU);
  index.csv      header ``image,video,frame`` then one row per feature row;
  manifest.json  what was extracted (task, split, encoder checkpoint and its sha256, its dtype,
                 preprocessing, scan counts, a hash of the frame list), how far (``done`` rows, ``complete``)
                 and how fast (``frames_per_second`` of the last run).
An interrupted extraction resumes from ``done``; a complete one with the same checkpoint, dtype and frame
list is reused as is; a bank of anything else is never overwritten.

Images are decoded and preprocessed in DataLoader worker processes (in order), copied to the device from
pinned memory without blocking, and encoded there. The rows written reach the disk before the manifest
counts them, every ``save_every`` seconds and at the end, so ``done`` never claims a row an interruption
could have lost.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

from .data import Frame, ScanStats, labels_array
from .encoder import checkpoint_sha256, load_clip_visual
from .preprocess import MEAN, STD, load_image
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
    if have.get("dtype", "float32") != want["dtype"]:  # banks of earlier versions were float32
        diffs.append(f"encoder dtype {have.get('dtype', 'float32')} instead of {want['dtype']}")
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


def _progress_bar(total: int, done: int, desc: str, enabled: bool):
    """A tqdm bar in frames (with frames/s) from ``done`` to ``total``; a silent one without tqdm (an extra:
    ``pip install "fastsam[affect]"``) or when not ``enabled``."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            print("(no progress bar: tqdm is not installed)", file=sys.stderr)
        else:
            return tqdm(total=total, initial=done, desc=desc, unit="frame", dynamic_ncols=True)
    return contextlib.nullcontext(_NoBar())


class _NoBar:
    def update(self, n: int) -> None:
        pass


# Encoder dtypes of --dtype; fp16 and bf16 halve the encoder's memory traffic on a GPU.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_workers() -> int:
    """The decoding worker processes of ``extract`` by default: one per CPU this process may use (at most 8:
    more rarely pays for their start-up and memory)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus))


class _Images(torch.utils.data.Dataset):
    """The preprocessed image of each frame (float32 ``[3, R, R]``), decoded where the DataLoader runs it."""

    def __init__(self, images_dir: str, frames: Sequence[Frame], resolution: int) -> None:
        self.images_dir, self.frames, self.resolution = images_dir, frames, resolution

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> torch.Tensor:
        return load_image(os.path.join(self.images_dir, self.frames[i].image), self.resolution)


def _check_extract_args(batch_size, workers, dtype, device, save_every) -> torch.dtype:
    """Checks extract_bank's options; returns the encoder dtype."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int >= 0 (0: decode in this process), got {workers!r}")
    if isinstance(save_every, bool) or not isinstance(save_every, (int, float)) or not save_every >= 0:
        raise ValueError(f"save_every must be a number of seconds >= 0, got {save_every!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if dtype == "float16" and torch.device(device).type == "cpu":
        raise ValueError("dtype float16 needs a GPU (--device cuda); on the CPU use float32 or bfloat16")
    return DTYPES[dtype]


def extract_bank(frames: Sequence[Frame], stats: ScanStats, task: Task, split: str, images_dir, checkpoint, out,
                 batch_size: int = 64, device="cpu", progress: bool = True, workers: int = 0,
                 dtype: str = "float32", save_every: float = 30.0) -> Bank:
    """Encode every frame's image with the CLIP image tower in ``checkpoint`` into the bank folder ``out``.

    Rows follow ``frames`` order; each row is the encoder's output for
    ``load_image(images_dir/frame.image, encoder.resolution)`` stored as float16, the encoder run in
    ``dtype`` ("float32", or "float16"/"bfloat16": "float16" on a GPU only). ``workers`` DataLoader processes
    decode the images (0: this process); on CUDA the batches go through pinned memory. The manifest records
    the rows done every ``save_every`` seconds (0: after every batch) and at the end. A complete bank of the
    same checkpoint (by sha256), dtype and frame list in ``out`` is reused without computing anything; an
    interrupted one is resumed; a bank of other inputs raises ValueError. Returns ``load_bank(out)``.
    """
    if not isinstance(task, Task):
        raise TypeError(f"task must be a fastsam.affect.tasks.Task (EXPR or AU), got {type(task).__name__}")
    encoder_dtype = _check_extract_args(batch_size, workers, dtype, device, save_every)
    if len(frames) == 0:
        raise ValueError(
            f"no frames to extract for task {task.name}, split {split!r}: "
            "check --images/--annotations/--split (every frame was invalid, missing or unlisted)"
        )
    out, images_dir, checkpoint = os.fspath(out), os.fspath(images_dir), os.path.abspath(os.fspath(checkpoint))
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out {out} exists and is not a folder; choose another --out")
    labels = labels_array(frames, task)
    wanted = {"encoder": {"checkpoint": checkpoint, "sha256": checkpoint_sha256(checkpoint), "dtype": dtype},
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

    device = torch.device(device)
    encoder = load_clip_visual(checkpoint, device=device).to(encoder_dtype).eval()
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
    _encode_rows(encoder, _Images(images_dir, frames[done:], encoder.resolution), features, done, manifest, out,
                 batch_size=batch_size, device=device, dtype=encoder_dtype, workers=workers, save_every=save_every,
                 desc=f"extract {task.name}/{split}", progress=progress)
    del features  # close the writable memmap before reopening read-only
    manifest["complete"] = True
    _write_manifest(out, manifest)
    return load_bank(out, task)


def _encode_rows(encoder, images: _Images, features: np.memmap, done: int, manifest: dict, out: str, *,
                 batch_size: int, device: torch.device, dtype: torch.dtype, workers: int, save_every: float,
                 desc: str, progress: bool) -> None:
    """Encodes ``images`` into ``features[done:]`` batch by batch; the manifest's ``done`` follows every
    ``save_every`` seconds and at the end, after the rows are flushed to disk."""
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    n, dim = features.shape
    start_time = last_save = time.perf_counter()
    row = done

    def save() -> None:
        # Resume safety: the rows reach the disk BEFORE the manifest counts them.
        features.flush()
        manifest["done"] = row
        elapsed = time.perf_counter() - start_time
        manifest["frames_per_second"] = round((row - done) / elapsed, 2) if elapsed > 0 else None
        _write_manifest(out, manifest)

    with _progress_bar(n, done, desc, progress) as bar:
        for x in loader:
            with torch.inference_mode():
                y = encoder(x.to(device, dtype, non_blocking=True))
            if tuple(y.shape) != (len(x), dim):
                raise RuntimeError(f"encoder returned shape {tuple(y.shape)}, expected ({len(x)}, {dim})")
            features[row:row + len(x)] = y.float().cpu().numpy().astype(np.float16)
            row += len(x)
            bar.update(len(x))
            if time.perf_counter() - last_save >= save_every:
                save()
                last_save = time.perf_counter()
    save()


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
