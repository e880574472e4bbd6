"""Skipping a SAM step on non-finite grads, with or without torch.amp.GradScaler, without a host sync.

A step is gated when a GradScaler scales its losses or the optimizer's ``nonfinite`` policy is set. Then
every device holds an fp32 ``[1]`` flag, ``found``, nonzero when some grad of the step was inf or NaN:
the pass at w sets it from its norm reduction (a non-finite grad makes the sum non-finite), later passes
add theirs (the scaler's found_inf, or a check of the grads), and the fused kernels read it on the
device: a flagged step perturbs nothing and updates nothing, and the parameters end where they began.

GradScaler contract (torch >= 2.3, ``_step_supports_amp_scaling``): ``scaler.step(opt)`` checks the grads
of the last pass, sets ``opt.grad_scale`` / ``opt.found_inf`` and calls ``opt.step()``, which finishes
the SAM step. The pass at w happens before that, in ``first_step(grad_scaler=scaler)``: its found flag is
added to the scaler's per-device flags, so that ``scaler.update()`` backs off for it too. Those flags and
the scale tensor are private attributes of GradScaler (``_per_optimizer_states``, ``_get_scale_async``);
tests/test_amp.py pins the behaviour on the installed torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor

from fastsam.ops.groups import AmpArgs

NONFINITE_POLICIES = (None, "skip", "raise")


def check_nonfinite(policy) -> Optional[str]:
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be None, 'skip' or 'raise', got {policy!r}")
    return policy


@dataclass
class Gate:
    """The found flags of a step under way, by device, and the inverse loss scale of its grads (None
    when they are not scaled). ``scaler``: the GradScaler of the pass at w, if any."""
    found: Dict[torch.device, Tensor]
    inv: Optional[Dict[torch.device, Tensor]] = None
    scaler: Optional[object] = None

    def on(self, device: torch.device) -> AmpArgs:
        """The loss-scale arguments of the ops on ``device``."""
        return AmpArgs(inv_scale=None if self.inv is None else self.inv[device], found_inf=self.found[device])


def active_scaler(grad_scaler):
    """The scaler when it scales; None for None or a disabled one (whose scale is 1 and which checks nothing)."""
    if grad_scaler is None:
        return None
    if not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
    return grad_scaler if grad_scaler.is_enabled() else None


def inverse_scales(scale: Tensor, devices) -> Dict[torch.device, Tensor]:
    """``1 / scale`` as an fp32 0-dim tensor on every device, rounded as GradScaler.unscale_ does (the
    reciprocal in fp64), without reading it on the host."""
    inv = scale.double().reciprocal().float().reshape(())
    return {d: inv.to(d, non_blocking=True) for d in devices}


def scaler_inverse_scales(scaler, devices) -> Dict[torch.device, Tensor]:
    scale = scaler._get_scale_async()  # the device tensor: get_scale() would read it on the host
    if scale is None:
        raise RuntimeError("grad_scaler has no scale yet: call scaler.scale(loss).backward() before first_step()")
    return inverse_scales(scale, devices)


def flag_nonfinite_(total: Tensor) -> Tensor:
    """In place: ``total`` (a sum over grads) becomes 1.0 where it is inf or NaN, else 0.0."""
    torch.sub(total, total, out=total)  # 0 for a finite sum, NaN otherwise
    return total.nan_to_num_(nan=1.0)


def report_to_scaler(scaler, optimizer, found: Dict[torch.device, Tensor]) -> None:
    """Adds the found flag of earlier passes (every device holds the same total) to the scaler's, so that
    ``scaler.update()`` backs off."""
    flag = next(iter(found.values()))
    per_device = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
    if not per_device:
        per_device[flag.device] = torch.zeros((), dtype=torch.float32, device=flag.device)
    for theirs in per_device.values():
        theirs.add_(flag.to(theirs.device, non_blocking=True).reshape(theirs.shape))
