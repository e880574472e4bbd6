"""Triton implementation of the fused ops (impl="triton"): the signatures and math of reference.py.

Every op is O(1) launches whatever the number of tensors (see _triton_multi_tensor for the tables).
Math is fp32 with one rounding per store; reductions are fp32 and deterministic (no atomics). Device
scalars (norm_sq, acc, coef) are read and written by the kernels only: no host synchronisation.
Triton is imported here (and in _triton_multi_tensor) only, when impl="triton" is first used.
"""
import math
from typing import List, Optional

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
def _norm_sq_block(row, start, offs, mask, eta, sigma, DT: tl.constexpr, MODE: tl.constexpr, DIR: tl.constexpr,
                   BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    d = ld(ptr_of(row, 0, DT, ALIGN), offs, mask)
    if DIR:
        d = d - sigma * ld(ptr_of(row, 3, DT, ALIGN), offs, mask)
    w = d
    if MODE == 1:
        w = ld(ptr_of(row, 1, DT, ALIGN), offs, mask)
    x = _t_operator(row, start, offs, mask, w, eta, 2, MODE, BLOCK, ALIGN) * d
    return tl.sum(x * x)  # masked lanes read d = 0


@triton.jit
def _norm_sq_kernel(table, partials, eta, sigma, BLOCK: tl.constexpr, ALIGN: tl.constexpr, W: tl.constexpr,
                    PACK_LOG: tl.constexpr, DT: tl.constexpr, MODE: tl.constexpr, DIR: tl.constexpr):
    row, start, numel = block_of(table, W, BLOCK)
    if start + BLOCK <= numel:
        s = _norm_sq_block(row, start, start + tl.arange(0, BLOCK), None, eta, sigma, DT, MODE, DIR, BLOCK, ALIGN)
    else:
        rows, offs, mask = lanes(table, row, start, numel, W, BLOCK, PACK_LOG)
        s = _norm_sq_block(rows, start, offs, mask, eta, sigma, DT, MODE, DIR, BLOCK, ALIGN)
    tl.store(partials + tl.program_id(0), s)


@device_fn
def _dot_norm_sq_block(row, offs, mask, DT: tl.constexpr, ALIGN: tl.constexpr):
    a = ld(ptr_of(row, 0, DT, ALIGN), offs, mask)
    b = ld(ptr_of(row, 1, DT, ALIGN), offs, mask)
    return tl.sum(a * b), tl.sum(b * b)  # masked lanes read 0


@triton.jit
def _dot_norm_sq_kernel(table, partials, BLOCK: tl.constexpr, ALIGN: tl.constexpr, W: tl.constexpr,
                        PACK_LOG: tl.constexpr, DT: tl.constexpr):
    row, start, numel = block_of(table, W, BLOCK)
    if start + BLOCK <= numel:
        dot, sq = _dot_norm_sq_block(row, start + tl.arange(0, BLOCK), None, DT, ALIGN)
    else:
        rows, offs, mask = lanes(table, row, start, numel, W, BLOCK, PACK_LOG)
        dot, sq = _dot_norm_sq_block(rows, offs, mask, DT, ALIGN)
    # one run of partials per sum, as _sum_kernel reads them
    tl.store(partials + tl.program_id(0), dot)
    tl.store(partials + tl.num_programs(0) + tl.program_id(0), sq)


@triton.jit
def _sum_kernel(table, partials, n, acc, BLOCK: tl.constexpr, ALIGN: tl.constexpr, W: tl.constexpr,
                PACK_LOG: tl.constexpr, R: tl.constexpr, K: tl.constexpr):
    # Stage 2 of the reductions: one program, fixed order, so a norm is the same bits at every call.
    for k in tl.static_range(K):
        s = tl.zeros([R], tl.float32)
        for i in range(0, n, R):
            offs = i + tl.arange(0, R)
            s += tl.load(partials + k * n + offs, mask=offs < n, other=0.0)
        tl.store(acc + k, tl.load(acc + k) + tl.sum(s))


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
def _sam_scale(norm_sq, rho, eps):
    """``rho / (sqrt(norm_sq) + eps)``, correctly rounded at each step as torch computes it."""
    return tl.div_rn(rho, tl.sqrt_rn(tl.load(norm_sq)) + eps)


@device_fn
def _perturb_block(row, start, offs, mask, norm_sq, rho, eps, eta, sigma, lmbda, one_m_lmbda, DT: tl.constexpr,
                   MODE: tl.constexpr, SIGN: tl.constexpr, DIR: tl.constexpr, EMA: tl.constexpr,
                   BLEND: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    wp = ptr_of(row, 0, DT, ALIGN) + offs
    w_raw = tl.load(wp, mask=mask)
    tl.store(ptr_of(row, 2, DT, ALIGN) + offs, w_raw, mask=mask)
    w = w_raw.to(tl.float32)
    g_raw = tl.load(ptr_of(row, 1, DT, ALIGN) + offs, mask=mask)
    g = g_raw.to(tl.float32)
    d = g
    if EMA:
        mp = ptr_of(row, 4, DT, ALIGN) + offs
        if DIR or BLEND:
            m = tl.load(mp, mask=mask).to(tl.float32)
        if DIR:
            d = g - sigma * m
        if BLEND:
            tl.store(mp, (lmbda * m + one_m_lmbda * g).to(DT), mask=mask)
        else:
            tl.store(mp, g_raw, mask=mask)  # lmbda = 0: the grad's own bits, not a round trip through fp32
    t = _t_operator(row, start, offs, mask, w, eta, 3, MODE, BLOCK, ALIGN)
    if SIGN:
        # sign(0) = 0 and NaN stays NaN, as torch.sign
        e = rho * t * tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, d))
    else:
        e = _sam_scale(norm_sq, rho, eps) * (t * t) * d
    tl.store(wp, (w + e).to(DT), mask=mask)


@triton.jit
def _perturb_kernel(table, norm_sq, rho, eps, eta, sigma, lmbda, one_m_lmbda, BLOCK: tl.constexpr,
                    ALIGN: tl.constexpr, W: tl.constexpr, PACK_LOG: tl.constexpr, DT: tl.constexpr,
                    MODE: tl.constexpr, SIGN: tl.constexpr, DIR: tl.constexpr, EMA: tl.constexpr,
                    BLEND: tl.constexpr):
    row, start, numel = block_of(table, W, BLOCK)
    if start + BLOCK <= numel:
        _perturb_block(row, start, start + tl.arange(0, BLOCK), None, norm_sq, rho, eps, eta, sigma, lmbda,
                       one_m_lmbda, DT, MODE, SIGN, DIR, EMA, BLEND, BLOCK, ALIGN)
    else:
        rows, offs, mask = lanes(table, row, start, numel, W, BLOCK, PACK_LOG)
        _perturb_block(rows, start, offs, mask, norm_sq, rho, eps, eta, sigma, lmbda, one_m_lmbda, DT, MODE, SIGN,
                       DIR, EMA, BLEND, BLOCK, ALIGN)


@device_fn
def _copy(row, offs, mask, K_DST: tl.constexpr, K_SRC: tl.constexpr, DT: tl.constexpr, ALIGN: tl.constexpr):
    tl.store(ptr_of(row, K_DST, DT, ALIGN) + offs, tl.load(ptr_of(row, K_SRC, DT, ALIGN) + offs, mask=mask),
             mask=mask)


@device_fn
def _reflect_block(row, offs, mask, norm_sq, rho, eps, DT: tl.constexpr, ALIGN: tl.constexpr, COPY: tl.constexpr):
    b = ld(ptr_of(row, 1, DT, ALIGN), offs, mask)
    d = ld(ptr_of(row, 2, DT, ALIGN), offs, mask)
    tl.store(ptr_of(row, 0, DT, ALIGN) + offs, (b - _sam_scale(norm_sq, rho, eps) * d).to(DT), mask=mask)
    if COPY:
        _copy(row, offs, mask, 4, 3, DT, ALIGN)


@triton.jit
def _reflect_kernel(table, norm_sq, rho, eps, BLOCK: tl.constexpr, ALIGN: tl.constexpr, W: tl.constexpr,
                    PACK_LOG: tl.constexpr, DT: tl.constexpr, COPY: tl.constexpr):
    row, start, numel = block_of(table, W, BLOCK)
    if start + BLOCK <= numel:
        _reflect_block(row, start + tl.arange(0, BLOCK), None, norm_sq, rho, eps, DT, ALIGN, COPY)
    else:
        rows, offs, mask = lanes(table, row, start, numel, W, BLOCK, PACK_LOG)
        _reflect_block(rows, offs, mask, norm_sq, rho, eps, DT, ALIGN, COPY)


@triton.jit
def _restore_kernel(table, BLOCK: tl.constexpr, ALIGN: tl.constexpr, W: tl.constexpr, PACK_LOG: tl.constexpr,
                    DT: tl.constexpr):
    row, start, numel = block_of(table, W, BLOCK)
    if start + BLOCK <= numel:
        _copy(row, start + tl.arange(0, BLOCK), None, 0, 1, DT, ALIGN)
    else:
        rows, offs, mask = lanes(table, row, start, numel, W, BLOCK, PACK_LOG)
        _copy(rows, offs, mask, 0, 1, DT, ALIGN)


# The fused updates share their first five lists: params, grads, backups (params themselves when there is
# nothing to restore), grads_b, grads_c; their optimizer state follows.

@device_fn
def _update_inputs(row, offs, mask, coef, DT: tl.constexpr, ALIGN: tl.constexpr, MAXIMIZE: tl.constexpr,
                   COEF: tl.constexpr, GB: tl.constexpr, GC: tl.constexpr):
    """(w the update starts from, its fp32 grad: ``g`` or ``coef[0] g + coef[1] g_b + coef[2] g_c``)."""
    w = ld(ptr_of(row, 2, DT, ALIGN), offs, mask)
    g = ld(ptr_of(row, 1, DT, ALIGN), offs, mask)
    if COEF:
        g = tl.load(coef) * g
        if GB:
            g += tl.load(coef + 1) * ld(ptr_of(row, 3, DT, ALIGN), offs, mask)
        if GC:
            g += tl.load(coef + 2) * ld(ptr_of(row, 4, DT, ALIGN), offs, mask)
    if MAXIMIZE:
        g = -g
    return w, g


@device_fn
def _sgd_block(row, offs, mask, coef, lr, weight_decay, momentum, damp1, DT: tl.constexpr, ALIGN: tl.constexpr,
               MAXIMIZE: tl.constexpr, WD: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
               INIT: tl.constexpr, COEF: tl.constexpr, GB: tl.constexpr, GC: tl.constexpr):
    w, d = _update_inputs(row, offs, mask, coef, DT, ALIGN, MAXIMIZE, COEF, GB, GC)
    if WD:
        d = d + weight_decay * w
    if MOMENTUM:
        bp = ptr_of(row, 5, DT, ALIGN) + offs
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
def _sgd_kernel(table, coef, lr, weight_decay, momentum, damp1, BLOCK: tl.constexpr, ALIGN: tl.constexpr,
                W: tl.constexpr, PACK_LOG: tl.constexpr, DT: tl.constexpr, MAXIMIZE: tl.constexpr,
                WD: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, INIT: tl.constexpr,
                COEF: tl.constexpr, GB: tl.constexpr, GC: tl.constexpr):
    row, start, numel = block_of(table, W, BLOCK)
    if start + BLOCK <= numel:
        _sgd_block(row, start + tl.arange(0, BLOCK), None, coef, lr, weight_decay, momentum, damp1, DT, ALIGN,
                   MAXIMIZE, WD, MOMENTUM, NESTEROV, INIT, COEF, GB, GC)
    else:
        rows, offs, mask = lanes(table, row, start, numel, W, BLOCK, PACK_LOG)
        _sgd_block(rows, offs, mask, coef, lr, weight_decay, momentum, damp1, DT, ALIGN, MAXIMIZE, WD, MOMENTUM,
                   NESTEROV, INIT, COEF, GB, GC)


@device_fn
def _adam_block(row, offs, mask, coef, lerp_w, beta2, one_m_beta2, weight_decay, decay, eps, step_size, bc2_sqrt,
                DT: tl.constexpr, ALIGN: tl.constexpr, MAXIMIZE: tl.constexpr, WD: tl.constexpr,
                DECOUPLED: tl.constexpr, LERP_LO: tl.constexpr, COEF: tl.constexpr, GB: tl.constexpr,
                GC: tl.constexpr):
    w, g = _update_inputs(row, offs, mask, coef, DT, ALIGN, MAXIMIZE, COEF, GB, GC)
    mp, vp = ptr_of(row, 5, DT, ALIGN) + offs, ptr_of(row, 6, DT, ALIGN) + offs
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
def _adam_kernel(table, coef, lerp_w, beta2, one_m_beta2, weight_decay, decay, eps, step_size, bc2_sqrt,
                 BLOCK: tl.constexpr, ALIGN: tl.constexpr, W: tl.constexpr, PACK_LOG: tl.constexpr,
                 DT: tl.constexpr, MAXIMIZE: tl.constexpr, WD: tl.constexpr, DECOUPLED: tl.constexpr,
                 LERP_LO: tl.constexpr, COEF: tl.constexpr, GB: tl.constexpr, GC: tl.constexpr):
    row, start, numel = block_of(table, W, BLOCK)
    if start + BLOCK <= numel:
        _adam_block(row, start + tl.arange(0, BLOCK), None, coef, lerp_w, beta2, one_m_beta2, weight_decay, decay,
                    eps, step_size, bc2_sqrt, DT, ALIGN, MAXIMIZE, WD, DECOUPLED, LERP_LO, COEF, GB, GC)
    else:
        rows, offs, mask = lanes(table, row, start, numel, W, BLOCK, PACK_LOG)
        _adam_block(rows, offs, mask, coef, lerp_w, beta2, one_m_beta2, weight_decay, decay, eps, step_size,
                    bc2_sqrt, DT, ALIGN, MAXIMIZE, WD, DECOUPLED, LERP_LO, COEF, GB, GC)


# ------------------------------------------------------------------------------------------ checks

def _count(n: int, optional: bool = False, **lists) -> None:
    """Each list holds one tensor per parameter (or, ``optional``, none: a feature the call does not use)."""
    for name, lst in lists.items():
        if len(lst) != n and (lst or not optional):
            either = " or none" if optional else ""
            raise ValueError(f"{name} must hold {n} tensors (one per parameter){either}, got {len(lst)}")


def _param_dtype(name: str, lst: List[Tensor]) -> torch.dtype:
    dt = lst[0].dtype
    if dt not in PARAM_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16 tensors, got {dt}")
    return dt


def _scalar(name: str, t: Tensor, like: Tensor, n: int = 1) -> None:
    """``t`` holds n fp32 values on the device of ``like``, which the kernels address from its data pointer."""
    if not isinstance(t, Tensor) or t.dtype != _F32:
        raise TypeError(f"{name} must be a float32 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.numel() < n or t.device != like.device or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous tensor of shape [{n}] on {like.device}, "
                         f"got shape {tuple(t.shape)}, strides {t.stride()} on {t.device}")


def _mode(mode: int, n: int, row_scales: List[Tensor]) -> None:
    if mode not in (0, 1, 2):
        raise ValueError(f"mode must be 0 (identity), 1 (abs) or 2 (row), got {mode}")
    if mode == 2:
        _count(n, row_scales=row_scales)


def _reduce(kernel, tab, acc: Tensor, k: int, *args, **constexprs) -> None:
    """``acc[0:k] +=`` the k sums ``kernel`` computes: k partials per block, then _sum_kernel adds them up."""
    if tab.scratch is None:
        # Stream order makes reusing the partials safe. Only norm_sq_ (k = 1) and dot_norm_sq_ (k = 2) reduce,
        # and their tables differ in width, so a table's k never changes.
        tab.scratch = torch.empty(k * tab.nb, dtype=_F32, device=tab.device)
    launch(kernel, tab, tab.scratch, *args, **constexprs)
    launch(_sum_kernel, tab, tab.scratch, tab.nb, acc, grid=(1,), R=_sum_block(tab.nb), K=k)


def _update_lists(params: List[Tensor], grads: List[Tensor], backups: List[Tensor], grads_b: List[Tensor],
                  grads_c: List[Tensor], coef: Optional[Tensor]):
    """The param dtype, the table specs of the lists every fused update reads (in _update_inputs' column
    order) and the update's COEF, GB, GC switches."""
    dt = _param_dtype("params", params)
    if coef is None:
        grads_b = grads_c = []  # not read
    else:
        _count(len(params), optional=True, grads_b=grads_b, grads_c=grads_c)
        _scalar("coef", coef, params[0], 3)
    # Nothing to restore: w is read where it is written, with no kernel variant of its own.
    specs = (("params", params, dt, False), ("grads", grads, dt, False), ("backups", backups or params, dt, False),
             ("grads_b", grads_b or None, dt, False), ("grads_c", grads_c or None, dt, False))
    return dt, specs, dict(COEF=coef is not None, GB=bool(grads_b), GC=bool(grads_c))


def _uses_ema(ema: List[Tensor], sigma: float) -> bool:
    """Whether the direction is g - sigma * m; otherwise it is g exactly and the EMA is not read for it."""
    return bool(ema) and sigma != 0


# --------------------------------------------------------------------------------------------- ops

@torch.no_grad()
def norm_sq_(acc: Tensor, grads: List[Tensor], params: List[Tensor], row_scales: List[Tensor],
             mode: int, eta: float, ema: List[Tensor], sigma: float) -> None:
    n = len(grads)
    _count(n, params=params)
    _count(n, optional=True, ema=ema)
    _mode(mode, n, row_scales)
    if n == 0:
        return
    dt = _param_dtype("grads", grads)
    _scalar("acc", acc, grads[0])
    direction = _uses_ema(ema, sigma)
    tab = table((("grads", grads, dt, False), ("params", params if mode == 1 else None, dt, False),
                 ("row_scales", row_scales if mode == 2 else None, _F32, True),
                 ("ema", ema if direction else None, dt, False)))
    _reduce(_norm_sq_kernel, tab, acc, 1, float(eta), float(sigma), DT=PARAM_DTYPES[dt], MODE=mode, DIR=direction)


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
             norm_sq: Tensor, rho: float, eps: float, mode: int, eta: float, sign: bool, ema: List[Tensor],
             sigma: float, lmbda: float) -> None:
    n = len(params)
    _count(n, grads=grads, backups=backups)
    _count(n, optional=True, ema=ema)
    _mode(mode, n, row_scales)
    if n == 0:
        return
    dt = _param_dtype("params", params)
    _scalar("norm_sq", norm_sq, params[0])
    tab = table((("params", params, dt, False), ("grads", grads, dt, False), ("backups", backups, dt, False),
                 ("row_scales", row_scales if mode == 2 else None, _F32, True), ("ema", ema or None, dt, False)))
    has_ema = bool(ema)  # without it every EMA switch is off: no kernel variant differs in unused switches only
    launch(_perturb_kernel, tab, norm_sq, float(rho), float(eps), float(eta), float(sigma), float(lmbda),
           float(1 - lmbda), DT=PARAM_DTYPES[dt], MODE=mode, SIGN=bool(sign), DIR=_uses_ema(ema, sigma),
           EMA=has_ema, BLEND=has_ema and lmbda != 0)


@torch.no_grad()
def reflect_(params: List[Tensor], backups: List[Tensor], dirs: List[Tensor], norm_sq: Tensor, rho: float,
             eps: float, grads: List[Tensor], grad_copies: List[Tensor]) -> None:
    n = len(params)
    _count(n, backups=backups, dirs=dirs)
    if len(grads) != len(grad_copies):
        raise ValueError(f"grads and grad_copies must be both empty or both hold {n} tensors, "
                         f"got {len(grads)} and {len(grad_copies)}")
    _count(n, optional=True, grads=grads, grad_copies=grad_copies)
    if n == 0:
        return
    dt = _param_dtype("params", params)
    _scalar("norm_sq", norm_sq, params[0])
    tab = table((("params", params, dt, False), ("backups", backups, dt, False), ("dirs", dirs, dt, False),
                 ("grads", grads or None, dt, False), ("grad_copies", grad_copies or None, dt, False)))
    launch(_reflect_kernel, tab, norm_sq, float(rho), float(eps), DT=PARAM_DTYPES[dt], COPY=bool(grads))


@torch.no_grad()
def dot_norm_sq_(acc: Tensor, a: List[Tensor], b: List[Tensor]) -> None:
    n = len(a)
    _count(n, b=b)
    if n == 0:
        return
    dt = _param_dtype("a", a)
    _scalar("acc", acc, a[0], 2)
    tab = table((("a", a, dt, False), ("b", b, dt, False)))
    _reduce(_dot_norm_sq_kernel, tab, acc, 2, DT=PARAM_DTYPES[dt])


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
                 maximize: bool, init_momentum: bool, grads_b: List[Tensor], grads_c: List[Tensor],
                 coef: Optional[Tensor]) -> None:
    n = len(params)
    _count(n, grads=grads, **({"momentum_buffers": momentum_buffers} if momentum != 0 else {}))
    _count(n, optional=True, backups=backups)
    if n == 0:
        return
    dt, specs, terms = _update_lists(params, grads, backups, grads_b, grads_c, coef)
    tab = table(specs + (("momentum_buffers", momentum_buffers if momentum != 0 else None, dt, False),))
    launch(_sgd_kernel, tab, coef, float(lr), float(weight_decay), float(momentum), float(1 - dampening),
           DT=PARAM_DTYPES[dt], MAXIMIZE=bool(maximize), WD=weight_decay != 0, MOMENTUM=momentum != 0,
           NESTEROV=bool(nesterov), INIT=bool(init_momentum), **terms)


@torch.no_grad()
def restore_adam_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor], exp_avgs: List[Tensor],
                  exp_avg_sqs: List[Tensor], lr: float, beta1: float, beta2: float, weight_decay: float,
                  eps: float, decoupled: bool, maximize: bool, step: float, grads_b: List[Tensor],
                  grads_c: List[Tensor], coef: Optional[Tensor]) -> None:
    n = len(params)
    _count(n, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    _count(n, optional=True, backups=backups)
    if n == 0:
        return
    dt, specs, terms = _update_lists(params, grads, backups, grads_b, grads_c, coef)
    tab = table(specs + (("exp_avgs", exp_avgs, dt, False), ("exp_avg_sqs", exp_avg_sqs, dt, False)))
    # Scalars in double on the host, as the reference; the kernel gets them rounded to fp32 once (floats:
    # Triton would make an int argument equal to 1 a compile-time constant).
    lerp_w = float(1 - beta1)
    scalars = (lerp_w, beta2, 1 - beta2, weight_decay, 1 - lr * weight_decay, eps, lr / (1 - beta1**step),
               math.sqrt(1 - beta2**step))
    launch(_adam_kernel, tab, coef, *map(float, scalars), DT=PARAM_DTYPES[dt], MAXIMIZE=bool(maximize),
           WD=weight_decay != 0, DECOUPLED=bool(decoupled), LERP_LO=abs(lerp_w) < 0.5, **terms)
