"""Helpers for SAM training loops."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def frozen_bn_stats(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Keeps the running statistics of every BatchNorm layer of ``model`` unchanged inside the block.

    Use it around SAM's second forward pass (at w + e): the layers still normalize with the batch's
    own statistics, as in training, but ``running_mean``, ``running_var`` and ``num_batches_tracked``
    are neither read nor updated. Nothing is copied: the layers stop tracking for the block's duration.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules()
              if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield model
    finally:
        for m in layers:
            m.track_running_stats = True
