"""How many tensors each list argument of a fused op holds: one per parameter, or, for an optional list, none.

One function per op, called by the pure-torch reference and by the Triton host code before they touch a
tensor, so that a list of the wrong length raises a ValueError naming it instead of being cut short by
``zip`` or read past its end. The C++ ops check the same rules (csrc/checks.h, shared by the CPU and CUDA ops).
Each function returns n, the number of parameters (the length of the op's leading list).
"""
from __future__ import annotations

from typing import List, Optional

from torch import Tensor

_MODES = (0, 1, 2)  # reference.MODE_IDENTITY, MODE_ABS, MODE_ROW
_MODE_ROW = 2


def count(n: int, optional: bool = False, **lists: List[Tensor]) -> None:
    """Each of ``lists`` holds n tensors (or, ``optional``, none: a feature the call does not use)."""
    for name, lst in lists.items():
        if len(lst) != n and (lst or not optional):
            either = " or none" if optional else ""
            raise ValueError(f"{name} must hold {n} tensors (one per parameter){either}, got {len(lst)}")


def _mode(mode: int, n: int, row_scales: List[Tensor]) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be 0 (identity), 1 (abs) or 2 (row), got {mode}")
    if mode == _MODE_ROW:
        count(n, row_scales=row_scales)


def _combination(n: int, grads_b: List[Tensor], grads_c: List[Tensor], coef: Optional[Tensor]) -> None:
    if coef is not None:  # without coef the kept grads are not read
        count(n, optional=True, grads_b=grads_b, grads_c=grads_c)


def norm_sq_(grads: List[Tensor], params: List[Tensor], row_scales: List[Tensor], mode: int,
             ema: List[Tensor]) -> int:
    n = len(grads)
    count(n, params=params)
    count(n, optional=True, ema=ema)
    _mode(mode, n, row_scales)
    return n


def row_norm_(out: List[Tensor], params: List[Tensor]) -> int:
    count(len(params), out=out)
    return len(params)


def perturb_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor], row_scales: List[Tensor], mode: int,
             ema: List[Tensor]) -> int:
    n = len(params)
    count(n, grads=grads, backups=backups)
    count(n, optional=True, ema=ema)
    _mode(mode, n, row_scales)
    return n


def reflect_(params: List[Tensor], backups: List[Tensor], dirs: List[Tensor], grads: List[Tensor],
             grad_copies: List[Tensor]) -> int:
    n = len(params)
    count(n, backups=backups, dirs=dirs)
    if len(grads) != len(grad_copies):
        raise ValueError(f"grads and grad_copies must be both empty or both hold {n} tensors, "
                         f"got {len(grads)} and {len(grad_copies)}")
    count(n, optional=True, grads=grads, grad_copies=grad_copies)
    return n


def dot_norm_sq_(a: List[Tensor], b: List[Tensor]) -> int:
    count(len(a), b=b)
    return len(a)


def restore_(params: List[Tensor], backups: List[Tensor]) -> int:
    count(len(params), backups=backups)
    return len(params)


def restore_sgd_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor], momentum_buffers: List[Tensor],
                 momentum: float, grads_b: List[Tensor], grads_c: List[Tensor], coef: Optional[Tensor]) -> int:
    n = len(params)
    count(n, grads=grads, **({"momentum_buffers": momentum_buffers} if momentum != 0 else {}))
    count(n, optional=True, backups=backups)
    _combination(n, grads_b, grads_c, coef)
    return n


def restore_adam_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor], exp_avgs: List[Tensor],
                  exp_avg_sqs: List[Tensor], steps: List[Tensor], grads_b: List[Tensor], grads_c: List[Tensor],
                  coef: Optional[Tensor]) -> int:
    n = len(params)
    count(n, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    count(n, optional=True, backups=backups, steps=steps)
    _combination(n, grads_b, grads_c, coef)
    return n
