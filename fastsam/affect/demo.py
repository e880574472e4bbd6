"""A small synthetic Aff-Wild2-style dataset and a tiny random encoder, so the pipeline runs with no download.

The images carry their labels in a way a random image tower still separates: for EXPR the class picks the
background colour (a frequent "Neutral" makes the classes imbalanced, as in Aff-Wild2); for AU each of the
12 units lights one cell of a 3 x 4 grid. Pixel noise and JPEG keep the task from being trivial. Every
video also has invalid (-1) frames, and one training video lacks an image, so the readers' skipping
paths run too.
"""
from __future__ import annotations

import os
from typing import Dict

import numpy as np
import torch

from .data import INVALID, SPLITS
from .encoder import random_clip_state_dict
from .tasks import Task, get_task

IMAGE_SIZE = (48, 40)  # width, height: not square, so the short-side resize and the center crop both act
ENCODER_FILE = "encoder.pt"
# EXPR class frequencies of the demo (Neutral first), roughly Aff-Wild2's imbalance.
_EXPR_WEIGHTS = np.array([0.36, 0.06, 0.05, 0.04, 0.16, 0.1, 0.08, 0.15])
_EXPR_COLOURS = np.array([[128, 128, 128], [200, 30, 30], [40, 150, 40], [90, 40, 160],
                          [240, 200, 40], [40, 60, 200], [240, 120, 200], [30, 200, 200]], dtype=np.float64)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _labels(task: Task, frames: int, rng: np.random.Generator) -> np.ndarray:
    """[frames] classes or [frames, 12] AUs, with every 7th frame invalid (-1)."""
    if task.multilabel:
        labels = (rng.random((frames, task.outputs)) < 0.3).astype(np.int64)
    else:
        labels = rng.choice(task.outputs, size=frames, p=_EXPR_WEIGHTS)
    labels[6::7] = INVALID
    return labels


def _image(task: Task, label, rng: np.random.Generator) -> np.ndarray:
    """One uint8 RGB image [H, W, 3] showing ``label`` (an invalid label draws a random one)."""
    w, h = IMAGE_SIZE
    if task.multilabel:
        img = np.full((h, w, 3), 60.0)
        units = np.asarray(label) if np.all(np.asarray(label) >= 0) else rng.integers(0, 2, task.outputs)
        for k in np.flatnonzero(units):  # unit k lights cell (k // 4, k % 4) of a 3 x 4 grid
            r, c = divmod(int(k), 4)
            img[r * h // 3:(r + 1) * h // 3, c * w // 4:(c + 1) * w // 4] = 230.0
    else:
        cls = int(label) if label >= 0 else int(rng.integers(task.outputs))
        img = np.broadcast_to(_EXPR_COLOURS[cls], (h, w, 3)).copy()
    img += rng.normal(0.0, 12.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_video(task: Task, images_dir: str, ann_dir: str, video: str, frames: int, rng: np.random.Generator,
                 drop_one: bool) -> None:
    from PIL import Image  # Pillow: only needed to write the demo's JPEGs

    labels = _labels(task, frames, rng)
    folder = os.path.join(images_dir, video)
    os.makedirs(folder, exist_ok=True)
    for i, label in enumerate(labels, start=1):
        if drop_one and i == 2:  # a frame with a label but no image: the reader counts it as missing
            continue
        Image.fromarray(_image(task, label, rng)).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
    rows = [",".join(str(int(v)) for v in np.atleast_1d(label)) for label in labels]
    with open(os.path.join(ann_dir, f"{video}.txt"), "w") as f:
        f.write(",".join(task.names) + "\n" + "\n".join(rows) + "\n")


def make_demo(out, task, videos: int = 4, frames: int = 24, seed: int = 0) -> Dict[str, str]:
    """Write a synthetic dataset in the official layout and a tiny encoder checkpoint under ``out``.

    Layout: ``out/cropped_aligned/<video>/00001.jpg ...``, ``out/annotations/{Train_Set,Validation_Set}/
    <video>.txt`` (``videos`` videos per split, ``frames`` annotation lines each; the last training
    video is a ``_left``/``_right`` pair) and ``out/encoder.pt``: a random CLIP image tower with OpenAI's
    ``visual.*`` keys (width 64, 2 layers, patch 8, resolution 32, 768-d output). Deterministic in
    ``seed``. Returns the paths of the images root, annotations root and checkpoint.
    """
    task = task if isinstance(task, Task) else get_task(task)
    videos, frames = _positive_int("videos", videos), _positive_int("frames", frames)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    out = os.fspath(out)
    images_dir = os.path.join(out, "cropped_aligned")
    ann_root = os.path.join(out, "annotations")
    if os.path.exists(ann_root) or os.path.exists(images_dir):
        raise ValueError(f"{out} already holds a dataset (annotations/ or cropped_aligned/): choose another OUT")
    rng = np.random.default_rng(seed)
    for split, folder in SPLITS.items():
        ann_dir = os.path.join(ann_root, folder)
        os.makedirs(ann_dir)
        names = [f"{split}_{v:03d}" for v in range(videos)]
        if split == "train" and videos >= 2:
            names[-2:] = [f"{split}_pair_left", f"{split}_pair_right"]
        for v, name in enumerate(names):
            _write_video(task, images_dir, ann_dir, name, frames, rng, drop_one=split == "train" and v == 0)
    checkpoint = os.path.join(out, ENCODER_FILE)
    torch.save(random_clip_state_dict(seed=seed), checkpoint)
    return {"images": images_dir, "annotations": ann_root, "checkpoint": checkpoint}
