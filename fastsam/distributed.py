r"""SAM under DistributedDataParallel and FSDP2: a closure for ``opt.step(closure)`` that decides which passes sync.

A SAM step takes two forward/backward passes (CR-SAM three). Under DDP each backward pass normally
all-reduces the grads. :func:`sam_closure` builds a closure for ``step`` of every fastsam optimizer that
runs each pass the right way:

- the pass at w, whose grad only sets the perturbation, runs under ``model.no_sync()`` by default: every
  rank perturbs with the grad of its own batch;
- every later pass of the step runs synced (and with BatchNorm running stats frozen), so the base update
  uses the same averaged grad on every rank and the ranks' parameters stay identical.

The trade-off (``sync_first_pass``):

- ``False`` (default): one all-reduce per step, as for a plain optimizer, and no rank waits for the
  others before it perturbs. Each rank's perturbation comes from its local batch of size m: this is the
  SAM paper's m-sharpness (Foret et al., 2021, sec. 4.1), where smaller m was found to generalize better
  than the full-batch perturbation.
- ``True``: two all-reduces per step; the perturbation comes from the grad of the whole global batch,
  i.e. the result of single-process SAM on the concatenated batches (up to BatchNorm, whose batch
  statistics stay per rank under DDP).

When the base update itself uses the grad at w (CR-SAM's combined grad, LastSAM's orthogonal
projection, and LastSAM's single pass before its switch), that pass is always synced: a local grad
there would make the ranks' parameters drift apart. For the same reason, CR-SAM's paper mode, whose
coefficients come from the losses of the three passes, gets from the closure the loss averaged over the
ranks (one all-reduce of a scalar per pass): each rank's own loss would give each its own update.
FriendlySAM's EMA of the grad at w only shapes the
perturbation, so under ``no_sync`` each rank keeps the EMA of its own grads (a checkpoint saved on one rank
holds that rank's EMA).

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every pass is synced, ``sync_first_pass=True``: each
rank holds and perturbs a shard of w, so it needs the shard of the global grad that the backward pass
reduce-scatters to it (one reduce-scatter per pass, as in any FSDP2 step; the optimizer adds one small
all-reduce per global norm or dot product). The m-sharpness mode, where each rank perturbs with the grad
of its own batch, would need each rank to hold its own full copy of w + e: under FSDP2 that defeats
sharding, and ``sync_first_pass=False`` raises ValueError.

DDP example (one process per rank, after ``torch.distributed.init_process_group``)::

    from fastsam.distributed import sam_closure

    model = DistributedDataParallel(net)
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for x, y in loader:                      # each rank its own shard (DistributedSampler)
        closure = sam_closure(opt, model, lambda: loss_fn(model(x), y))
        loss = opt.step(closure)             # pass 1 local (no_sync), pass 2 all-reduced
        opt.zero_grad()
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # a torch build without torch.distributed
    FSDPModule = None

from fastsam._checks import _check_bool
from fastsam.optim import CRSAM, SAM
from fastsam.optim._sharding import mean_over_ranks
from fastsam.utils import frozen_bn_stats


def sam_closure(optimizer: SAM, model: torch.nn.Module, compute_loss: Callable[[], Tensor],
                sync_first_pass: Optional[bool] = None, freeze_bn: bool = True) -> Callable[[], Tensor]:
    """A closure for ``optimizer.step(closure)``: each call runs ``compute_loss()`` and its backward pass.

    The pass at w (as ``optimizer.next_pass_at_w`` says when the closure is called) runs under
    ``model.no_sync()`` when ``model`` is a ``DistributedDataParallel``, ``sync_first_pass`` is False and
    the optimizer's update does not use that pass's grad (see the module docstring). Every other pass
    runs synced, and inside :func:`fastsam.utils.frozen_bn_stats` when ``freeze_bn``, so that BatchNorm
    running stats update once per step, at w. Under FSDP2 (``model`` made by ``fully_shard``) and without
    DDP the closure is the plain SAM closure, every pass synced.

    Args:
        optimizer: the fastsam optimizer (SAM, ASAM, FriendlySAM, CRSAM, LastSAM) whose step calls it.
        model: the trained module, usually the ``DistributedDataParallel`` wrapper.
        compute_loss: runs the forward pass on this rank's batch and returns the loss, a scalar tensor.
        sync_first_pass: all-reduce the grad of the pass at w too (the full-batch perturbation). None (the
            default): False under DDP, True under FSDP2, which supports only True.
        freeze_bn: keep BatchNorm running statistics unchanged in the passes away from w. ``step(closure)``
            already does that unless ``optimizer.freeze_bn`` is False; ``freeze_bn=False`` needs that too.

    Returns:
        A closure returning the loss (a scalar tensor, as ``compute_loss`` returned it) after backward;
        under DDP with CR-SAM's paper mode, its mean over the ranks (detached).
    """
    if not isinstance(optimizer, SAM):
        raise TypeError(f"optimizer must be a fastsam optimizer (SAM or a subclass), got {type(optimizer).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(compute_loss):
        raise TypeError(f"compute_loss must be callable, got {type(compute_loss).__name__}")
    is_fsdp = FSDPModule is not None and isinstance(model, FSDPModule)
    if sync_first_pass is None:
        sync_first_pass = is_fsdp
    _check_bool("sync_first_pass", sync_first_pass)
    if is_fsdp and not sync_first_pass:
        raise ValueError("sync_first_pass=False (m-sharpness: each rank perturbs with its own batch's grad) is not "
                         "supported under FSDP2: every rank all-gathers the same sharded w, so a perturbation of its "
                         "own would need a full copy of w + e per rank. Use sync_first_pass=True (the default under "
                         "FSDP2), or DDP for m-sharpness")
    _check_bool("freeze_bn", freeze_bn)
    if not freeze_bn and optimizer.freeze_bn:
        raise ValueError("freeze_bn=False, but the optimizer's step(closure) freezes BatchNorm statistics in the "
                         "passes away from w: set optimizer.freeze_bn = False as well")
    is_ddp = isinstance(model, DistributedDataParallel)
    # Under FSDP2 the optimizer averages the losses itself (it knows the parameters' mesh); under DDP it sees
    # plain tensors.
    mean_loss = is_ddp and isinstance(optimizer, CRSAM) and optimizer.mode == "paper"

    def closure() -> Tensor:
        at_w = optimizer.next_pass_at_w
        local = is_ddp and at_w and not sync_first_pass and not optimizer.update_uses_grad_at_w
        with contextlib.ExitStack() as passes:
            if local:
                passes.enter_context(model.no_sync())
            if freeze_bn and not at_w:
                passes.enter_context(frozen_bn_stats(model))
            loss = compute_loss()
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise TypeError("compute_loss must return a scalar loss tensor, got "
                                f"{type(loss).__name__ if not isinstance(loss, Tensor) else tuple(loss.shape)}")
            loss.backward()
        if mean_loss:
            loss = mean_over_ranks(loss.detach().clone(), [model.process_group])
        return loss

    return closure
