"""CLIP's image preprocessing: bicubic short-side resize, center crop, RGB, per-channel normalization.

Sizes and crop offsets are computed as torchvision's Resize(int) and CenterCrop do, so features match
those of OpenAI's own preprocessing pipeline without depending on torchvision.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def _check_resolution(resolution) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, int):
        raise TypeError(f"resolution must be an int, got {type(resolution).__name__}")
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")


def preprocess(image: Image.Image, resolution: int) -> torch.Tensor:
    """A PIL image (any mode, any size) -> normalized float32 [3, resolution, resolution].

    The short side is resized to ``resolution`` (bicubic) with the long side int(long * R / short),
    then the centered R x R square is kept, scaled to [0, 1] and normalized with ``MEAN``/``STD``.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    _check_resolution(resolution)
    # Converting first: palette and 1-bit images would otherwise be resized without interpolation.
    image = image.convert("RGB")
    w, h = image.size
    if w <= h:
        size = (resolution, int(h * resolution / w))
    else:
        size = (int(w * resolution / h), resolution)
    image = image.resize(size, Image.BICUBIC)
    left = int(round((size[0] - resolution) / 2.0))
    top = int(round((size[1] - resolution) / 2.0))
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # [R, R, 3]
    x = pixels.permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std


def load_image(path, resolution: int) -> torch.Tensor:
    """The image file at ``path``, preprocessed: normalized float32 [3, resolution, resolution]."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    _check_resolution(resolution)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {os.fspath(path)}")
    try:
        with Image.open(path) as file:
            image = file.convert("RGB")  # decodes the pixels into memory, so the file can close here
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"path {os.fspath(path)!r} is not a readable image: {e}") from None
    return preprocess(image, resolution)
