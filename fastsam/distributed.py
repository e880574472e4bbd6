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

When the base update itself uses the grad at w (CR-SAM's combined grad, GSAM's decomposition, WSAM's mix,
LookSAM's kept g_v, LastSAM's orthogonal projection, and every one-pass step: LastSAM before its switch, the
steps between two under ``interval``), that pass is always synced: a local grad there would make the ranks'
parameters drift apart. For the same reason, CR-SAM's paper mode, whose coefficients come from the losses
of the three passes, gets from the closure the loss averaged over the ranks (one all-reduce of a scalar per
pass): each rank's own loss would give each its own update.
FriendlySAM's EMA of the grad at w only shapes the
perturbation, so under ``no_sync`` each rank keeps the EMA of its own grads (a checkpoint saved on one rank
holds that rank's EMA).

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) the choice is the same, at other costs:

- ``True`` (the default under FSDP2): each rank perturbs its shard of w with its shard of the global grad,
  which the backward pass reduce-scatters to it: one reduce-scatter per pass, as in any FSDP2 step, and one
  small all-reduce per global norm or dot product. Memory stays sharded.
- ``False`` (m-sharpness; SAM, ASAM, FriendlySAM and LastSAM): each rank perturbs its own full copy of w
  with its own batch's grad, inside the forward pass (``fastsam._fsdp_m_sharpness``): the pass at w is not
  reduce-scattered (one reduce-scatter and the norm's all-reduce less per step), but within the step each
  rank holds full-size tensors (up to three per parameter while it makes w + e, then w + e through the
  later pass): the memory of an unsharded model. FriendlySAM keeps each rank's EMA of its own grads, as
  under DDP: a full-size state per rank for good, which the optimizer must be built for
  (``FriendlySAM(..., per_rank_ema=True)``, so that a checkpoint template has its layout); without it,
  ``False`` raises ValueError. CRSAM, GSAM, WSAM, LookSAM and orthogonal LastSAM (and every one-pass step)
  sync the pass at w in both modes (their update uses it, as under DDP).

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
from fastsam._fsdp_m_sharpness import LocalPerturbation
from fastsam.optim import ASAM, CRSAM, SAM, FriendlySAM, LastSAM
from fastsam.optim._sharding import mean_over_ranks
from fastsam.utils import frozen_bn_stats


def sam_closure(optimizer: SAM, model: torch.nn.Module, compute_loss: Callable[[], Tensor],
                sync_first_pass: Optional[bool] = None, freeze_bn: bool = True) -> Callable[[], Tensor]:
    """A closure for ``optimizer.step(closure)``: each call runs ``compute_loss()`` and its backward pass.

    The pass at w (as ``optimizer.next_pass_at_w`` says when the closure is called) runs under
    ``model.no_sync()`` when ``model`` is a ``DistributedDataParallel``, ``sync_first_pass`` is False and
    the optimizer's update does not use that pass's grad (see the module docstring). Every other pass
    runs synced, and inside :func:`fastsam.utils.frozen_bn_stats` when ``freeze_bn``, so that BatchNorm
    running stats update once per step, at w. Under FSDP2 (``model`` made by ``fully_shard``), every pass
    is synced, or with ``sync_first_pass=False`` each rank perturbs its own full copy of w (see the module
    docstring). Without DDP or FSDP2 the closure is the plain SAM closure.

    Args:
        optimizer: the fastsam optimizer (SAM, ASAM, FriendlySAM, CRSAM, LastSAM, GSAM, WSAM, LookSAM) whose step
            calls it.
        model: the trained module, usually the ``DistributedDataParallel`` wrapper.
        compute_loss: runs the forward pass on this rank's batch and returns the loss, a scalar tensor.
        sync_first_pass: all-reduce the grad of the pass at w too (the full-batch perturbation). None (the
            default): False under DDP, True under FSDP2 (where False costs the memory of an unsharded model).
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
    per_rank_ema = isinstance(optimizer, FriendlySAM) and optimizer.per_rank_ema
    if per_rank_ema and not (is_fsdp and not sync_first_pass):
        raise ValueError("FriendlySAM(per_rank_ema=True) is for m-sharpness under FSDP2: sam_closure(opt, model, ..., "
                         "sync_first_pass=False) with the fully_shard-ed model")
    local = None  # each rank's own perturbation under FSDP2
    if is_fsdp and not sync_first_pass:
        always_synced = optimizer._update_uses_g0  # every step's update uses the pass at w: it stays synced
        if (type(optimizer) in (SAM, ASAM, LastSAM) and not always_synced) or per_rank_ema:
            local = LocalPerturbation(optimizer, model, FSDPModule)
        elif isinstance(optimizer, FriendlySAM):
            raise ValueError("sync_first_pass=False (m-sharpness) with FriendlySAM under FSDP2 keeps an EMA of each "
                             "rank's own grads, a full-size state per rank: build the optimizer with "
                             "FriendlySAM(..., per_rank_ema=True), so that it is saved (and a checkpoint template "
                             "made) in that layout, or use sync_first_pass=True (the default under FSDP2)")
        elif not always_synced:
            raise ValueError(f"sync_first_pass=False (m-sharpness: each rank perturbs with its own batch's grad) "
                             f"under FSDP2 supports SAM, ASAM, FriendlySAM and LastSAM, not "
                             f"{type(optimizer).__name__}; use sync_first_pass=True (the default under FSDP2)")
    _check_bool("freeze_bn", freeze_bn)
    if not freeze_bn and optimizer.freeze_bn:
        raise ValueError("freeze_bn=False, but the optimizer's step(closure) freezes BatchNorm statistics in the "
                         "passes away from w: set optimizer.freeze_bn = False as well")
    is_ddp = isinstance(model, DistributedDataParallel)
    # Under FSDP2 the optimizer averages the losses itself (it knows the parameters' mesh); under DDP it sees
    # plain tensors.
    mean_loss = is_ddp and isinstance(optimizer, CRSAM) and optimizer.mode == "paper"

    def checked_loss() -> Tensor:
        loss = compute_loss()
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError("compute_loss must return a scalar loss tensor, got "
                            f"{type(loss).__name__ if not isinstance(loss, Tensor) else tuple(loss.shape)}")
        return loss

    def closure() -> Tensor:
        at_w = optimizer.next_pass_at_w
        # (LastSAM's answer changes at its switch, never within a step)
        per_rank = local is not None and not optimizer.update_uses_grad_at_w
        if per_rank and at_w:
            loss = local.pass_at_w(checked_loss)
            optimizer._perturbation_made_elsewhere()
            return loss
        unsynced = is_ddp and at_w and not sync_first_pass and not optimizer.update_uses_grad_at_w
        with contextlib.ExitStack() as passes:
            if unsynced:
                passes.enter_context(model.no_sync())
            if freeze_bn and not at_w:
                passes.enter_context(frozen_bn_stats(model))
            if per_rank:
                loss, release = local.later_pass(checked_loss)
                passes.callback(release)
            else:
                loss = checked_loss()
            loss.backward()
        if per_rank:
            local.check_unseen()
        if mean_loss:
            loss = mean_over_ranks(loss.detach().clone(), [model.process_group])
        return loss

    return closure
