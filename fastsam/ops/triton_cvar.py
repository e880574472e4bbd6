"""Triton implementation of the fused CVaR ops (impl="triton"): the signatures and math of cvar_reference.py.

No host synchronisation: everything that depends on the values (the number ``n`` of valid losses, ``k``,
the rank ``ceil(k)``, the threshold ``t``, ``c_gt``, ``c_eq``, the float64 sum of the losses above ``t``,
the NaN rule) is computed by the kernels and stays on the device. The host only picks kernels and block
sizes from the shapes. A call is:

1. the loss kernel (cross-entropy, BCE; cvar_select reads its losses directly): blocks of rows, a row
   swept ``BLOCK_C`` columns at a time (BLOCK_C = next power of 2 of C, capped), online logsumexp. It
   stores every loss as its *key*: the order-preserving uint32 image of the fp32 loss (``_key``; -0 as +0,
   every NaN as the largest key), 0 for an excluded loss, so that keys carry both the loss and whether it
   counts, and comparing keys is comparing losses. Cross-entropy also stores each row's lse, per-sample
   BCE each row's number of valid labels.
2. the selection of ``t`` = the ``ceil(k)``-th largest valid key, which ends with a small state on the device
   (``_write_state``: t's key, the weights above and at t, undefined, k, c_gt):

   * ``N <= SMALL_N`` candidate losses (decided from the shapes): one program holds every key in registers,
     counts ``n`` and the NaNs, and finds ``t`` by a bitwise search (32 counting rounds: the largest key
     ``v`` with ``#{key >= v} >= rank``), then ``c_gt``, ``c_eq`` and the sum above ``t``; it writes the
     state, value and var.
   * larger: a multi-program radix select over 4 digits of 8 bits. Pass ``p`` histograms the digit ``p``
     of the keys whose first ``p`` digits are those of ``t`` (tl.histogram per program, then integer
     atomics into ``hist[p]``: exact and deterministic). A pass finds the digits of ``t`` chosen so far by
     replaying the choice from the histograms already complete (``_replay``), which also gives ``n`` (the
     sum of ``hist[0]``), ``c_gt`` (the counts above the chosen digits) and ``c_eq`` (the count of the last
     chosen digit); pass 0 also counts the NaNs. The histograms are zeroed by the loss kernel (cvar_select:
     by ``_zero_kernel``); after pass 3, ``_resolve_kernel`` (one program) writes the state.

3. the gradient kernel (cvar_select: the weights kernel): ``1/k`` above ``t``, ``(k - c_gt) / (k c_eq)`` at
   ``t``, 0 below and for excluded entries (exactly 0, whatever their logits); rows or entries of weight
   0 are written without reading the logits. On the large path each program also writes the float64
   sum of its losses above ``t``, which ``_finalize_kernel`` (one program, fixed order: deterministic)
   adds up into ``value``.

Launches per call: small path 3 (cvar_select: 2); large path 8 (loss or zero, 4 radix passes, resolve,
gradient, finalize). Math in fp32 (the "opmath" of fp32/bf16/fp16 inputs), ``k`` and the CVaR value in float64
as the reference; value and var are 0-dim fp32, weights and gradients in the dtype of the input.
"""
import contextlib
import struct
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastsam.ops._triton_multi_tensor import INTERPRET, NUM_WARPS, PARAM_DTYPES, device_fn

# Candidate losses up to which one program selects t (step 2 above); beyond, the multi-program radix select.
SMALL_N = 8192

# Elements per program of the row kernels (rows x columns) and of the radix/weights kernels. The
# interpreter runs every program as Python over numpy arrays: there, blocks are as big as the job.
_TILE = 65536 if INTERPRET else 4096
_MAX_COLS = 65536 if INTERPRET else 4096
_FLAT_BLOCK = 65536 if INTERPRET else 4096
# Programs of a radix pass at most (each sweeps several blocks): bounds the atomics on one bin.
_RADIX_PROGRAMS = 1024
_MIN_SELECT_BLOCK = 1 if INTERPRET else 128  # the small select compiles one variant per power of 2 above this

_F32 = torch.float32
_F64 = torch.float64

# Radix select: 4 passes of 8-bit digits; hist holds one row of 256 counts per pass, then the NaN count.
_BINS: tl.constexpr = tl.constexpr(256)
_NAN_SLOT: tl.constexpr = tl.constexpr(4 * 256)
_HIST_WORDS = 4 * 256 + 1
# The state the gradient and finalize kernels read (int64 words, see _write_state).
_STATE_WORDS = 6
# |k - round(k)| <= SNAP k snaps k to the integer (cvar_reference.SNAP).
_SNAP: tl.constexpr = tl.constexpr(1e-9)
# (No NaN constexpr: Triton checks that a global keeps its value between compilations with ==, which NaN fails.)
_NAN_BITS: tl.constexpr = tl.constexpr(0x7FC00000)
_INF: tl.constexpr = tl.constexpr(float("inf"))
_NAN_KEY: tl.constexpr = tl.constexpr(0xFFFFFFFF)


# ------------------------------------------------------------------------------------------ helpers

@device_fn
def _key(x):
    """The order-preserving uint32 key of fp32 ``x``: -0 maps as +0, every NaN to 0xFFFFFFFF (the largest).
    Every valid key is at least 0x007FFFFF (-inf's), so 0 is free to mark an excluded loss."""
    b = tl.where(x == 0.0, 0, x.to(tl.int32, bitcast=True))
    b = b ^ ((b >> 31) | -2147483648)  # negative: all bits flipped; positive: the sign bit set
    b = tl.where(x != x, -1, b)
    return b.to(tl.uint32, bitcast=True)


@device_fn
def _loss_of(key):
    """The fp32 loss of a key (the inverse of _key)."""
    b = key.to(tl.int32, bitcast=True)
    b = tl.where(b < 0, b ^ -2147483648, ~b)
    return b.to(tl.float32, bitcast=True)


@device_fn
def _nan():
    """An fp32 NaN."""
    return tl.full([], _NAN_BITS, tl.int32).to(tl.float32, bitcast=True)


@device_fn
def _store_key(p, key, mask):
    tl.store(p, key.to(tl.int32, bitcast=True), mask=mask)


@device_fn
def _load_keys(src, offs, mask, KEYS: tl.constexpr):
    """Keys at ``offs``, 0 where masked: ``src`` holds keys (KEYS) or losses that are all valid (cvar_select)."""
    if KEYS:
        key = tl.load(src + offs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    else:
        key = tl.where(mask, _key(tl.load(src + offs, mask=mask, other=0).to(tl.float32)), 0)
    return key


@device_fn
def _k_rank(n, alpha_bits):
    """``k = alpha n`` in float64, snapped to the nearest integer r >= 1 when within SNAP k of it, and
    ``rank = max(ceil(k), 1)``, as the reference. alpha comes as the bits of a float64: a float argument
    of a kernel is fp32."""
    k = alpha_bits.to(tl.float64, bitcast=True) * n.to(tl.float64)
    r = tl.floor(k + 0.5)
    r = tl.where((r - k == 0.5) & (r - 2.0 * tl.floor(r * 0.5) == 1.0), r - 1.0, r)  # halves to even: torch.round
    k = tl.where((r >= 1.0) & (tl.abs(k - r) <= _SNAP * k), r, k)
    rank = tl.maximum(tl.ceil(k), 1.0).to(tl.int64)
    return k, rank


@device_fn
def _defined(n, nan, k):
    """(undefined: a valid NaN loss or no valid loss at all; k, or 1 when n = 0: nothing divides by 0)."""
    return (n == 0) | (nan > 0), tl.where(n == 0, 1.0, k)


@device_fn
def _write_state(state, undef, k, tkey, c_gt, c_eq):
    """Stores what the gradient and finalize kernels read: t's key, the float64 weights of a loss above t
    (``1/k``) and at t (``(k - c_gt) / (k c_eq)``), undefined, k and c_gt. (Kernels launched later read
    it: a program does not read back its own global stores, which other threads of it may not see yet.)"""
    tl.store(state, tkey.to(tl.int64))
    tl.store(state + 1, (1.0 / k).to(tl.int64, bitcast=True))
    w_eq = (k - c_gt.to(tl.float64)) / (k * tl.maximum(c_eq, 1).to(tl.float64))
    tl.store(state + 2, w_eq.to(tl.int64, bitcast=True))
    tl.store(state + 3, undef.to(tl.int64))
    tl.store(state + 4, k.to(tl.int64, bitcast=True))
    tl.store(state + 5, c_gt.to(tl.int64))


@device_fn
def _read_state(state):
    """(t's key, float64 weight above t, at t, undefined) as _write_state stored them."""
    return (tl.load(state).to(tl.uint32), tl.load(state + 1).to(tl.float64, bitcast=True),
            tl.load(state + 2).to(tl.float64, bitcast=True), tl.load(state + 3) != 0)


@device_fn
def _finish(undef, k, tkey, c_gt, s_gt, value, var):
    """Writes value = (s_gt + (k - c_gt) t) / k and var = t (fp32, computed in float64), NaN if undefined."""
    t = _loss_of(tkey).to(tl.float64)
    v = (s_gt + (k - c_gt.to(tl.float64)) * t) / k
    tl.store(value, tl.where(undef, _nan(), v).to(tl.float32))
    tl.store(var, tl.where(undef, _nan(), t).to(tl.float32))


@device_fn
def _replay(hist, alpha_bits, PASSES: tl.constexpr):
    """(n, k, prefix, c_gt, c_eq) from the histograms of the first PASSES radix passes: ``prefix`` is the
    first PASSES digits of t's key (its key when PASSES is 4), ``c_gt`` the number of valid keys above
    every key with that prefix, ``c_eq`` the number with that prefix."""
    bins = tl.arange(0, _BINS)
    n = tl.sum(tl.load(hist + bins))  # pass 0 counts every valid key
    k, rank = _k_rank(n, alpha_bits)
    rem = rank  # t is the rem-th largest key of those with the prefix
    prefix = tl.zeros([], tl.uint32)
    c_gt = tl.zeros([], tl.int64)
    c_eq = n.to(tl.int64)
    for p in tl.static_range(PASSES):
        h = tl.load(hist + p * _BINS + bins).to(tl.int64)
        above = tl.sum(h) - tl.cumsum(h, 0)  # keys with a larger digit
        hit = (above < rem) & (above + h >= rem)  # one digit, none if rank > n (n = 0: undefined anyway)
        a = tl.sum(tl.where(hit, above, 0))
        c_eq = tl.sum(tl.where(hit, h, 0))
        rem -= a
        c_gt += a
        prefix = (prefix << 8) | tl.sum(tl.where(hit, bins, 0)).to(tl.uint32)
    return n, k, prefix, c_gt, c_eq


@device_fn
def _weight(key, tkey, w_gt, w_eq, undef):
    """The weight of each key, in the dtype of w_gt and w_eq: NaN if undefined, exactly 0 for excluded keys."""
    w = tl.where(key > tkey, w_gt, tl.where(key == tkey, w_eq, 0.0))
    w = tl.where(undef, _nan().to(w.dtype), w)
    return tl.where(key != 0, w, 0.0)


@device_fn
def _sum_above(key, tkey):
    """float64 sum of the losses whose key is above t's (excluded keys are 0, never above)."""
    return tl.sum(tl.where(key > tkey, _loss_of(key).to(tl.float64), 0.0))


@device_fn
def _zero_hist(hist):
    if tl.program_id(0) == 0:
        tl.store(hist + tl.arange(0, _NAN_SLOT), tl.zeros([_NAN_SLOT], tl.int32))
        tl.store(hist + _NAN_SLOT, 0)


@device_fn
def _log1p(u):
    """log(1 + u) to fp32 accuracy for u in [0, 1] (Goldberg's correction of the rounding of 1 + u)."""
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))


# ----------------------------------------------------------------------------------- select kernels

@triton.jit
def _zero_kernel(hist):
    _zero_hist(hist)


@triton.jit
def _select_small_kernel(src, N, alpha_bits, state, value, var, BLOCK: tl.constexpr, KEYS: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    key = _load_keys(src, offs, offs < N, KEYS)
    n = tl.sum((key != 0).to(tl.int32))
    nan = tl.sum((key == _NAN_KEY).to(tl.int32))
    k, rank = _k_rank(n, alpha_bits)
    # t = the largest v with #{key >= v} >= rank, one bit at a time; excluded keys (0) are never counted
    tkey = tl.zeros([], tl.uint32)
    for i in tl.static_range(32):
        cand = tkey | (1 << (31 - i))
        tkey = tl.where(tl.sum((key >= cand).to(tl.int32)) >= rank, cand, tkey)
    c_gt = tl.sum((key > tkey).to(tl.int32))
    c_eq = tl.sum(((key == tkey) & (key != 0)).to(tl.int32))
    undef, k = _defined(n, nan, k)
    _write_state(state, undef, k, tkey, c_gt, c_eq)
    _finish(undef, k, tkey, c_gt, _sum_above(key, tkey), value, var)


@triton.jit
def _radix_kernel(src, hist, N, alpha_bits, PASS: tl.constexpr, BLOCK: tl.constexpr, KEYS: tl.constexpr):
    # Each program sweeps every num_programs-th block and adds its histogram to hist[PASS] once.
    prefix = tl.zeros([], tl.uint32)
    if PASS > 0:
        _n, _k, prefix, _c_gt, _c_eq = _replay(hist, alpha_bits, PASS)
    h = tl.zeros([_BINS], tl.int32)
    nan = tl.zeros([], tl.int32)
    for start in range(tl.program_id(0).to(tl.int64) * BLOCK, N, tl.num_programs(0).to(tl.int64) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        key = _load_keys(src, offs, offs < N, KEYS)
        take = key != 0
        if PASS > 0:
            take = take & ((key >> (32 - 8 * PASS)) == prefix)
        else:
            nan += tl.sum((key == _NAN_KEY).to(tl.int32))
        h += tl.histogram(((key >> (24 - 8 * PASS)) & 255).to(tl.int32), _BINS, mask=take)
    tl.atomic_add(hist + PASS * _BINS + tl.arange(0, _BINS), h, mask=h > 0, sem="relaxed")
    if PASS == 0:
        tl.atomic_add(hist + _NAN_SLOT, nan, mask=nan > 0, sem="relaxed")


@triton.jit
def _resolve_kernel(hist, alpha_bits, state):
    n, k, tkey, c_gt, c_eq = _replay(hist, alpha_bits, 4)
    undef, k = _defined(n, tl.load(hist + _NAN_SLOT), k)
    _write_state(state, undef, k, tkey, c_gt, c_eq)


@triton.jit
def _finalize_kernel(state, partials, P, value, var, R: tl.constexpr):
    s = tl.zeros([R], tl.float64)
    for i in range(0, P, R):
        offs = i + tl.arange(0, R)
        s += tl.load(partials + offs, mask=offs < P, other=0.0)
    tkey, _w_gt, _w_eq, undef = _read_state(state)
    _finish(undef, tl.load(state + 4).to(tl.float64, bitcast=True), tkey, tl.load(state + 5), tl.sum(s), value, var)


@triton.jit
def _select_weights_kernel(losses, weights, state, partials, N, BLOCK: tl.constexpr, LARGE: tl.constexpr):
    tkey, w_gt, w_eq, undef = _read_state(state)
    dt = weights.dtype.element_ty
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    key = _load_keys(losses, offs, mask, False)
    w = _weight(key, tkey, w_gt.to(tl.float32).to(dt), w_eq.to(tl.float32).to(dt), undef)
    tl.store(weights + offs, w, mask=mask)
    if LARGE:
        tl.store(partials + tl.program_id(0), _sum_above(key, tkey))


# ------------------------------------------------------------------------------------ cross-entropy

@triton.jit
def _ce_loss_kernel(logits, target, keys, lse_out, hist, n, C, ignore_index, smooth, one_m_smooth,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SMOOTH: tl.constexpr, ZERO: tl.constexpr):
    if ZERO:
        _zero_hist(hist)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n
    base = rows.to(tl.int64) * C
    # logsumexp as torch's: shifted by the max, by 0 where the max is infinite; online over the chunks
    m = tl.full([BLOCK_R], -_INF, tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    xsum = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = rmask[:, None] & (cols < C)[None, :]
        x = tl.load(logits + base[:, None] + cols[None, :], mask=mask, other=-_INF).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 1))
        shift = tl.where(tl.abs(m) == _INF, 0.0, m)
        shift_new = tl.where(tl.abs(m_new) == _INF, 0.0, m_new)
        s = tl.where(s == 0.0, 0.0, s * tl.exp(shift - shift_new))
        s += tl.sum(tl.exp(x - shift_new[:, None]), 1)
        if SMOOTH:
            xsum += tl.sum(tl.where(mask, x, 0.0), 1)
        m = m_new
    lse = tl.log(tl.where(rmask, s, 1.0)) + tl.where(tl.abs(m) == _INF, 0.0, m)  # (no log(0) for padding)
    tgt = tl.load(target + rows, mask=rmask, other=ignore_index)
    valid = rmask & (tgt != ignore_index)
    bad = valid & ((tgt < 0) | (tgt >= C))
    xy = tl.load(logits + base + tgt, mask=valid & ~bad, other=0.0).to(tl.float32)
    loss = lse - xy
    if SMOOTH:
        loss = one_m_smooth * loss + smooth * (lse - xsum / C)
    loss = tl.where(bad, _nan(), loss)
    _store_key(keys + rows, tl.where(valid, _key(loss), 0), rmask)
    tl.store(lse_out + rows, lse, mask=rmask)


@triton.jit
def _ce_grad_kernel(logits, target, keys, lse, grad, state, partials, n, C, smooth_over_c, smooth_m1,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, LARGE: tl.constexpr):
    tkey, w_gt, w_eq, undef = _read_state(state)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n
    key = tl.load(keys + rows, mask=rmask, other=0).to(tl.uint32, bitcast=True)
    w = _weight(key, tkey, w_gt.to(tl.float32), w_eq.to(tl.float32), undef)
    live = w != 0.0  # NaN too; rows of weight 0 (below t, excluded) are written as zeros unread
    lse_r = tl.load(lse + rows, mask=live, other=0.0)
    tgt = tl.load(target + rows, mask=live, other=-1)
    base = rows.to(tl.int64) * C
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = (cols < C)[None, :]
        ptrs = base[:, None] + cols[None, :]
        x = tl.load(logits + ptrs, mask=live[:, None] & cmask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse_r[:, None]) - smooth_over_c
        p = tl.where(cols[None, :] == tgt[:, None], p + smooth_m1, p)
        g = tl.where(live[:, None], w[:, None] * p, 0.0)
        tl.store(grad + ptrs, g.to(grad.dtype.element_ty), mask=rmask[:, None] & cmask)
    if LARGE:
        tl.store(partials + tl.program_id(0), _sum_above(key, tkey))


# ---------------------------------------------------------------------------------------------- BCE

@device_fn
def _bce_tile(logits, target, pos_weight, idx, cols, L, mask, ign, PW: tl.constexpr):
    """(x, y, valid, lw) of a tile: fp32 logits, targets (0 where not valid), the positive weight factor."""
    x = tl.load(logits + idx, mask=mask, other=0.0).to(tl.float32)
    y_raw = tl.load(target + idx, mask=mask, other=0.0)
    valid = mask & (y_raw.to(tl.float32) != ign)  # ign: ignore_index in the target's dtype (exact in fp32)
    y = tl.where(valid, y_raw.to(tl.float32), 0.0)
    if PW:
        lw = 1.0 + (tl.load(pos_weight + cols, mask=cols < L, other=1.0)[None, :] - 1.0) * y
    else:
        lw = 1.0
    return x, y, valid, lw


@triton.jit
def _bce_loss_kernel(logits, target, pos_weight, keys, count, hist, n, L, ign, BLOCK_R: tl.constexpr,
                     BLOCK_C: tl.constexpr, PW: tl.constexpr, PER_SAMPLE: tl.constexpr, ZERO: tl.constexpr):
    if ZERO:
        _zero_hist(hist)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n
    base = rows.to(tl.int64) * L
    acc = tl.zeros([BLOCK_R], tl.float32)
    cnt = tl.zeros([BLOCK_R], tl.int32)
    for c0 in range(0, L, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = rmask[:, None] & (cols < L)[None, :]
        idx = base[:, None] + cols[None, :]
        x, y, valid, lw = _bce_tile(logits, target, pos_weight, idx, cols, L, mask, ign, PW)
        softplus_neg = _log1p(tl.exp(-tl.abs(x))) + tl.maximum(-x, 0.0)
        loss = (1.0 - y) * x + lw * softplus_neg
        if PER_SAMPLE:
            acc += tl.sum(tl.where(valid, loss, 0.0), 1)
            cnt += tl.sum(valid.to(tl.int32), 1)
        else:
            _store_key(keys + idx, tl.where(valid, _key(loss), 0), mask)
    if PER_SAMPLE:
        m1 = tl.maximum(cnt, 1).to(tl.float32)
        _store_key(keys + rows, tl.where(cnt > 0, _key(acc / m1), 0), rmask)
        tl.store(count + rows, m1, mask=rmask)


@triton.jit
def _bce_grad_kernel(logits, target, pos_weight, keys, count, grad, state, partials, n, L, ign,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PW: tl.constexpr, PER_SAMPLE: tl.constexpr,
                     LARGE: tl.constexpr):
    tkey, w_gt, w_eq, undef = _read_state(state)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n
    base = rows.to(tl.int64) * L
    s = tl.zeros([], tl.float64)
    if PER_SAMPLE:
        rkey = tl.load(keys + rows, mask=rmask, other=0).to(tl.uint32, bitcast=True)
        # d value / d loss_ij = w_i / m_i, in float64 before the one rounding to fp32
        wr = _weight(rkey, tkey, w_gt, w_eq, undef)
        rlive = wr != 0.0
        wr = (wr / tl.load(count + rows, mask=rlive, other=1.0).to(tl.float64)).to(tl.float32)
        if LARGE:
            s = _sum_above(rkey, tkey)
    w_gt32 = w_gt.to(tl.float32)
    w_eq32 = w_eq.to(tl.float32)
    for c0 in range(0, L, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = rmask[:, None] & (cols < L)[None, :]
        idx = base[:, None] + cols[None, :]
        if PER_SAMPLE:
            w = tl.broadcast_to(wr[:, None], (BLOCK_R, BLOCK_C))
            live = mask & rlive[:, None]
        else:
            key = tl.load(keys + idx, mask=mask, other=0).to(tl.uint32, bitcast=True)
            w = _weight(key, tkey, w_gt32, w_eq32, undef)
            live = w != 0.0  # excluded entries and those below t: written as zeros unread
            if LARGE:
                s += _sum_above(key, tkey)
        x, y, valid, lw = _bce_tile(logits, target, pos_weight, idx, cols, L, live, ign, PW)
        dloss = (1.0 - y) - lw * tl.sigmoid(-x)
        g = tl.where(valid, w * dloss, 0.0)
        tl.store(grad + idx, g.to(grad.dtype.element_ty), mask=mask)
    if LARGE:
        tl.store(partials + tl.program_id(0), s)


# ------------------------------------------------------------------------------------------- checks

def _alpha_bits(alpha: float) -> int:
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    return struct.unpack("<q", struct.pack("<d", float(alpha)))[0]


def _float_input(name: str, t: Tensor, dim: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in PARAM_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16 for impl='triton', got {t.dtype}"
                        + ("; use impl='torch' or impl='cpu' for float64" if t.dtype == _F64 else ""))
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _logits(logits: Tensor) -> None:
    _float_input("logits", logits, 2)
    if logits.shape[1] < 1:
        raise ValueError(f"logits must have at least one column, got shape {tuple(logits.shape)}")


def _same_device(name: str, t: Tensor, like: Tensor) -> None:
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, expected {like.device} like logits")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _row_blocks(n: int, c: int) -> Tuple[int, int]:
    bc = min(triton.next_power_of_2(c), _MAX_COLS)
    return max(1, min(_TILE // bc, triton.next_power_of_2(max(n, 1)))), bc


def _flat_block(n: int) -> int:
    return min(_FLAT_BLOCK, triton.next_power_of_2(max(n, 1)))


def _scalars(device: torch.device) -> Tuple[Tensor, Tensor]:
    return torch.empty((), dtype=_F32, device=device), torch.empty((), dtype=_F32, device=device)


def _select(src: Tensor, big: int, alpha_bits: int, keys: bool, value: Tensor, var: Tensor, loss_launch,
            grad_launch, programs: int) -> None:
    """Runs the loss kernel (``loss_launch(hist)``; hist None on the small path), the selection of t over the
    ``big`` keys (``keys``) or losses of ``src``, and the gradient kernel (``grad_launch(state, partials,
    large)``, over ``programs`` programs: one partial sum each on the large path)."""
    dev = src.device
    state = torch.empty(_STATE_WORDS, dtype=torch.int64, device=dev)
    if big <= SMALL_N:
        loss_launch(None)
        block = max(triton.next_power_of_2(max(big, 1)), _MIN_SELECT_BLOCK)
        _select_small_kernel[(1,)](src, big, alpha_bits, state, value, var, BLOCK=block, KEYS=keys,
                                   num_warps=NUM_WARPS)
        grad_launch(state, None, False)
        return
    hist = torch.empty(_HIST_WORDS, dtype=torch.int32, device=dev)
    loss_launch(hist)
    block = _flat_block(big)
    grid = (min(triton.cdiv(big, block), _RADIX_PROGRAMS),)
    for p in range(4):
        _radix_kernel[grid](src, hist, big, alpha_bits, PASS=p, BLOCK=block, KEYS=keys, num_warps=NUM_WARPS)
    _resolve_kernel[(1,)](hist, alpha_bits, state, num_warps=4)
    partials = torch.empty(programs, dtype=_F64, device=dev)
    grad_launch(state, partials, True)
    _finalize_kernel[(1,)](state, partials, programs, value, var, R=min(1024, triton.next_power_of_2(programs)),
                           num_warps=4)


# ---------------------------------------------------------------------------------------------- ops

@torch.no_grad()
def cvar_select(losses: Tensor, alpha: float) -> Tuple[Tensor, Tensor, Tensor]:
    alpha_bits = _alpha_bits(alpha)
    _float_input("losses", losses, 1)
    n = losses.numel()
    value, var = _scalars(losses.device)
    weights = torch.empty_like(losses)
    block = _flat_block(n)

    def zero(hist):
        if hist is not None:
            _zero_kernel[(1,)](hist, num_warps=1)

    def write_weights(state, partials, large):
        if n:
            _select_weights_kernel[(triton.cdiv(n, block),)](losses, weights, state, partials, n, BLOCK=block,
                                                            LARGE=large, num_warps=NUM_WARPS)

    with _guard(losses.device):
        _select(losses, n, alpha_bits, False, value, var, zero, write_weights, triton.cdiv(n, block))
    return value, var, weights


@torch.no_grad()
def cvar_cross_entropy(logits: Tensor, target: Tensor, alpha: float, ignore_index: int,
                       label_smoothing: float) -> Tuple[Tensor, Tensor, Tensor]:
    alpha_bits = _alpha_bits(alpha)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    _logits(logits)
    n, c = logits.shape
    if not isinstance(target, Tensor) or target.dtype != torch.int64:
        raise TypeError(f"target must be an int64 tensor of class indices, got {getattr(target, 'dtype', target)}")
    if target.shape != (n,):
        raise ValueError(f"target must have shape ({n},) like the rows of logits, got {tuple(target.shape)}")
    _same_device("target", target, logits)
    dev = logits.device
    value, var = _scalars(dev)
    grad = torch.empty_like(logits)
    keys = torch.empty(n, dtype=torch.int32, device=dev)
    lse = torch.empty(n, dtype=_F32, device=dev)
    br, bc = _row_blocks(n, c)
    programs = triton.cdiv(n, br)
    s = float(label_smoothing)
    ii = int(ignore_index)

    def losses(hist):
        if n:
            _ce_loss_kernel[(programs,)](logits, target, keys, lse, hist, n, c, ii, s, 1.0 - s, BLOCK_R=br,
                                         BLOCK_C=bc, SMOOTH=s != 0, ZERO=hist is not None, num_warps=NUM_WARPS)

    def grads(state, partials, large):
        if n:
            _ce_grad_kernel[(programs,)](logits, target, keys, lse, grad, state, partials, n, c, s / c, s - 1.0,
                                         BLOCK_R=br, BLOCK_C=bc, LARGE=large, num_warps=NUM_WARPS)

    with _guard(dev):
        _select(keys, n, alpha_bits, True, value, var, losses, grads, programs)
    return value, var, grad


@torch.no_grad()
def cvar_bce_with_logits(logits: Tensor, target: Tensor, pos_weight: Optional[Tensor], alpha: float,
                         per_sample: bool, ignore_index: float) -> Tuple[Tensor, Tensor, Tensor]:
    alpha_bits = _alpha_bits(alpha)
    _logits(logits)
    n, labels = logits.shape
    if not isinstance(target, Tensor) or target.dtype != logits.dtype:
        raise TypeError(f"target must be a {logits.dtype} tensor like logits, got {getattr(target, 'dtype', target)}")
    if target.shape != logits.shape:
        raise ValueError(f"target must have the shape of logits {tuple(logits.shape)}, got {tuple(target.shape)}")
    _same_device("target", target, logits)
    if pos_weight is not None:
        if not isinstance(pos_weight, Tensor) or pos_weight.dtype != _F32:
            raise TypeError(f"pos_weight must be None or a float32 tensor, got "
                            f"{getattr(pos_weight, 'dtype', type(pos_weight).__name__)}")
        if pos_weight.shape != (labels,):
            raise ValueError(f"pos_weight must have shape ({labels},), got {tuple(pos_weight.shape)}")
        _same_device("pos_weight", pos_weight, logits)
    dev = logits.device
    per_sample = bool(per_sample)
    value, var = _scalars(dev)
    grad = torch.empty_like(logits)
    big = n if per_sample else n * labels
    keys = torch.empty(big, dtype=torch.int32, device=dev)
    count = torch.empty(n, dtype=_F32, device=dev) if per_sample else None
    br, bc = _row_blocks(n, labels)
    programs = triton.cdiv(n, br)
    # torch compares the target with ignore_index rounded to the target's dtype (a host tensor: no sync)
    ign = float(torch.tensor(float(ignore_index), dtype=_F64).to(logits.dtype))
    flags = dict(BLOCK_R=br, BLOCK_C=bc, PW=pos_weight is not None, PER_SAMPLE=per_sample, num_warps=NUM_WARPS)

    def losses(hist):
        if n:
            _bce_loss_kernel[(programs,)](logits, target, pos_weight, keys, count, hist, n, labels, ign,
                                          ZERO=hist is not None, **flags)

    def grads(state, partials, large):
        if n:
            _bce_grad_kernel[(programs,)](logits, target, pos_weight, keys, count, grad, state, partials, n, labels,
                                          ign, LARGE=large, **flags)

    with _guard(dev):
        _select(keys, big, alpha_bits, True, value, var, losses, grads, programs)
    return value, var, grad
