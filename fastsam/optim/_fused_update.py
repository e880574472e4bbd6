"""The second SAM pass fused into one kernel: restore w from the backup, then the base optimizer's
step, for torch.optim.SGD, Adam and AdamW. The base optimizer's state (momentum buffers, Adam moments
and step counts) is read and written in torch's own layout, so ``base_optimizer.state_dict()`` and a
later unfused step see exactly what torch's step would have left.

Anything else (another optimizer, amsgrad, capturable/fused/differentiable flags, tensor lr) takes
the generic path: restore, then ``base_optimizer.step()``.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor

import fastsam.ops as ops


def fused_kind(base: torch.optim.Optimizer) -> str | None:
    """"sgd" or "adam" when the base optimizer's exact type has a fused restore+update."""
    if type(base) is torch.optim.SGD:
        return "sgd"
    if type(base) in (torch.optim.Adam, torch.optim.AdamW):
        return "adam"
    return None


def group_supported(kind: str, group: dict) -> bool:
    """Whether a param group's options are all covered by the fused kernel."""
    if group.get("differentiable") or group.get("fused") or group.get("capturable"):
        return False
    if not isinstance(group["lr"], (float, int)):
        return False
    if kind == "adam":
        return not group.get("amsgrad") and all(isinstance(b, (float, int)) for b in group["betas"])
    return True


def _take(ts: List[Tensor], idx: List[int]) -> List[Tensor]:
    return [ts[i] for i in idx]


def _sgd(base, bucket, grads) -> None:
    group, params, backups, impl = bucket.group, bucket.params, bucket.backups, bucket.impl
    momentum = group["momentum"]
    args = (group["lr"], group["weight_decay"], momentum, group["dampening"], group["nesterov"], group["maximize"])
    if momentum == 0:
        ops.restore_sgd_(params, grads, backups, [], *args, False, impl=impl)
        return
    states = [base.state[p] for p in params]
    new = [i for i, s in enumerate(states) if s.get("momentum_buffer") is None]
    for i in new:
        states[i]["momentum_buffer"] = torch.empty_like(params[i], memory_format=torch.preserve_format)
    bufs = [s["momentum_buffer"] for s in states]
    if not new:
        ops.restore_sgd_(params, grads, backups, bufs, *args, False, impl=impl)
        return
    # First step of some parameters: torch sets their buffer to d_p; the kernel does that in place.
    old = sorted(set(range(len(params))) - set(new))
    for idx, init in ((old, False), (new, True)):
        ops.restore_sgd_(_take(params, idx), _take(grads, idx), _take(backups, idx), _take(bufs, idx), *args, init,
                         impl=impl)


def _adam(base, bucket, grads) -> None:
    group, params, backups, impl = bucket.group, bucket.params, bucket.backups, bucket.impl
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
    lists = (params, grads, backups, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states])
    for step, idx in cached:
        ops.restore_adam_(*(lists if len(cached) == 1 else (_take(ts, idx) for ts in lists)), group["lr"], beta1,
                          beta2, group["weight_decay"], group["eps"], decoupled, group["maximize"], step, impl=impl)


def restore_and_update(kind: str, base, bucket, grads: List[Tensor]) -> None:
    """w <- backup, then the base optimizer's step for the parameters of ``bucket`` (one device and dtype)."""
    (_sgd if kind == "sgd" else _adam)(base, bucket, grads)
