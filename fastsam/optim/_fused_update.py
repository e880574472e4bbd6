"""The second SAM pass fused into one kernel: restore w from the backup, then the base optimizer's
step, for torch.optim.SGD, Adam and AdamW. The base optimizer's state (momentum buffers, Adam moments
and step counts) is read and written in torch's own layout, so ``base_optimizer.state_dict()`` and a
later unfused step see exactly what torch's step would have left.

Adam's step counts: a plain step keeps torch's layout (one CPU tensor per parameter, read by no
kernel: the kernel gets the count as a float, cached per bucket). A capturable group, and a gated step
(GradScaler or the nonfinite policy, whose skip is decided on the device), keep the counts on the
parameters' device instead (torch's capturable layout); the kernel reads each one there, and a skipped
step takes its increment back on the device.

The state is keyed by the parameters themselves and laid out like them (a DTensor parameter's buffers are
DTensors); the kernels see the same views of it as of the parameters (``kernel_view``: the local shard).

Anything else (another optimizer, amsgrad, fused/differentiable flags, tensor lr, and Adam inside
torch.compile) takes the generic path: restore, then ``base_optimizer.step()``.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

import fastsam.ops as ops
from fastsam.optim._buckets import kernel_view, take


def fused_kind(base: torch.optim.Optimizer) -> str | None:
    """"sgd" or "adam" when the base optimizer's exact type has a fused restore+update."""
    if type(base) is torch.optim.SGD:
        return "sgd"
    if type(base) in (torch.optim.Adam, torch.optim.AdamW):
        return "adam"
    return None


def group_supported(kind: str, group: dict) -> bool:
    """Whether a param group's options are all covered by the fused kernel."""
    if group.get("differentiable") or group.get("fused") or not isinstance(group["lr"], (float, int)):
        return False
    if kind == "adam":
        # Under torch.compile torch shows every group as capturable, and the counter increments of the
        # fused call would be traced apart from torch's compile-aware step: a compiled step restores with
        # the fused op and lets torch's Adam update. A CUDA graph replays what it captured: a group that
        # is not capturable keeps its count on the host, which torch's step then refuses as well.
        return (not torch.compiler.is_compiling() and (group.get("capturable") or not _capturing())
                and not group.get("amsgrad") and all(isinstance(b, (float, int)) for b in group["betas"]))
    # SGD has no capturable option; torch.compile shows every group of a traced optimizer as capturable.
    return True


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _taken(grad: Optional[ops.GradArgs], idx: Optional[List[int]]) -> Optional[ops.GradArgs]:
    """``grad`` with its kept grads restricted to the tensors ``idx`` (all for None)."""
    return None if grad is None else grad._replace(grads_b=take(grad.grads_b, idx), grads_c=take(grad.grads_c, idx))


def _sgd(base, bucket, grads, backups, grad: Optional[ops.GradArgs], amp: Optional[ops.AmpArgs]) -> None:
    group, params, impl = bucket.group, bucket.params, bucket.impl
    momentum = group["momentum"]
    hyper = dict(lr=group["lr"], weight_decay=group["weight_decay"], momentum=momentum,
                 dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"])
    if momentum == 0:
        ops.restore_sgd_(params=params, grads=grads, backups=backups, momentum_buffers=[], init_momentum=False,
                         **hyper, grad=grad, amp=amp, impl=impl)
        return
    keys = bucket.keys()
    states = [base.state[p] for p in keys]
    new = [i for i, s in enumerate(states) if s.get("momentum_buffer") is None]
    for i in new:
        # A gated first step may be skipped on the device, leaving the buffer unwritten, and the next one
        # takes it as initialized: zeros make that step torch's first step exactly when dampening is 0.
        make = torch.zeros_like if amp is not None else torch.empty_like
        states[i]["momentum_buffer"] = make(keys[i], memory_format=torch.preserve_format)
    bufs = [kernel_view(s["momentum_buffer"]) for s in states]
    # First step of some parameters: torch sets their buffer to d_p; the kernel does that in place.
    calls = [(None, False)] if not new else [(sorted(set(range(len(params))) - set(new)), False), (new, True)]
    for idx, init in calls:
        if idx == []:
            continue
        ops.restore_sgd_(params=take(params, idx), grads=take(grads, idx), backups=take(backups, idx),
                         momentum_buffers=take(bufs, idx), init_momentum=init, **hyper, grad=_taken(grad, idx),
                         amp=amp, impl=impl)


def _adam(base, bucket, grads, backups, grad: Optional[ops.GradArgs], amp: Optional[ops.AmpArgs]) -> None:
    group, params, impl = bucket.group, bucket.params, bucket.impl
    keys = bucket.keys()
    states = [base.state[p] for p in keys]
    on_device = amp is not None or bool(group.get("capturable"))
    for p, s in zip(keys, states):
        if len(s) == 0:  # torch's lazy init, in torch's layout (step on the CPU: no device sync to read it)
            s["step"] = torch.tensor(0.0, dtype=torch.float32)
            s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if on_device and s["step"].device != p.device:
            s["step"] = s["step"].to(p.device)
    steps = [s["step"] for s in states]
    beta1, beta2 = group["betas"]
    decoupled = bool(group.get("decoupled_weight_decay", False)) or type(base) is torch.optim.AdamW
    tensors = dict(params=params, grads=grads, backups=backups, exp_avgs=[kernel_view(s["exp_avg"]) for s in states],
                   exp_avg_sqs=[kernel_view(s["exp_avg_sq"]) for s in states])
    hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                 decoupled=decoupled, maximize=group["maximize"])
    if on_device:
        bucket.adam_steps = None  # the counts are not known on the host any more
        torch._foreach_add_(steps, 1)
        ops.restore_adam_(**tensors, **hyper, step=0.0, steps=steps, grad=grad, amp=amp, impl=impl)
        if amp is not None and amp.found_inf is not None:  # a skipped step does not count
            torch._foreach_add_(steps, amp.found_inf.reshape(()), alpha=-1)
        return
    # Parameters that joined later have fewer steps: one call per distinct count (usually one). The
    # grouping is cached; one counter read checks that nothing else stepped these parameters.
    cached = bucket.adam_steps
    if cached is None or float(steps[cached[0][1][0]]) != cached[0][0]:
        by_step: Dict[float, List[int]] = {}
        for i, t in enumerate(steps):
            by_step.setdefault(float(t), []).append(i)
        cached = list(by_step.items())
    torch._foreach_add_(steps, 1)
    bucket.adam_steps = cached = [(step + 1, idx) for step, idx in cached]
    for step, idx in cached:
        idx = idx if len(cached) > 1 else None
        ops.restore_adam_(**{k: take(ts, idx) for k, ts in tensors.items()}, **hyper, step=step,
                          grad=_taken(grad, idx), impl=impl)


def restore_and_update(kind: str, base, bucket, grads: List[Tensor], *, grad: Optional[ops.GradArgs] = None,
                       amp: Optional[ops.AmpArgs] = None, restore: bool = True) -> None:
    """w <- backup (when the bucket was perturbed and ``restore``), then the base optimizer's step for the
    parameters of ``bucket`` (one device and dtype) with the grad ``g``, or ``grad``'s combination
    ``coef[0] g + coef[1] g_b + coef[2] g_c``. ``amp``: the gated step's loss-scale arguments on the bucket's
    device: ``g`` is unscaled in the kernel, and a set found flag leaves only the restore."""
    backups = bucket.backups if restore else []
    (_sgd if kind == "sgd" else _adam)(base, bucket, grads, backups, grad, amp)
