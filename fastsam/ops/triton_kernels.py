"""Triton implementation of the fused ops (impl="triton"): the signatures and math of reference.py.

Every op is O(1) launches whatever the number of tensors (see _triton_multi_tensor for the tables).
Math is fp32 with one rounding per store; reductions are fp32 and deterministic (no atomics). Device
scalars (norm_sq, acc) are read and written by the kernels only: no host synchronisation.
Triton is imported here (and in _triton_multi_tensor) only, when impl="triton" is first used.
"""
import math
from typing import List

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastsam.ops._triton_multi_tensor import (BITS, INTERPRET, PARAM_DTYPES, block_of, device_fn, lanes, launch, ld,
                                              ptr_of, table)

_F32 = torch.float32


def _sum_block(n: int) -> int:
    # one fixed size on a GPU (one compiled variant); as small as the job in the interpreter
    return min(65536, triton.next_power_of_2(n)) if INTERPRET else 1024


# ----------------------------------------------------------------------------------------- kernels
# Kernels take (table, scalars..., BLOCK, ALIGN, W, PACK_LOG, flags...) and run their block function on
# one of two shapes of block: a full block of one tensor, unmasked, so the accesses through its
# ALIGN-hinted pointers compile to vector loads and stores; or any other block (a tensor's last one, a
# packed one) through per-lane rows, offsets and mask from ``lanes``.

@device_fn
def _t_operator(row, start, offs, mask, w, eta, K_ROW: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr,
                ALIGN: tl.constexpr):
    if MODE == 1:
        t = tl.abs(w) + eta
    elif MODE == 2:
        inner = tl.load(row + 2)
        if mask is None:
            r0 = start // inner
            rem = start - r0 * inner
            i = tl.arange(0, BLOCK)
            # A block spans at most 2 rows when rows are at least a block long; otherwise all the indices
            # fit in int32, whose division is several times cheaper than int64's on a GPU.
            if inner >= BLOCK:
                r = r0 + (rem + i >= inner).to(tl.int64)
            else:
                r = r0 + ((rem.to(tl.int32) + i) // inner.to(tl.int32)).to(tl.int64)
        else:
            r = offs // inner
        t = ld(ptr_of(row, K_ROW, tl.float32, ALIGN), r, mask)
    else:
        t = 1.0
    return t


@device_fn
def _norm_sq_block(row, start, offs, mask, eta, DT: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr,
                   ALIGN: tl.constexpr):
    g = ld(ptr_of(row, 0, DT, ALIGN), offs, mask)
    w = g
    if MODE == 1:
        w = ld(ptr_of(row, 1, DT, ALIGN), offs, mask)
    x = _t_operator(row, start, offs, mask, w, eta, 2, MODE, BLOCK, ALIGN) * g
    return tl.sum(x * x)  # masked lanes read g = 0


@triton.jit
def _norm_sq_kernel(table, partials, eta, BLOCK: tl.constexpr, ALIGN: tl.constexpr, W: tl.constexpr,
                    PACK_LOG: tl.constexpr, DT: tl.constexpr, MODE: tl.constexpr):
    row, start, numel = block_of(table, W, BLOCK)
    if start + BLOCK <= numel:
        s = _norm_sq_block(row, start, start + tl.arange(0, BLOCK), None, eta, DT, MODE, BLOCK, ALIGN)
    else:
        rows, offs, mask = lanes(table, row, start, numel, W, BLOCK, PACK_LOG)
        s = _norm_sq_block(rows, start, offs, mask, eta, DT, MODE, BLOCK, ALIGN)
    tl.store(partials + tl.program_id(0), s)


@triton.jit
def _sum_kernel(table, partials, n, acc, BLOCK: tl.constexpr, ALIGN: tl.constexpr, W: tl.constexpr,
                PACK_LOG: tl.constexpr, R: tl.constexpr):
    # Stage 2 of norm_sq_: one program, fixed order, so the norm is the same bits at every call.
    s = tl.zeros([R], tl.float32)
    for i in range(0, n, R):
        offs = i + tl.arange(0, R)
        s += tl.load(partials + offs, mask=offs < n, other=0.0)
    tl.store(acc, tl.load(acc) + tl.sum(s))


@triton.jit
def _row_norm_kernel(table, eta, BLOCK: tl.constexpr, ALIGN: tl.constexpr, W: tl.constexpr,
                     PACK_LOG: tl.constexpr, DT: tl.constexpr, COLS: tl.constexpr):
    # Row table: BLOCK rows per program, swept COLS columns at a time, so every row sum stays in one program.
    row, r0, nrows = block_of(table, W, BLOCK)
    rows, r, rmask = lanes(table, row, r0, nrows, W, BLOCK, PACK_LOG)
    inner = tl.broadcast_to(tl.load(rows + 2), (BLOCK,))
    lines = ptr_of(rows, 0, DT, ALIGN) + r * inner
    acc = tl.zeros([BLOCK, COLS], tl.float32)
    for c in range(0, tl.max(inner, 0), COLS):
        cols = c + tl.arange(0, COLS)
        x = tl.load(lines[:, None] + cols[None, :], mask=rmask[:, None] & (cols[None, :] < inner[:, None]), other=0)
        acc += x.to(tl.float32) * x.to(tl.float32)
    tl.store(ptr_of(rows, 1, tl.float32, ALIGN) + r, tl.sqrt_rn(tl.sum(acc, axis=1)) + eta, mask=rmask)


@device_fn
def _perturb_block(row, start, offs, mask, norm_sq, rho, eps, eta, DT: tl.constexpr, MODE: tl.constexpr,
                   SIGN: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    wp = ptr_of(row, 0, DT, ALIGN) + offs
    w_raw = tl.load(wp, mask=mask)
    tl.store(ptr_of(row, 2, DT, ALIGN) + offs, w_raw, mask=mask)
    w = w_raw.to(tl.float32)
    g = ld(ptr_of(row, 1, DT, ALIGN), offs, mask)
    t = _t_operator(row, start, offs, mask, w, eta, 3, MODE, BLOCK, ALIGN)
    if SIGN:
        # sign(0) = 0 and NaN stays NaN, as torch.sign
        e = rho * t * tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, g))
    else:
        scale = tl.div_rn(rho, tl.sqrt_rn(tl.load(norm_sq)) + eps)
        e = scale * (t * t) * g
    tl.store(wp, (w + e).to(DT), mask=mask)


@triton.jit
def _perturb_kernel(table, norm_sq, rho, eps, eta, BLOCK: tl.constexpr, ALIGN: tl.constexpr, W: tl.constexpr,
                    PACK_LOG: tl.constexpr, DT: tl.constexpr, MODE: tl.constexpr, SIGN: tl.constexpr):
    row, start, numel = block_of(table, W, BLOCK)
    if start + BLOCK <= numel:
        _perturb_block(row, start, start + tl.arange(0, BLOCK), None, norm_sq, rho, eps, eta, DT, MODE, SIGN,
                       BLOCK, ALIGN)
    else:
        rows, offs, mask = lanes(table, row, start, numel, W, BLOCK, PACK_LOG)
        _perturb_block(rows, start, offs, mask, norm_sq, rho, eps, eta, DT, MODE, SIGN, BLOCK, ALIGN)


@device_fn
def _restore_block(row, offs, mask, DT: tl.constexpr, ALIGN: tl.constexpr):
    tl.store(ptr_of(row, 0, DT, ALIGN) + offs, tl.load(ptr_of(row, 1, DT, ALIGN) + offs, mask=mask), mask=mask)


@triton.jit
def _restore_kernel(table, BLOCK: tl.constexpr, ALIGN: tl.constexpr, W: tl.constexpr, PACK_LOG: tl.constexpr,
                    DT: tl.constexpr):
    row, start, numel = block_of(table, W, BLOCK)
    if start + BLOCK <= numel:
        _restore_block(row, start + tl.arange(0, BLOCK), None, DT, ALIGN)
    else:
        rows, offs, mask = lanes(table, row, start, numel, W, BLOCK, PACK_LOG)
        _restore_block(rows, offs, mask, DT, ALIGN)


@device_fn
def _sgd_block(row, offs, mask, lr, weight_decay, momentum, damp1, DT: tl.constexpr, ALIGN: tl.constexpr,
               MAXIMIZE: tl.constexpr, WD: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
               INIT: tl.constexpr):
    w = ld(ptr_of(row, 2, DT, ALIGN), offs, mask)
    d = ld(ptr_of(row, 1, DT, ALIGN), offs, mask)
    if MAXIMIZE:
        d = -d
    if WD:
        d = d + weight_decay * w
    if MOMENTUM:
        bp = ptr_of(row, 3, DT, ALIGN) + offs
        if INIT:
            buf = d
        else:
            buf = tl.load(bp, mask=mask).to(tl.float32) * momentum + damp1 * d
        tl.store(bp, buf.to(DT), mask=mask)
        if NESTEROV:
            d = d + momentum * buf
        else:
            d = buf
    tl.store(ptr_of(row, 0, DT, ALIGN) + offs, (w - lr * d).to(DT), mask=mask)


@triton.jit
def _sgd_kernel(table, lr, weight_decay, momentum, damp1, BLOCK: tl.constexpr, ALIGN: tl.constexpr,
                W: tl.constexpr, PACK_LOG: tl.constexpr, DT: tl.constexpr, MAXIMIZE: tl.constexpr,
                WD: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, INIT: tl.constexpr):
    row, start, numel = block_of(table, W, BLOCK)
    if start + BLOCK <= numel:
        _sgd_block(row, start + tl.arange(0, BLOCK), None, lr, weight_decay, momentum, damp1, DT, ALIGN,
                   MAXIMIZE, WD, MOMENTUM, NESTEROV, INIT)
    else:
        rows, offs, mask = lanes(table, row, start, numel, W, BLOCK, PACK_LOG)
        _sgd_block(rows, offs, mask, lr, weight_decay, momentum, damp1, DT, ALIGN, MAXIMIZE, WD, MOMENTUM,
                   NESTEROV, INIT)


@device_fn
def _adam_block(row, offs, mask, lerp_w, beta2, one_m_beta2, weight_decay, decay, eps, step_size, bc2_sqrt,
                DT: tl.constexpr, ALIGN: tl.constexpr, MAXIMIZE: tl.constexpr, WD: tl.constexpr,
                DECOUPLED: tl.constexpr, LERP_LO: tl.constexpr):
    w = ld(ptr_of(row, 2, DT, ALIGN), offs, mask)
    g = ld(ptr_of(row, 1, DT, ALIGN), offs, mask)
    mp, vp = ptr_of(row, 3, DT, ALIGN) + offs, ptr_of(row, 4, DT, ALIGN) + offs
    if MAXIMIZE:
        g = -g
    if WD:
        if DECOUPLED:
            w = w * decay
        else:
            g = g + weight_decay * w
    m = tl.load(mp, mask=mask).to(tl.float32)
    # torch.lerp's two formulas, picked by |weight| < 0.5 as torch does
    if LERP_LO:
        m = m + lerp_w * (g - m)
    else:
        m = g - (g - m) * (1.0 - lerp_w)
    v = tl.load(vp, mask=mask).to(tl.float32) * beta2 + one_m_beta2 * g * g
    tl.store(mp, m.to(DT), mask=mask)
    tl.store(vp, v.to(DT), mask=mask)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    tl.store(ptr_of(row, 0, DT, ALIGN) + offs, (w - step_size * tl.div_rn(m, denom)).to(DT), mask=mask)


@triton.jit
def _adam_kernel(table, lerp_w, beta2, one_m_beta2, weight_decay, decay, eps, step_size, bc2_sqrt,
                 BLOCK: tl.constexpr, ALIGN: tl.constexpr, W: tl.constexpr, PACK_LOG: tl.constexpr,
                 DT: tl.constexpr, MAXIMIZE: tl.constexpr, WD: tl.constexpr, DECOUPLED: tl.constexpr,
                 LERP_LO: tl.constexpr):
    row, start, numel = block_of(table, W, BLOCK)
    if start + BLOCK <= numel:
        _adam_block(row, start + tl.arange(0, BLOCK), None, lerp_w, beta2, one_m_beta2, weight_decay, decay, eps,
                    step_size, bc2_sqrt, DT, ALIGN, MAXIMIZE, WD, DECOUPLED, LERP_LO)
    else:
        rows, offs, mask = lanes(table, row, start, numel, W, BLOCK, PACK_LOG)
        _adam_block(rows, offs, mask, lerp_w, beta2, one_m_beta2, weight_decay, decay, eps, step_size, bc2_sqrt,
                    DT, ALIGN, MAXIMIZE, WD, DECOUPLED, LERP_LO)


# ------------------------------------------------------------------------------------------ checks

def _count(n: int, **lists) -> None:
    for name, lst in lists.items():
        if len(lst) != n:
            raise ValueError(f"{name} must hold {n} tensors (one per parameter), got {len(lst)}")


def _param_dtype(name: str, lst: List[Tensor]) -> torch.dtype:
    dt = lst[0].dtype
    if dt not in PARAM_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16 tensors, got {dt}")
    return dt


def _scalar(name: str, t: Tensor, like: Tensor) -> None:
    if not isinstance(t, Tensor) or t.dtype != _F32:
        raise TypeError(f"{name} must be a float32 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.numel() < 1 or t.device != like.device:
        raise ValueError(f"{name} must have shape [1] on {like.device}, got {tuple(t.shape)} on {t.device}")


def _mode(mode: int, n: int, row_scales: List[Tensor]) -> None:
    if mode not in (0, 1, 2):
        raise ValueError(f"mode must be 0 (identity), 1 (abs) or 2 (row), got {mode}")
    if mode == 2:
        _count(n, row_scales=row_scales)


# --------------------------------------------------------------------------------------------- ops

@torch.no_grad()
def norm_sq_(acc: Tensor, grads: List[Tensor], params: List[Tensor], row_scales: List[Tensor],
             mode: int, eta: float) -> None:
    n = len(grads)
    _count(n, params=params)
    _mode(mode, n, row_scales)
    if n == 0:
        return
    dt = _param_dtype("grads", grads)
    _scalar("acc", acc, grads[0])
    tab = table((("grads", grads, dt, False), ("params", params if mode == 1 else None, dt, False),
                 ("row_scales", row_scales if mode == 2 else None, _F32, True)))
    if tab.scratch is None:  # per-block partial sums; stream order makes reusing them safe
        tab.scratch = torch.empty(max(tab.nb, 1), dtype=_F32, device=tab.device)
    launch(_norm_sq_kernel, tab, tab.scratch, float(eta), DT=PARAM_DTYPES[dt], MODE=mode)
    launch(_sum_kernel, tab, tab.scratch, tab.nb, acc, grid=(1,), R=_sum_block(tab.nb))


@torch.no_grad()
def row_norm_(out: List[Tensor], params: List[Tensor], eta: float) -> None:
    n = len(params)
    _count(n, out=out)
    if n == 0:
        return
    dt = _param_dtype("params", params)
    tab = table((("params", params, dt, False), ("out", out, _F32, True)), rows=True)
    launch(_row_norm_kernel, tab, float(eta), DT=PARAM_DTYPES[dt], COLS=tab.cols)


@torch.no_grad()
def perturb_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor], row_scales: List[Tensor],
             norm_sq: Tensor, rho: float, eps: float, mode: int, eta: float, sign: bool) -> None:
    n = len(params)
    _count(n, grads=grads, backups=backups)
    _mode(mode, n, row_scales)
    if n == 0:
        return
    dt = _param_dtype("params", params)
    _scalar("norm_sq", norm_sq, params[0])
    tab = table((("params", params, dt, False), ("grads", grads, dt, False), ("backups", backups, dt, False),
                 ("row_scales", row_scales if mode == 2 else None, _F32, True)))
    launch(_perturb_kernel, tab, norm_sq, float(rho), float(eps), float(eta), DT=PARAM_DTYPES[dt], MODE=mode,
           SIGN=bool(sign))


@torch.no_grad()
def restore_(params: List[Tensor], backups: List[Tensor]) -> None:
    n = len(params)
    _count(n, backups=backups)
    if n == 0:
        return
    dt = _param_dtype("params", params)
    tab = table((("params", params, dt, False), ("backups", backups, dt, False)))
    launch(_restore_kernel, tab, DT=BITS[dt])


@torch.no_grad()
def restore_sgd_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor], momentum_buffers: List[Tensor],
                 lr: float, weight_decay: float, momentum: float, dampening: float, nesterov: bool,
                 maximize: bool, init_momentum: bool) -> None:
    n = len(params)
    _count(n, grads=grads, backups=backups, **({"momentum_buffers": momentum_buffers} if momentum != 0 else {}))
    if n == 0:
        return
    dt = _param_dtype("params", params)
    tab = table((("params", params, dt, False), ("grads", grads, dt, False), ("backups", backups, dt, False),
                 ("momentum_buffers", momentum_buffers if momentum != 0 else None, dt, False)))
    launch(_sgd_kernel, tab, float(lr), float(weight_decay), float(momentum), float(1 - dampening),
           DT=PARAM_DTYPES[dt], MAXIMIZE=bool(maximize), WD=weight_decay != 0, MOMENTUM=momentum != 0,
           NESTEROV=bool(nesterov), INIT=bool(init_momentum))


@torch.no_grad()
def restore_adam_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor], exp_avgs: List[Tensor],
                  exp_avg_sqs: List[Tensor], lr: float, beta1: float, beta2: float, weight_decay: float,
                  eps: float, decoupled: bool, maximize: bool, step: float) -> None:
    n = len(params)
    _count(n, grads=grads, backups=backups, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    if n == 0:
        return
    dt = _param_dtype("params", params)
    tab = table((("params", params, dt, False), ("grads", grads, dt, False), ("backups", backups, dt, False),
                 ("exp_avgs", exp_avgs, dt, False), ("exp_avg_sqs", exp_avg_sqs, dt, False)))
    # Scalars in double on the host, as the reference; the kernel gets them rounded to fp32 once (floats:
    # Triton would make an int argument equal to 1 a compile-time constant).
    lerp_w = float(1 - beta1)
    scalars = (lerp_w, beta2, 1 - beta2, weight_decay, 1 - lr * weight_decay, eps, lr / (1 - beta1**step),
               math.sqrt(1 - beta2**step))
    launch(_adam_kernel, tab, *map(float, scalars), DT=PARAM_DTYPES[dt], MAXIMIZE=bool(maximize),
           WD=weight_decay != 0, DECOUPLED=bool(decoupled), LERP_LO=abs(lerp_w) < 0.5)
