"""The second SAM pass fused into one kernel: restore w from the backup, then the base optimizer's
step, for torch.optim.SGD, Adam and AdamW. The base optimizer's state (momentum buffers, Adam moments
and step counts) is read and written in torch's own layout, so ``base_optimizer.state_dict()`` and a
later unfused step see exactly what torch's step would have left.

Anything else (another optimizer, amsgrad, capturable/fused/differentiable flags, tensor lr, and Adam
inside torch.compile) takes the generic path: restore, then ``base_optimizer.step()``. The kernels take
lr and the Adam step count as floats, so a capturable group (step and lr on the device, read by no
host) can only be served by torch's own capturable step; fusing it needs ``Tensor`` step/lr arguments.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

import fastsam.ops as ops
from fastsam.optim._buckets import take


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
        # The kernel takes the step count as a float, so it cannot serve a capturable group (counter on
        # the device). Under torch.compile each new count would be a new constant, a recompile per step
        # (a SymFloat read from the counter does not fit the schema): a compiled step restores with the
        # fused op and lets torch's compile-aware Adam update. A CUDA graph would replay the count it
        # captured: torch's step then refuses a group that is not capturable.
        return (not torch.compiler.is_compiling() and not _capturing() and not group.get("capturable")
                and not group.get("amsgrad") and all(isinstance(b, (float, int)) for b in group["betas"]))
    # SGD has no capturable option; torch.compile shows every group of a traced optimizer as capturable.
    return True


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _sgd(base, bucket, lists) -> None:
    group, params, impl = bucket.group, bucket.params, bucket.impl
    grads, backups, grads_b, grads_c, coef = lists
    momentum = group["momentum"]
    args = (group["lr"], group["weight_decay"], momentum, group["dampening"], group["nesterov"], group["maximize"])
    if momentum == 0:
        ops.restore_sgd_(params, grads, backups, [], *args, False, grads_b, grads_c, coef, impl=impl)
        return
    states = [base.state[p] for p in params]
    new = [i for i, s in enumerate(states) if s.get("momentum_buffer") is None]
    for i in new:
        states[i]["momentum_buffer"] = torch.empty_like(params[i], memory_format=torch.preserve_format)
    bufs = [s["momentum_buffer"] for s in states]
    # First step of some parameters: torch sets their buffer to d_p; the kernel does that in place.
    calls = [(None, False)] if not new else [(sorted(set(range(len(params))) - set(new)), False), (new, True)]
    for idx, init in calls:
        if idx == []:
            continue
        ops.restore_sgd_(take(params, idx), take(grads, idx), take(backups, idx), take(bufs, idx), *args, init,
                         take(grads_b, idx), take(grads_c, idx), coef, impl=impl)


def _adam(base, bucket, lists) -> None:
    group, params, impl = bucket.group, bucket.params, bucket.impl
    grads, backups, grads_b, grads_c, coef = lists
    states = [base.state[p] for p in params]
    for p, s in zip(params, states):
        if len(s) == 0:  # torch's lazy init, in torch's layout (step on the CPU: no device sync to read it)
            s["step"] = torch.tensor(0.0, dtype=torch.float32)
            s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    steps = [s["step"] for s in states]
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
    beta1, beta2 = group["betas"]
    decoupled = bool(group.get("decoupled_weight_decay", False)) or type(base) is torch.optim.AdamW
    tensors = (params, grads, backups, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states])
    for step, idx in cached:
        idx = idx if len(cached) > 1 else None
        ops.restore_adam_(*(take(ts, idx) for ts in tensors), group["lr"], beta1, beta2, group["weight_decay"],
                          group["eps"], decoupled, group["maximize"], step, take(grads_b, idx), take(grads_c, idx),
                          coef, impl=impl)


def restore_and_update(kind: str, base, bucket, grads: List[Tensor], grads_b: List[Tensor], grads_c: List[Tensor],
                       coef: Optional[Tensor]) -> None:
    """w <- backup (when the bucket was perturbed), then the base optimizer's step for the parameters of
    ``bucket`` (one device and dtype) with the grad ``coef[0] g + coef[1] g_b + coef[2] g_c``
    (``g`` when ``coef`` is None)."""
    (_sgd if kind == "sgd" else _adam)(base, bucket, (grads, bucket.backups, grads_b, grads_c, coef))
