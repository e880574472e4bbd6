"""Pure-torch reference of every fused op: the ground truth of the tests and the last fallback.

Contract shared by every implementation (reference, cpu, cuda, triton):

* All ops are in place and return ``None``. Every tensor list holds tensors of one device and
  one dtype (the "param dtype": fp32, bf16 or fp16); ``acc``, ``norm_sq`` and ``row_scales`` are fp32.
* Math is done in fp32 whatever the param dtype, with one rounding to the param dtype at each store.
  This reference also takes fp64 tensors (the compiled kernels do not), and computes them in fp64;
  the optimizers hand it complex parameters as real views (``torch.view_as_real``).
* Reductions accumulate in fp32. The order of accumulation is free, so implementations agree with
  this reference to rounding, not bit for bit.
* The normalization operator ``T`` of (A)SAM is selected by ``mode``:

  ``MODE_IDENTITY`` (0)
      ``T = 1``; ``params`` is only read where the op itself needs it.
  ``MODE_ABS`` (1)
      ``T = |w| + eta`` element-wise (ASAM element-wise; davda54's adaptive SAM uses ``eta = 0``).
  ``MODE_ROW`` (2)
      ``T[i] = row_scales[j][i // inner]`` with ``inner = numel / size(0)``: one scale per output
      filter, precomputed by :func:`row_norm_` as ``||w[r]||_2 + eta`` (ASAM filter-wise).

  ``row_scales`` is an empty list unless ``mode == MODE_ROW``.
* The direction of the SAM perturbation is the grad ``g``, or, when an ``ema`` list is given (Friendly
  SAM), ``d = g - sigma * m`` with ``m`` the EMA of past grads; ``sigma == 0`` means ``d = g`` exactly.
  :func:`perturb_` then updates ``m <- lmbda * m + (1 - lmbda) * g`` after reading it; ``lmbda == 0``
  means ``m <- g`` exactly, which makes ``ema`` a copy of the grads (CR-SAM and orthogonal SAM keep
  the first-pass grad this way, in the same pass over memory).
* The fused updates take the grad as a combination ``coef[0] g + coef[1] g_b + coef[2] g_c`` when
  ``coef`` (fp32, shape ``[3]``, on the device: no host sync) is given; an empty ``grads_b`` or
  ``grads_c`` list drops its term. An empty ``backups`` list means there is nothing to restore (a
  param group that was not perturbed): the update starts from the current ``w``.
* Loss scaling (torch.amp.GradScaler) and skipped steps, without a host sync. ``inv_scale`` and
  ``found_inf`` are None or fp32 one-element tensors on the device of the tensors:

  ``inv_scale``
      The op's ``grads`` list holds loss-scaled grads: every read of it is ``g.float() * inv_scale``
      (one fp32 multiply, before any other use), also where the op stores the grad (the EMA and its
      ``lmbda == 0`` copy, :func:`reflect_`'s copies). Kept grads (``grads_b``, ``grads_c``, ``ema``,
      ``dirs``) are not rescaled: they were stored unscaled. Without it the grads are read as they are.
  ``found_inf``
      Nonzero: a non-finite grad was found somewhere in the step, which is skipped. The op then only
      keeps ``w`` where the step began: :func:`perturb_` writes the backups and leaves ``w`` and the EMA
      as they are; :func:`reflect_` and the fused updates set ``w`` to the backup (the updates write
      nothing else: momentum and moments keep their values).
"""
from __future__ import annotations

import math
from typing import List

import torch
from torch import Tensor

from fastsam.ops import list_checks

MODE_IDENTITY = 0
MODE_ABS = 1
MODE_ROW = 2


def _t_operator(w32: Tensor, row_scale: Tensor | None, mode: int, eta: float) -> Tensor | float:
    """T for one tensor, in fp32 and in the shape of ``w32`` (or the scalar 1.0 for identity)."""
    if mode == MODE_IDENTITY:
        return 1.0
    if mode == MODE_ABS:
        return w32.abs() + eta
    if mode == MODE_ROW:
        inner = w32.numel() // max(w32.shape[0], 1) if w32.dim() > 0 else 1
        return row_scale.repeat_interleave(inner).view_as(w32)
    raise ValueError(f"mode must be 0 (identity), 1 (abs) or 2 (row), got {mode}")


def _row(row_scales: List[Tensor], j: int, mode: int) -> Tensor | None:
    return row_scales[j] if mode == MODE_ROW else None


def upcast(t: Tensor) -> Tensor:
    """``t`` in the compute dtype: fp32 for fp16/bf16, ``t`` itself for fp32 and fp64 (fp64 parameters, which
    only this implementation takes, keep their precision)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _grad(g: Tensor, inv_scale: Tensor | None) -> Tensor:
    """The grad in fp32, unscaled when ``inv_scale`` is given (may be ``g`` itself: not to be modified)."""
    return upcast(g) if inv_scale is None else upcast(g) * inv_scale.reshape(())


def _skip(found_inf: Tensor | None) -> Tensor | None:
    """A 0-dim bool tensor, True when the step is skipped (no host read: used with torch.where)."""
    return None if found_inf is None else found_inf.reshape(()) != 0


def _keep_if(skip: Tensor | None, old: Tensor, new: Tensor) -> Tensor:
    """``old`` where the step is skipped, else ``new``."""
    return new if skip is None else torch.where(skip, old, new)


def _direction(g32: Tensor, ema: List[Tensor], j: int, sigma: float) -> Tensor:
    """``g - sigma * m_j`` in fp32 (``g`` itself without an EMA or with ``sigma == 0``)."""
    if not ema or sigma == 0:
        return g32
    return g32 - sigma * upcast(ema[j])


def _grad_combination(grads: List[Tensor], grads_b: List[Tensor], grads_c: List[Tensor],
                      coef: Tensor | None, j: int, inv_scale: Tensor | None) -> Tensor:
    """The grad a fused update uses for tensor j, in fp32 (may be ``grads[j]`` itself: not to be modified)."""
    g32 = _grad(grads[j], inv_scale)
    if coef is None:
        return g32
    g32 = g32 * coef[0]
    if grads_b:
        g32.add_(upcast(grads_b[j]) * coef[1])
    if grads_c:
        g32.add_(upcast(grads_c[j]) * coef[2])
    return g32


@torch.no_grad()
def norm_sq_(
    acc: Tensor,
    grads: List[Tensor],
    params: List[Tensor],
    row_scales: List[Tensor],
    mode: int,
    eta: float,
    ema: List[Tensor],
    sigma: float,
    inv_scale: Tensor | None = None,
) -> None:
    """``acc += sum_j ||T_j d_j||_2^2`` with the direction ``d = g - sigma * ema`` (``g`` without ``ema``).

    acc: fp32, shape ``[1]``, on the device of the tensors. grads/params/ema: matching shapes.
    A non-finite grad makes ``acc`` non-finite (the optimizers' found_inf of the pass at w).
    """
    list_checks.norm_sq_(grads, params, row_scales, mode, ema)
    total = torch.zeros((), dtype=torch.float32, device=acc.device)
    for j, g in enumerate(grads):
        d = _direction(_grad(g, inv_scale), ema, j, sigma)
        if mode == MODE_IDENTITY:
            tg2 = d.square()
        else:
            tg2 = _t_operator(upcast(params[j]), _row(row_scales, j, mode), mode, eta).mul_(d).square_()
        total += tg2.sum()  # torch's cascade sum: accurate in fp32 (a norm, then squared, is not)
    acc.add_(total)


@torch.no_grad()
def row_norm_(out: List[Tensor], params: List[Tensor], eta: float) -> None:
    """``out[j][r] = ||params[j][r]||_2 + eta`` for every output filter r (slice along dim 0).

    out[j]: fp32, shape ``[params[j].shape[0]]``.
    """
    list_checks.row_norm_(out, params)
    for o, w in zip(out, params):
        o.copy_(upcast(w).reshape(w.shape[0], -1).norm(dim=1) + eta)


@torch.no_grad()
def perturb_(
    params: List[Tensor],
    grads: List[Tensor],
    backups: List[Tensor],
    row_scales: List[Tensor],
    norm_sq: Tensor,
    rho: float,
    eps: float,
    mode: int,
    eta: float,
    sign: bool,
    ema: List[Tensor],
    sigma: float,
    lmbda: float,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """Back up ``w`` and move it to the SAM point ``w + e``; update the EMA of the grads.

    ``backups[j] <- w_j`` (exact copy), then, with T evaluated at the old w and the direction
    ``d = g - sigma * m`` (``g`` when ``ema`` is empty or ``sigma == 0``):

    * ``sign=False`` (p = 2): ``e = rho / (sqrt(norm_sq) + eps) * T^2 d``
    * ``sign=True``  (p = inf): ``e = rho * T * sign(d)``  (``norm_sq`` is not read)

    and, when ``ema`` is given, ``m <- lmbda * m + (1 - lmbda) * g`` (``m <- g`` when ``lmbda == 0``).

    norm_sq: fp32 shape ``[1]``, the global ``sum ||T d||^2`` from :func:`norm_sq_`.
    ema: empty, or tensors like ``params``.
    inv_scale, found_inf: see the module docstring (skipped: backups written, ``w`` and ``ema`` kept).
    """
    list_checks.perturb_(params, grads, backups, row_scales, mode, ema)
    scale = rho / (norm_sq[0].sqrt() + eps)  # 0-dim, so that 0-dim parameters keep their shape
    skip = _skip(found_inf)
    for j, (w, g, b) in enumerate(zip(params, grads, backups)):
        b.copy_(w)
        w32 = upcast(w)  # fp32 params: w itself, updated in place below (the backup keeps the old w)
        t = _t_operator(w32, _row(row_scales, j, mode), mode, eta)
        g_raw = _grad(g, inv_scale)
        g32 = _direction(g_raw, ema, j, sigma)
        if ema:
            m = ema[j]
            new_m = (g if inv_scale is None else g_raw) if lmbda == 0 else upcast(m) * lmbda + g_raw * (1 - lmbda)
            m.copy_(_keep_if(skip, m, new_m.to(m.dtype)))
        if sign:
            e = torch.sign(g32).mul_(rho)
            w32.add_(e if mode == MODE_IDENTITY else e.mul_(t))
        elif mode == MODE_IDENTITY:
            w32.addcmul_(g32, scale)
        else:
            w32.add_((t * t).mul_(scale).mul_(g32))
        w.copy_(_keep_if(skip, b, w32.to(w.dtype)))


@torch.no_grad()
def reflect_(
    params: List[Tensor],
    backups: List[Tensor],
    dirs: List[Tensor],
    norm_sq: Tensor,
    rho: float,
    eps: float,
    grads: List[Tensor],
    grad_copies: List[Tensor],
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """Move to the opposite SAM point, from the backup: ``w <- backup - rho / (sqrt(norm_sq) + eps) * dir``
    (CR-SAM's ``w - e``), and, when ``grad_copies`` is given, ``grad_copies[j] <- grads[j]`` exactly.

    dirs: the direction the first step used (T = 1). norm_sq: fp32 shape ``[1]``, its squared norm.
    grads, grad_copies: both empty, or tensors like ``params``.
    inv_scale, found_inf: see the module docstring (skipped: ``w <- backup``; the copies are still made).
    """
    list_checks.reflect_(params, backups, dirs, grads, grad_copies)
    scale = rho / (norm_sq[0].sqrt() + eps)
    skip = _skip(found_inf)
    for j, (w, b, d) in enumerate(zip(params, backups, dirs)):
        w.copy_(_keep_if(skip, b, (upcast(b) - scale * upcast(d)).to(w.dtype)))
        if grad_copies:
            grad_copies[j].copy_(grads[j] if inv_scale is None else _grad(grads[j], inv_scale))


@torch.no_grad()
def dot_norm_sq_(acc: Tensor, a: List[Tensor], b: List[Tensor]) -> None:
    """``acc[0] += sum_j <a_j, b_j>`` and ``acc[1] += sum_j ||b_j||^2`` (acc: fp32, shape ``[2]``)."""
    list_checks.dot_norm_sq_(a, b)
    dot = torch.zeros((), dtype=torch.float32, device=acc.device)
    sq = torch.zeros((), dtype=torch.float32, device=acc.device)
    for x, y in zip(a, b):
        y32 = upcast(y)
        dot += (upcast(x) * y32).sum()
        sq += y32.square().sum()
    acc[0] += dot
    acc[1] += sq


@torch.no_grad()
def restore_(params: List[Tensor], backups: List[Tensor]) -> None:
    """``params[j] <- backups[j]``, bit-exactly."""
    list_checks.restore_(params, backups)
    for w, b in zip(params, backups):
        w.copy_(b)


@torch.no_grad()
def restore_sgd_(
    params: List[Tensor],
    grads: List[Tensor],
    backups: List[Tensor],
    momentum_buffers: List[Tensor],
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    init_momentum: bool,
    grads_b: List[Tensor],
    grads_c: List[Tensor],
    coef: Tensor | None,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """Restore ``w`` from the backup, then one ``torch.optim.SGD`` step with the given grads.

    ``momentum_buffers`` is empty when ``momentum == 0``. ``init_momentum=True`` means the buffers
    hold garbage and are set to ``d_p`` (torch's first step: ``buf = clone(d_p)``). ``backups`` empty:
    no restore. ``coef`` given: the grad is ``coef[0] g + coef[1] g_b + coef[2] g_c``.
    inv_scale, found_inf: see the module docstring (skipped: only the restore).
    """
    list_checks.restore_sgd_(params, grads, backups, momentum_buffers, momentum, grads_b, grads_c, coef)
    skip = _skip(found_inf)
    for j, w in enumerate(params):
        if backups:
            w.copy_(backups[j])
        w32 = upcast(w)
        d_p = _grad_combination(grads, grads_b, grads_c, coef, j, inv_scale)
        if maximize:
            d_p = -d_p
        if weight_decay != 0:
            d_p = d_p.add(w32, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[j]
            if init_momentum:
                buf32 = d_p.clone()
            else:
                buf32 = upcast(buf).mul(momentum).add_(d_p, alpha=1 - dampening)
            buf.copy_(_keep_if(skip, buf, buf32.to(buf.dtype)))
            d_p = d_p.add(buf32, alpha=momentum) if nesterov else buf32
        w.copy_(_keep_if(skip, w, w32.add(d_p, alpha=-lr).to(w.dtype)))


@torch.no_grad()
def restore_adam_(
    params: List[Tensor],
    grads: List[Tensor],
    backups: List[Tensor],
    exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    decoupled: bool,
    maximize: bool,
    step: float,
    grads_b: List[Tensor],
    grads_c: List[Tensor],
    coef: Tensor | None,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    steps: List[Tensor] | None = None,
) -> None:
    """Restore ``w`` from the backup, then one ``torch.optim.Adam`` (``decoupled=False``) or
    ``AdamW`` (``decoupled=True``) step, amsgrad off. ``step`` is the step count after increment
    (1 at the first step). ``backups``, ``grads_b``, ``grads_c``, ``coef``, ``inv_scale`` and
    ``found_inf``: as for :func:`restore_sgd_`.

    steps: empty, or one fp32 one-element tensor per parameter on its device (torch's capturable
    layout), holding that parameter's step count after increment: then ``step`` is ignored and the
    bias corrections of tensor j come from ``steps[j]``, read on the device (in fp64 math, as the
    float path does on the host). The op does not change ``steps``.
    """
    list_checks.restore_adam_(params, grads, backups, exp_avgs, exp_avg_sqs, steps or [], grads_b, grads_c, coef)
    skip = _skip(found_inf)
    for j, w in enumerate(params):
        if steps:
            s = steps[j].reshape(()).double()  # the host's float math, on the device
            step_size = (lr / (1 - beta1**s)).float()
            bias_correction2_sqrt = (1 - beta2**s).sqrt().float()
        else:
            step_size = lr / (1 - beta1**step)
            bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        if backups:
            w.copy_(backups[j])
        w32 = upcast(w)
        g32 = _grad_combination(grads, grads_b, grads_c, coef, j, inv_scale)
        if maximize:
            g32 = -g32
        if weight_decay != 0:
            if decoupled:
                w32 = w32.mul(1 - lr * weight_decay)
            else:
                g32 = g32.add(w32, alpha=weight_decay)
        m, v = exp_avgs[j], exp_avg_sqs[j]
        m32 = upcast(m).lerp(g32, 1 - beta1)
        v32 = upcast(v).mul(beta2).addcmul_(g32, g32, value=1 - beta2)
        m.copy_(_keep_if(skip, m, m32.to(m.dtype)))
        v.copy_(_keep_if(skip, v, v32.to(v.dtype)))
        denom = (v32.sqrt() / bias_correction2_sqrt).add_(eps)
        if steps:
            new_w = w32 + m32 * -step_size / denom  # addcdiv's order: (value * m) / denom
        else:
            new_w = w32.addcdiv(m32, denom, value=-step_size)
        w.copy_(_keep_if(skip, w, new_w.to(w.dtype)))
