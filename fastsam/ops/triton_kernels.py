"""Triton implementation of the fused ops (impl="triton"): the signatures and math of reference.py.

Every op is O(1) launches whatever the number of tensors (see _triton_multi_tensor for the tables).
Math is fp32 with one rounding per store; reductions are fp32 and deterministic (no atomics). Device
scalars (norm_sq, acc, coef, inv_scale, found_inf, Adam's steps) are read and written by the kernels only:
no host synchronisation, so a step stays capturable in a CUDA graph. An absent inv_scale or found_inf is a
kernel variant of its own (UNSCALE, MAY_SKIP), which reads nothing for it.
Triton is imported here (and in _triton_multi_tensor) only, when impl="triton" is first used.
"""
import math
from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastsam.ops import list_checks
from fastsam.ops._triton_multi_tensor import (BITS, ELEMENTS, INTERPRET, ONE, PARAM_DTYPES, ROW_INNER, ROWS, block_of,
                                              device_fn, lanes, launch, ld, ptr_of, table)

_F32 = torch.float32

# ------------------------------------------------------------------------------------ list columns
# Each op's lists, by their column in its table (``ptr_of(row, column, ...)``). The host code hands the
# table its specs through _columns, which checks that they come in this order.
NORM_SQ_GRADS, NORM_SQ_PARAMS, NORM_SQ_ROW_SCALES, NORM_SQ_EMA = map(tl.constexpr, range(4))
ROW_NORM_PARAMS, ROW_NORM_OUT = map(tl.constexpr, range(2))
PERTURB_PARAMS, PERTURB_GRADS, PERTURB_BACKUPS, PERTURB_ROW_SCALES, PERTURB_EMA = map(tl.constexpr, range(5))
REFLECT_PARAMS, REFLECT_BACKUPS, REFLECT_DIRS, REFLECT_GRADS, REFLECT_GRAD_COPIES = map(tl.constexpr, range(5))
DOT_A, DOT_B = map(tl.constexpr, range(2))
RESTORE_PARAMS, RESTORE_BACKUPS = map(tl.constexpr, range(2))
# The fused updates: the lists every one reads, then the base optimizer's state.
UPDATE_PARAMS, UPDATE_GRADS, UPDATE_BACKUPS, UPDATE_GRADS_B, UPDATE_GRADS_C = map(tl.constexpr, range(5))
SGD_MOMENTUM_BUFFERS = tl.constexpr(5)
ADAM_EXP_AVGS, ADAM_EXP_AVG_SQS, ADAM_STEPS = map(tl.constexpr, range(5, 8))
# coef's entries: the weights of g, g_b and g_c
COEF_G, COEF_B, COEF_C = map(tl.constexpr, range(3))


def _columns(*specs):
    """The table specs ``(column, name, list, dtype, kind)``, checked to come in column order, without columns."""
    assert [c.value for c, *_ in specs] == list(range(len(specs))), [c.value for c, *_ in specs]
    return tuple(spec for _, *spec in specs)


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
        inner = tl.load(row + ROW_INNER)
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


# Loss scaling and skipped steps (see reference.py): a grad of the op's ``grads`` list is unscaled as it is
# read, before any other use; a skipped step (found_inf nonzero) stores only w where the step began.

@device_fn
def _unscaled(g, inv_scale, UNSCALE: tl.constexpr):
    """The fp32 grad ``g`` as the op uses it: times inv_scale (loss scaling) when there is one."""
    if UNSCALE:
        g = g * tl.load(inv_scale)
    return g


@device_fn
def _taken(found_inf, offs, MAY_SKIP: tl.constexpr):
    """Whether the step is taken (found_inf is 0), as a uniform block like ``offs``; always, without found_inf."""
    if MAY_SKIP:
        # broadcast before comparing: the interpreter cannot broadcast a scalar comparison's result
        go = tl.broadcast_to(tl.load(found_inf), offs.shape) == 0
    else:
        go = True
    return go


@device_fn
def _commit(p, x, mask, go, MAY_SKIP: tl.constexpr):
    """Store x unless the step is skipped: the old values stay without being read (a uniform mask keeps the
    store vectorized)."""
    if MAY_SKIP:
        if mask is None:
            mask = go
        else:
            mask = mask & go
    tl.store(p, x, mask=mask)


@device_fn
def _or_start(go, new, start, MAY_SKIP: tl.constexpr):
    """``new``, or ``start`` (where w began: fp32 from the param dtype, so exact) when the step is skipped."""
    if MAY_SKIP:
        new = tl.where(go, new, start)
    return new


@device_fn
def _norm_sq_block(row, start, offs, mask, eta, sigma, inv_scale, DT: tl.constexpr, MODE: tl.constexpr,
                   DIR: tl.constexpr, UNSCALE: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    d = _unscaled(ld(ptr_of(row, NORM_SQ_GRADS, DT, ALIGN), offs, mask), inv_scale, UNSCALE)
    if DIR:
        d = d - sigma * ld(ptr_of(row, NORM_SQ_EMA, DT, ALIGN), offs, mask)
    w = d
    if MODE == 1:
        w = ld(ptr_of(row, NORM_SQ_PARAMS, DT, ALIGN), offs, mask)
    x = _t_operator(row, start, offs, mask, w, eta, NORM_SQ_ROW_SCALES, MODE, BLOCK, ALIGN) * d
    return tl.sum(x * x)  # masked lanes read d = 0


@triton.jit
def _norm_sq_kernel(table, partials, eta, sigma, inv_scale, BLOCK: tl.constexpr, ALIGN: tl.constexpr,
                    W: tl.constexpr, PACK_LOG: tl.constexpr, DT: tl.constexpr, MODE: tl.constexpr, DIR: tl.constexpr,
                    UNSCALE: tl.constexpr):
    row, start, numel = block_of(table, W, BLOCK)
    if start + BLOCK <= numel:
        s = _norm_sq_block(row, start, start + tl.arange(0, BLOCK), None, eta, sigma, inv_scale, DT, MODE, DIR,
                           UNSCALE, BLOCK, ALIGN)
    else:
        rows, offs, mask = lanes(table, row, start, numel, W, BLOCK, PACK_LOG)
        s = _norm_sq_block(rows, start, offs, mask, eta, sigma, inv_scale, DT, MODE, DIR, UNSCALE, BLOCK, ALIGN)
    tl.store(partials + tl.program_id(0), s)


@device_fn
def _dot_norm_sq_block(row, offs, mask, DT: tl.constexpr, ALIGN: tl.constexpr):
    a = ld(ptr_of(row, DOT_A, DT, ALIGN), offs, mask)
    b = ld(ptr_of(row, DOT_B, DT, ALIGN), offs, mask)
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
    inner = tl.broadcast_to(tl.load(rows + ROW_INNER), (BLOCK,))
    lines = ptr_of(rows, ROW_NORM_PARAMS, DT, ALIGN) + r * inner
    acc = tl.zeros([BLOCK, COLS], tl.float32)
    for c in range(0, tl.max(inner, 0), COLS):
        cols = c + tl.arange(0, COLS)
        x = tl.load(lines[:, None] + cols[None, :], mask=rmask[:, None] & (cols[None, :] < inner[:, None]), other=0)
        acc += x.to(tl.float32) * x.to(tl.float32)
    tl.store(ptr_of(rows, ROW_NORM_OUT, tl.float32, ALIGN) + r, tl.sqrt_rn(tl.sum(acc, axis=1)) + eta, mask=rmask)


@device_fn
def _sam_scale(norm_sq, rho, eps):
    """``rho / (sqrt(norm_sq) + eps)``, correctly rounded at each step as torch computes it."""
    return tl.div_rn(rho, tl.sqrt_rn(tl.load(norm_sq)) + eps)


@device_fn
def _perturb_block(row, start, offs, mask, norm_sq, inv_scale, found_inf, rho, eps, eta, sigma, lmbda, one_m_lmbda,
                   DT: tl.constexpr, MODE: tl.constexpr, SIGN: tl.constexpr, DIR: tl.constexpr, EMA: tl.constexpr,
                   BLEND: tl.constexpr, UNSCALE: tl.constexpr, MAY_SKIP: tl.constexpr, BLOCK: tl.constexpr,
                   ALIGN: tl.constexpr):
    wp = ptr_of(row, PERTURB_PARAMS, DT, ALIGN) + offs
    w_raw = tl.load(wp, mask=mask)
    # skipped steps too: the caller restores from it
    tl.store(ptr_of(row, PERTURB_BACKUPS, DT, ALIGN) + offs, w_raw, mask=mask)
    w = w_raw.to(tl.float32)
    g_raw = tl.load(ptr_of(row, PERTURB_GRADS, DT, ALIGN) + offs, mask=mask)
    g = _unscaled(g_raw.to(tl.float32), inv_scale, UNSCALE)
    d = g
    go = _taken(found_inf, offs, MAY_SKIP)
    if EMA:
        mp = ptr_of(row, PERTURB_EMA, DT, ALIGN) + offs
        if DIR or BLEND:
            m = tl.load(mp, mask=mask).to(tl.float32)
        if DIR:
            d = g - sigma * m
        if BLEND:
            _commit(mp, (lmbda * m + one_m_lmbda * g).to(DT), mask, go, MAY_SKIP)
        elif UNSCALE:
            _commit(mp, g.to(DT), mask, go, MAY_SKIP)
        else:
            # lmbda = 0: the grad's own bits, not a round trip through fp32
            _commit(mp, g_raw, mask, go, MAY_SKIP)
    t = _t_operator(row, start, offs, mask, w, eta, PERTURB_ROW_SCALES, MODE, BLOCK, ALIGN)
    if SIGN:
        # sign(0) = 0 and NaN stays NaN, as torch.sign
        e = rho * t * tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, d))
    else:
        e = _sam_scale(norm_sq, rho, eps) * (t * t) * d
    _commit(wp, (w + e).to(DT), mask, go, MAY_SKIP)


@triton.jit
def _perturb_kernel(table, norm_sq, inv_scale, found_inf, rho, eps, eta, sigma, lmbda, one_m_lmbda,
                    BLOCK: tl.constexpr, ALIGN: tl.constexpr, W: tl.constexpr, PACK_LOG: tl.constexpr,
                    DT: tl.constexpr, MODE: tl.constexpr, SIGN: tl.constexpr, DIR: tl.constexpr, EMA: tl.constexpr,
                    BLEND: tl.constexpr, UNSCALE: tl.constexpr, MAY_SKIP: tl.constexpr):
    row, start, numel = block_of(table, W, BLOCK)
    if start + BLOCK <= numel:
        _perturb_block(row, start, start + tl.arange(0, BLOCK), None, norm_sq, inv_scale, found_inf, rho, eps, eta,
                       sigma, lmbda, one_m_lmbda, DT, MODE, SIGN, DIR, EMA, BLEND, UNSCALE, MAY_SKIP, BLOCK, ALIGN)
    else:
        rows, offs, mask = lanes(table, row, start, numel, W, BLOCK, PACK_LOG)
        _perturb_block(rows, start, offs, mask, norm_sq, inv_scale, found_inf, rho, eps, eta, sigma, lmbda,
                       one_m_lmbda, DT, MODE, SIGN, DIR, EMA, BLEND, UNSCALE, MAY_SKIP, BLOCK, ALIGN)


@device_fn
def _copy(row, offs, mask, K_DST: tl.constexpr, K_SRC: tl.constexpr, DT: tl.constexpr, ALIGN: tl.constexpr):
    tl.store(ptr_of(row, K_DST, DT, ALIGN) + offs, tl.load(ptr_of(row, K_SRC, DT, ALIGN) + offs, mask=mask),
             mask=mask)


@device_fn
def _reflect_block(row, offs, mask, norm_sq, inv_scale, found_inf, rho, eps, DT: tl.constexpr, ALIGN: tl.constexpr,
                   COPY: tl.constexpr, UNSCALE: tl.constexpr, MAY_SKIP: tl.constexpr):
    b = ld(ptr_of(row, REFLECT_BACKUPS, DT, ALIGN), offs, mask)
    d = ld(ptr_of(row, REFLECT_DIRS, DT, ALIGN), offs, mask)
    w = _or_start(_taken(found_inf, offs, MAY_SKIP), b - _sam_scale(norm_sq, rho, eps) * d, b, MAY_SKIP)
    tl.store(ptr_of(row, REFLECT_PARAMS, DT, ALIGN) + offs, w.to(DT), mask=mask)
    if COPY:
        if UNSCALE:
            g = _unscaled(ld(ptr_of(row, REFLECT_GRADS, DT, ALIGN), offs, mask), inv_scale, UNSCALE)
            tl.store(ptr_of(row, REFLECT_GRAD_COPIES, DT, ALIGN) + offs, g.to(DT), mask=mask)
        else:
            _copy(row, offs, mask, REFLECT_GRAD_COPIES, REFLECT_GRADS, DT, ALIGN)


@triton.jit
def _reflect_kernel(table, norm_sq, inv_scale, found_inf, rho, eps, BLOCK: tl.constexpr, ALIGN: tl.constexpr,
                    W: tl.constexpr, PACK_LOG: tl.constexpr, DT: tl.constexpr, COPY: tl.constexpr,
                    UNSCALE: tl.constexpr, MAY_SKIP: tl.constexpr):
    row, start, numel = block_of(table, W, BLOCK)
    if start + BLOCK <= numel:
        _reflect_block(row, start + tl.arange(0, BLOCK), None, norm_sq, inv_scale, found_inf, rho, eps, DT, ALIGN,
                       COPY, UNSCALE, MAY_SKIP)
    else:
        rows, offs, mask = lanes(table, row, start, numel, W, BLOCK, PACK_LOG)
        _reflect_block(rows, offs, mask, norm_sq, inv_scale, found_inf, rho, eps, DT, ALIGN, COPY, UNSCALE,
                       MAY_SKIP)


@triton.jit
def _restore_kernel(table, BLOCK: tl.constexpr, ALIGN: tl.constexpr, W: tl.constexpr, PACK_LOG: tl.constexpr,
                    DT: tl.constexpr):
    row, start, numel = block_of(table, W, BLOCK)
    if start + BLOCK <= numel:
        _copy(row, start + tl.arange(0, BLOCK), None, RESTORE_PARAMS, RESTORE_BACKUPS, DT, ALIGN)
    else:
        rows, offs, mask = lanes(table, row, start, numel, W, BLOCK, PACK_LOG)
        _copy(rows, offs, mask, RESTORE_PARAMS, RESTORE_BACKUPS, DT, ALIGN)


# The fused updates share their first five lists: params, grads, backups (params themselves when there is
# nothing to restore), grads_b, grads_c; their optimizer state follows. Skipped, they store w where the
# update starts from (the backup) and leave their state as it is.

@device_fn
def _update_inputs(row, offs, mask, coef, inv_scale, DT: tl.constexpr, ALIGN: tl.constexpr, MAXIMIZE: tl.constexpr,
                   COEF: tl.constexpr, GB: tl.constexpr, GC: tl.constexpr, UNSCALE: tl.constexpr):
    """(w the update starts from, its fp32 grad: ``g`` or ``coef[0] g + coef[1] g_b + coef[2] g_c``, ``g``
    unscaled; g_b and g_c were stored unscaled)."""
    w = ld(ptr_of(row, UPDATE_BACKUPS, DT, ALIGN), offs, mask)
    g = _unscaled(ld(ptr_of(row, UPDATE_GRADS, DT, ALIGN), offs, mask), inv_scale, UNSCALE)
    if COEF:
        g = tl.load(coef + COEF_G) * g
        if GB:
            g += tl.load(coef + COEF_B) * ld(ptr_of(row, UPDATE_GRADS_B, DT, ALIGN), offs, mask)
        if GC:
            g += tl.load(coef + COEF_C) * ld(ptr_of(row, UPDATE_GRADS_C, DT, ALIGN), offs, mask)
    if MAXIMIZE:
        g = -g
    return w, g


@device_fn
def _sgd_block(row, offs, mask, coef, inv_scale, found_inf, lr, weight_decay, momentum, damp1, DT: tl.constexpr,
               ALIGN: tl.constexpr, MAXIMIZE: tl.constexpr, WD: tl.constexpr, MOMENTUM: tl.constexpr,
               NESTEROV: tl.constexpr, INIT: tl.constexpr, COEF: tl.constexpr, GB: tl.constexpr, GC: tl.constexpr,
               UNSCALE: tl.constexpr, MAY_SKIP: tl.constexpr):
    w, d = _update_inputs(row, offs, mask, coef, inv_scale, DT, ALIGN, MAXIMIZE, COEF, GB, GC, UNSCALE)
    go = _taken(found_inf, offs, MAY_SKIP)
    if WD:
        d = d + weight_decay * w
    if MOMENTUM:
        bp = ptr_of(row, SGD_MOMENTUM_BUFFERS, DT, ALIGN) + offs
        if INIT:
            buf = d
        else:
            buf = tl.load(bp, mask=mask).to(tl.float32) * momentum + damp1 * d
        _commit(bp, buf.to(DT), mask, go, MAY_SKIP)
        if NESTEROV:
            d = d + momentum * buf
        else:
            d = buf
    tl.store(ptr_of(row, UPDATE_PARAMS, DT, ALIGN) + offs, _or_start(go, w - lr * d, w, MAY_SKIP).to(DT), mask=mask)


@triton.jit
def _sgd_kernel(table, coef, inv_scale, found_inf, lr, weight_decay, momentum, damp1, BLOCK: tl.constexpr,
                ALIGN: tl.constexpr, W: tl.constexpr, PACK_LOG: tl.constexpr, DT: tl.constexpr,
                MAXIMIZE: tl.constexpr, WD: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                INIT: tl.constexpr, COEF: tl.constexpr, GB: tl.constexpr, GC: tl.constexpr, UNSCALE: tl.constexpr,
                MAY_SKIP: tl.constexpr):
    row, start, numel = block_of(table, W, BLOCK)
    if start + BLOCK <= numel:
        _sgd_block(row, start + tl.arange(0, BLOCK), None, coef, inv_scale, found_inf, lr, weight_decay, momentum,
                   damp1, DT, ALIGN, MAXIMIZE, WD, MOMENTUM, NESTEROV, INIT, COEF, GB, GC, UNSCALE, MAY_SKIP)
    else:
        rows, offs, mask = lanes(table, row, start, numel, W, BLOCK, PACK_LOG)
        _sgd_block(rows, offs, mask, coef, inv_scale, found_inf, lr, weight_decay, momentum, damp1, DT, ALIGN,
                   MAXIMIZE, WD, MOMENTUM, NESTEROV, INIT, COEF, GB, GC, UNSCALE, MAY_SKIP)


@device_fn
def _one_minus_pow(one_m_beta, s):
    """``1 - beta^s`` in fp64 (``1 - beta`` given: exact in fp64 from fp32, unlike beta itself)."""
    return 1.0 - tl.exp(s * tl.log(1.0 - tl.cast(one_m_beta, tl.float64)))


@device_fn
def _bias_corrections(row, lr, lerp_w, one_m_beta2, step_size, bc2_sqrt, STEPS: tl.constexpr):
    """(step size ``lr / (1 - beta1^s)``, ``sqrt(1 - beta2^s)``): the host's, of the float step; with STEPS
    (torch's capturable step tensors, column ADAM_STEPS), from this tensor's own step count, in fp64 as on the host."""
    if STEPS:
        s = tl.load(ptr_of(row, ADAM_STEPS, tl.float32, 4)).to(tl.float64)
        step_size = (tl.cast(lr, tl.float64) / _one_minus_pow(lerp_w, s)).to(tl.float32)
        bc2_sqrt = tl.sqrt(_one_minus_pow(one_m_beta2, s)).to(tl.float32)
    return step_size, bc2_sqrt


@device_fn
def _adam_block(row, offs, mask, coef, inv_scale, found_inf, lr, lerp_w, beta2, one_m_beta2, weight_decay, decay,
                eps, step_size, bc2_sqrt, DT: tl.constexpr, ALIGN: tl.constexpr, MAXIMIZE: tl.constexpr,
                WD: tl.constexpr, DECOUPLED: tl.constexpr, LERP_LO: tl.constexpr, COEF: tl.constexpr,
                GB: tl.constexpr, GC: tl.constexpr, UNSCALE: tl.constexpr, MAY_SKIP: tl.constexpr,
                STEPS: tl.constexpr):
    w0, g = _update_inputs(row, offs, mask, coef, inv_scale, DT, ALIGN, MAXIMIZE, COEF, GB, GC, UNSCALE)
    go = _taken(found_inf, offs, MAY_SKIP)
    step_size, bc2_sqrt = _bias_corrections(row, lr, lerp_w, one_m_beta2, step_size, bc2_sqrt, STEPS)
    mp, vp = ptr_of(row, ADAM_EXP_AVGS, DT, ALIGN) + offs, ptr_of(row, ADAM_EXP_AVG_SQS, DT, ALIGN) + offs
    w = w0
    if WD:
        if DECOUPLED:
            w = w0 * decay
        else:
            g = g + weight_decay * w0
    m = tl.load(mp, mask=mask).to(tl.float32)
    # torch.lerp's two formulas, picked by |weight| < 0.5 as torch does
    if LERP_LO:
        m = m + lerp_w * (g - m)
    else:
        m = g - (g - m) * (1.0 - lerp_w)
    v = tl.load(vp, mask=mask).to(tl.float32) * beta2 + one_m_beta2 * g * g
    _commit(mp, m.to(DT), mask, go, MAY_SKIP)
    _commit(vp, v.to(DT), mask, go, MAY_SKIP)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    w = _or_start(go, w - step_size * tl.div_rn(m, denom), w0, MAY_SKIP)
    tl.store(ptr_of(row, UPDATE_PARAMS, DT, ALIGN) + offs, w.to(DT), mask=mask)


@triton.jit
def _adam_kernel(table, coef, inv_scale, found_inf, lr, lerp_w, beta2, one_m_beta2, weight_decay, decay, eps,
                 step_size, bc2_sqrt, BLOCK: tl.constexpr, ALIGN: tl.constexpr, W: tl.constexpr,
                 PACK_LOG: tl.constexpr, DT: tl.constexpr, MAXIMIZE: tl.constexpr, WD: tl.constexpr,
                 DECOUPLED: tl.constexpr, LERP_LO: tl.constexpr, COEF: tl.constexpr, GB: tl.constexpr,
                 GC: tl.constexpr, UNSCALE: tl.constexpr, MAY_SKIP: tl.constexpr, STEPS: tl.constexpr):
    row, start, numel = block_of(table, W, BLOCK)
    if start + BLOCK <= numel:
        _adam_block(row, start + tl.arange(0, BLOCK), None, coef, inv_scale, found_inf, lr, lerp_w, beta2,
                    one_m_beta2, weight_decay, decay, eps, step_size, bc2_sqrt, DT, ALIGN, MAXIMIZE, WD, DECOUPLED,
                    LERP_LO, COEF, GB, GC, UNSCALE, MAY_SKIP, STEPS)
    else:
        rows, offs, mask = lanes(table, row, start, numel, W, BLOCK, PACK_LOG)
        _adam_block(rows, offs, mask, coef, inv_scale, found_inf, lr, lerp_w, beta2, one_m_beta2, weight_decay,
                    decay, eps, step_size, bc2_sqrt, DT, ALIGN, MAXIMIZE, WD, DECOUPLED, LERP_LO, COEF, GB, GC,
                    UNSCALE, MAY_SKIP, STEPS)


# ------------------------------------------------------------------------------------------ checks

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


def _reduce(kernel, tab, acc: Tensor, k: int, *args, **constexprs) -> None:
    """``acc[0:k] +=`` the k sums ``kernel`` computes: k partials per block, then _sum_kernel adds them up."""
    if tab.scratch is None:
        # Stream order makes reusing the partials safe. Only norm_sq_ (k = 1) and dot_norm_sq_ (k = 2) reduce,
        # and their tables differ in width, so a table's k never changes.
        tab.scratch = torch.empty(k * tab.nb, dtype=_F32, device=tab.device)
    launch(kernel, tab, tab.scratch, *args, **constexprs)
    launch(_sum_kernel, tab, tab.scratch, tab.nb, acc, grid=(1,), R=_sum_block(tab.nb), K=k)


def _loss_scaling(like: Tensor, inv_scale: Optional[Tensor], found_inf: Optional[Tensor] = None) -> dict:
    """The UNSCALE and MAY_SKIP switches of the given device scalars (read by the kernels only)."""
    for name, t in (("inv_scale", inv_scale), ("found_inf", found_inf)):
        if t is not None:
            _scalar(name, t, like)
            if t.numel() != 1:  # one value, as the other impls require: a longer tensor is a mistake upstream
                raise ValueError(f"{name} must have one element, got shape {tuple(t.shape)}")
    return dict(UNSCALE=inv_scale is not None, MAY_SKIP=found_inf is not None)


def _update_lists(params: List[Tensor], grads: List[Tensor], backups: List[Tensor], grads_b: List[Tensor],
                  grads_c: List[Tensor], coef: Optional[Tensor], inv_scale: Optional[Tensor],
                  found_inf: Optional[Tensor]):
    """The param dtype, the table specs of the lists every fused update reads (in _update_inputs' column
    order) and the update's COEF, GB, GC, UNSCALE, MAY_SKIP switches."""
    dt = _param_dtype("params", params)
    if coef is None:
        grads_b = grads_c = []  # not read
    else:
        _scalar("coef", coef, params[0], 3)
    # Nothing to restore: w is read where it is written, with no kernel variant of its own.
    specs = ((UPDATE_PARAMS, "params", params, dt, ELEMENTS), (UPDATE_GRADS, "grads", grads, dt, ELEMENTS),
             (UPDATE_BACKUPS, "backups", backups or params, dt, ELEMENTS),
             (UPDATE_GRADS_B, "grads_b", grads_b or None, dt, ELEMENTS),
             (UPDATE_GRADS_C, "grads_c", grads_c or None, dt, ELEMENTS))
    return dt, specs, dict(COEF=coef is not None, GB=bool(grads_b), GC=bool(grads_c),
                           **_loss_scaling(params[0], inv_scale, found_inf))


def _uses_ema(ema: List[Tensor], sigma: float) -> bool:
    """Whether the direction is g - sigma * m; otherwise it is g exactly and the EMA is not read for it."""
    return bool(ema) and sigma != 0


# --------------------------------------------------------------------------------------------- ops

@torch.no_grad()
def norm_sq_(acc: Tensor, grads: List[Tensor], params: List[Tensor], row_scales: List[Tensor],
             mode: int, eta: float, ema: List[Tensor], sigma: float, inv_scale: Optional[Tensor]) -> None:
    if list_checks.norm_sq_(grads, params, row_scales, mode, ema) == 0:
        return
    dt = _param_dtype("grads", grads)
    _scalar("acc", acc, grads[0])
    direction = _uses_ema(ema, sigma)
    tab = table(_columns((NORM_SQ_GRADS, "grads", grads, dt, ELEMENTS),
                         (NORM_SQ_PARAMS, "params", params if mode == 1 else None, dt, ELEMENTS),
                         (NORM_SQ_ROW_SCALES, "row_scales", row_scales if mode == 2 else None, _F32, ROWS),
                         (NORM_SQ_EMA, "ema", ema if direction else None, dt, ELEMENTS)))
    _reduce(_norm_sq_kernel, tab, acc, 1, float(eta), float(sigma), inv_scale, DT=PARAM_DTYPES[dt], MODE=mode,
            DIR=direction, **_loss_scaling(grads[0], inv_scale))


@torch.no_grad()
def row_norm_(out: List[Tensor], params: List[Tensor], eta: float) -> None:
    if list_checks.row_norm_(out, params) == 0:
        return
    dt = _param_dtype("params", params)
    tab = table(_columns((ROW_NORM_PARAMS, "params", params, dt, ELEMENTS), (ROW_NORM_OUT, "out", out, _F32, ROWS)),
                rows=True)
    launch(_row_norm_kernel, tab, float(eta), DT=PARAM_DTYPES[dt], COLS=tab.cols)


@torch.no_grad()
def perturb_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor], row_scales: List[Tensor],
             norm_sq: Tensor, rho: float, eps: float, mode: int, eta: float, sign: bool, ema: List[Tensor],
             sigma: float, lmbda: float, inv_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    if list_checks.perturb_(params, grads, backups, row_scales, mode, ema) == 0:
        return
    dt = _param_dtype("params", params)
    _scalar("norm_sq", norm_sq, params[0])
    tab = table(_columns((PERTURB_PARAMS, "params", params, dt, ELEMENTS),
                         (PERTURB_GRADS, "grads", grads, dt, ELEMENTS),
                         (PERTURB_BACKUPS, "backups", backups, dt, ELEMENTS),
                         (PERTURB_ROW_SCALES, "row_scales", row_scales if mode == 2 else None, _F32, ROWS),
                         (PERTURB_EMA, "ema", ema or None, dt, ELEMENTS)))
    has_ema = bool(ema)  # without it every EMA switch is off: no kernel variant differs in unused switches only
    launch(_perturb_kernel, tab, norm_sq, inv_scale, found_inf, float(rho), float(eps), float(eta), float(sigma),
           float(lmbda), float(1 - lmbda), DT=PARAM_DTYPES[dt], MODE=mode, SIGN=bool(sign),
           DIR=_uses_ema(ema, sigma), EMA=has_ema, BLEND=has_ema and lmbda != 0,
           **_loss_scaling(params[0], inv_scale, found_inf))


@torch.no_grad()
def reflect_(params: List[Tensor], backups: List[Tensor], dirs: List[Tensor], norm_sq: Tensor, rho: float,
             eps: float, grads: List[Tensor], grad_copies: List[Tensor], inv_scale: Optional[Tensor],
             found_inf: Optional[Tensor]) -> None:
    if list_checks.reflect_(params, backups, dirs, grads, grad_copies) == 0:
        return
    dt = _param_dtype("params", params)
    _scalar("norm_sq", norm_sq, params[0])
    tab = table(_columns((REFLECT_PARAMS, "params", params, dt, ELEMENTS),
                         (REFLECT_BACKUPS, "backups", backups, dt, ELEMENTS),
                         (REFLECT_DIRS, "dirs", dirs, dt, ELEMENTS),
                         (REFLECT_GRADS, "grads", grads or None, dt, ELEMENTS),
                         (REFLECT_GRAD_COPIES, "grad_copies", grad_copies or None, dt, ELEMENTS)))
    if not grads:
        inv_scale = None  # read by the copies only: no kernel variant differs in unused arguments only
    launch(_reflect_kernel, tab, norm_sq, inv_scale, found_inf, float(rho), float(eps), DT=PARAM_DTYPES[dt],
           COPY=bool(grads), **_loss_scaling(params[0], inv_scale, found_inf))


@torch.no_grad()
def dot_norm_sq_(acc: Tensor, a: List[Tensor], b: List[Tensor]) -> None:
    if list_checks.dot_norm_sq_(a, b) == 0:
        return
    dt = _param_dtype("a", a)
    _scalar("acc", acc, a[0], 2)
    tab = table(_columns((DOT_A, "a", a, dt, ELEMENTS), (DOT_B, "b", b, dt, ELEMENTS)))
    _reduce(_dot_norm_sq_kernel, tab, acc, 2, DT=PARAM_DTYPES[dt])


@torch.no_grad()
def restore_(params: List[Tensor], backups: List[Tensor]) -> None:
    if list_checks.restore_(params, backups) == 0:
        return
    dt = _param_dtype("params", params)
    tab = table(_columns((RESTORE_PARAMS, "params", params, dt, ELEMENTS),
                         (RESTORE_BACKUPS, "backups", backups, dt, ELEMENTS)))
    launch(_restore_kernel, tab, DT=BITS[dt])


@torch.no_grad()
def restore_sgd_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor], momentum_buffers: List[Tensor],
                 lr: float, weight_decay: float, momentum: float, dampening: float, nesterov: bool,
                 maximize: bool, init_momentum: bool, grads_b: List[Tensor], grads_c: List[Tensor],
                 coef: Optional[Tensor], inv_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    if list_checks.restore_sgd_(params, grads, backups, momentum_buffers, momentum, grads_b, grads_c, coef) == 0:
        return
    dt, specs, switches = _update_lists(params, grads, backups, grads_b, grads_c, coef, inv_scale, found_inf)
    tab = table(_columns(*specs, (SGD_MOMENTUM_BUFFERS, "momentum_buffers", momentum_buffers if momentum != 0 else None,
                                  dt, ELEMENTS)))
    launch(_sgd_kernel, tab, coef, inv_scale, found_inf, float(lr), float(weight_decay), float(momentum),
           float(1 - dampening), DT=PARAM_DTYPES[dt], MAXIMIZE=bool(maximize), WD=weight_decay != 0,
           MOMENTUM=momentum != 0, NESTEROV=bool(nesterov), INIT=bool(init_momentum), **switches)


@torch.no_grad()
def restore_adam_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor], exp_avgs: List[Tensor],
                  exp_avg_sqs: List[Tensor], lr: float, beta1: float, beta2: float, weight_decay: float,
                  eps: float, decoupled: bool, maximize: bool, step: float, grads_b: List[Tensor],
                  grads_c: List[Tensor], coef: Optional[Tensor], inv_scale: Optional[Tensor],
                  found_inf: Optional[Tensor], steps: List[Tensor]) -> None:
    if list_checks.restore_adam_(params, grads, backups, exp_avgs, exp_avg_sqs, steps, grads_b, grads_c, coef) == 0:
        return
    dt, specs, switches = _update_lists(params, grads, backups, grads_b, grads_c, coef, inv_scale, found_inf)
    tab = table(_columns(*specs, (ADAM_EXP_AVGS, "exp_avgs", exp_avgs, dt, ELEMENTS),
                         (ADAM_EXP_AVG_SQS, "exp_avg_sqs", exp_avg_sqs, dt, ELEMENTS),
                         (ADAM_STEPS, "steps", steps or None, _F32, ONE)))
    # Scalars in double on the host, as the reference; the kernel gets them rounded to fp32 once (floats:
    # Triton would make an int argument equal to 1 a compile-time constant). With device step counts the
    # kernel computes the bias corrections ("step" is ignored, and may be 0).
    lerp_w = float(1 - beta1)
    corrections = (0.0, 0.0) if steps else (lr / (1 - beta1**step), math.sqrt(1 - beta2**step))
    scalars = (lr, lerp_w, beta2, 1 - beta2, weight_decay, 1 - lr * weight_decay, eps) + corrections
    launch(_adam_kernel, tab, coef, inv_scale, found_inf, *map(float, scalars), DT=PARAM_DTYPES[dt],
           MAXIMIZE=bool(maximize), WD=weight_decay != 0, DECOUPLED=bool(decoupled), LERP_LO=abs(lerp_w) < 0.5,
           STEPS=bool(steps), **switches)
