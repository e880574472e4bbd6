"""The fused ops: one Python entry each, taking tensor lists of one device and dtype.

Each entry picks an implementation (``impl``: "auto", "cuda", "triton", "cpu" or "torch", see
:func:`fastsam.ops._dispatch.resolve_impl`) and runs it. The math of every op is specified in
:mod:`fastsam.ops.reference`; the other implementations agree with it to rounding.
"""
from __future__ import annotations

from typing import List, Optional

from torch import Tensor

from fastsam.ops._dispatch import backend, check_impl, resolve_impl
from fastsam.ops.reference import MODE_ABS, MODE_IDENTITY, MODE_ROW

__all__ = [
    "MODE_IDENTITY", "MODE_ABS", "MODE_ROW", "check_impl", "resolve_impl",
    "norm_sq_", "row_norm_", "perturb_", "reflect_", "dot_norm_sq_", "restore_", "restore_sgd_", "restore_adam_",
]


def _run(name: str, impl: str, first: List[Tensor], *args) -> None:
    if len(first) == 0:
        return
    getattr(backend(resolve_impl(impl, first[0].device)), name)(*args)


def norm_sq_(acc: Tensor, grads: List[Tensor], params: List[Tensor], row_scales: List[Tensor],
             mode: int, eta: float, ema: Optional[List[Tensor]] = None, sigma: float = 0.0,
             inv_scale: Optional[Tensor] = None, *, impl: str = "auto") -> None:
    """``acc += sum_j ||T_j d_j||^2`` (fp32 ``acc`` of shape [1]), ``d = g - sigma * ema`` (``g`` without
    ``ema``), with the grads unscaled by ``inv_scale`` when given; see reference.norm_sq_."""
    _run("norm_sq_", impl, grads, acc, grads, params, row_scales, mode, eta, ema or [], sigma, inv_scale)


def row_norm_(out: List[Tensor], params: List[Tensor], eta: float, *, impl: str = "auto") -> None:
    """``out[j][r] = ||params[j][r]||_2 + eta`` per output filter; see reference.row_norm_."""
    _run("row_norm_", impl, params, out, params, eta)


def perturb_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor], row_scales: List[Tensor],
             norm_sq: Tensor, rho: float, eps: float, mode: int, eta: float, sign: bool,
             ema: Optional[List[Tensor]] = None, sigma: float = 0.0, lmbda: float = 0.0,
             inv_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
             *, impl: str = "auto") -> None:
    """Back up w and move it to ``w + e`` along ``d = g - sigma * ema``; update the EMA
    ``ema <- lmbda * ema + (1 - lmbda) * g`` (with ``lmbda=0``: a copy of g). ``inv_scale`` unscales the
    grads; a nonzero ``found_inf`` leaves w and the EMA as they are; see reference.perturb_."""
    _run("perturb_", impl, params, params, grads, backups, row_scales, norm_sq, rho, eps, mode, eta, sign,
         ema or [], sigma, lmbda, inv_scale, found_inf)


def reflect_(params: List[Tensor], backups: List[Tensor], dirs: List[Tensor], norm_sq: Tensor, rho: float,
             eps: float, grads: Optional[List[Tensor]] = None, grad_copies: Optional[List[Tensor]] = None,
             inv_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
             *, impl: str = "auto") -> None:
    """``w <- backup - rho / (sqrt(norm_sq) + eps) * dir`` (CR-SAM's ``w - e``; ``w <- backup`` when
    ``found_inf`` is nonzero), and copy ``grads`` (unscaled by ``inv_scale``) into ``grad_copies`` in the
    same pass; see reference.reflect_."""
    _run("reflect_", impl, params, params, backups, dirs, norm_sq, rho, eps, grads or [], grad_copies or [],
         inv_scale, found_inf)


def dot_norm_sq_(acc: Tensor, a: List[Tensor], b: List[Tensor], *, impl: str = "auto") -> None:
    """``acc[0] += sum <a_j, b_j>``, ``acc[1] += sum ||b_j||^2`` (fp32 ``acc`` of shape [2])."""
    _run("dot_norm_sq_", impl, a, acc, a, b)


def restore_(params: List[Tensor], backups: List[Tensor], *, impl: str = "auto") -> None:
    """``params[j] <- backups[j]`` exactly."""
    _run("restore_", impl, params, params, backups)


def restore_sgd_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor],
                 momentum_buffers: List[Tensor], lr: float, weight_decay: float, momentum: float,
                 dampening: float, nesterov: bool, maximize: bool, init_momentum: bool,
                 grads_b: Optional[List[Tensor]] = None, grads_c: Optional[List[Tensor]] = None,
                 coef: Optional[Tensor] = None, inv_scale: Optional[Tensor] = None,
                 found_inf: Optional[Tensor] = None, *, impl: str = "auto") -> None:
    """Restore w (unless ``backups`` is empty), then one torch.optim.SGD step with the grad
    ``coef[0] g + coef[1] g_b + coef[2] g_c`` (``g`` without ``coef``; ``g`` unscaled by ``inv_scale``),
    unless ``found_inf`` is nonzero; see reference.restore_sgd_."""
    _run("restore_sgd_", impl, params, params, grads, backups, momentum_buffers, lr, weight_decay,
         momentum, dampening, nesterov, maximize, init_momentum, grads_b or [], grads_c or [], coef,
         inv_scale, found_inf)


def restore_adam_(params: List[Tensor], grads: List[Tensor], backups: List[Tensor], exp_avgs: List[Tensor],
                  exp_avg_sqs: List[Tensor], lr: float, beta1: float, beta2: float, weight_decay: float,
                  eps: float, decoupled: bool, maximize: bool, step: float,
                  grads_b: Optional[List[Tensor]] = None, grads_c: Optional[List[Tensor]] = None,
                  coef: Optional[Tensor] = None, inv_scale: Optional[Tensor] = None,
                  found_inf: Optional[Tensor] = None, steps: Optional[List[Tensor]] = None,
                  *, impl: str = "auto") -> None:
    """Restore w (unless ``backups`` is empty), then one torch.optim.Adam / AdamW step with the grad
    ``coef[0] g + coef[1] g_b + coef[2] g_c`` (``g`` unscaled by ``inv_scale``), unless ``found_inf`` is
    nonzero; the step counts are ``steps`` (device tensors) when given, else ``step``; see
    reference.restore_adam_."""
    _run("restore_adam_", impl, params, params, grads, backups, exp_avgs, exp_avg_sqs, lr, beta1, beta2,
         weight_decay, eps, decoupled, maximize, step, grads_b or [], grads_c or [], coef, inv_scale, found_inf,
         steps or [])
