"""Helpers for SAM training loops."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, List

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
    layers = stop_tracking_bn(model.modules())
    try:
        yield model
    finally:
        for m in layers:
            m.track_running_stats = True


def stop_tracking_bn(modules: Iterable[torch.nn.Module]) -> List[torch.nn.Module]:
    """Sets ``track_running_stats = False`` on the BatchNorm layers among ``modules`` that track their running
    statistics, and returns those layers (to set it back to True)."""
    layers = [m for m in modules if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    return layers
