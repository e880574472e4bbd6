"""GSAM (Zhuang et al., ICLR 2022): SAM that also lowers the surrogate gap, by stepping against the part of
the first-pass grad orthogonal to the SAM grad."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

import fastsam.ops as ops
from fastsam.optim import _buckets, _sharding
from fastsam.optim._buckets import take, with_grad
from fastsam.optim.sam import SAM, Combination, _check_nonneg, _check_number

# The authors' perturb_eps, in the perturbation's norm (SAM's own), the cosine and the projection.
_EPS = 1e-12
# Positions in the accumulator of the decomposition's sums.
_DOT, _SQ_G0, _SQ_G1 = 0, 1, 2


def _host_lr(lr):
    if isinstance(lr, Tensor):
        raise TypeError("GSAM with rho_min follows the lr on the host: the lr must be a float, not a tensor")
    return lr


class GSAM(SAM):
    r"""Surrogate gap guided SAM.

    With :math:`g_0` the grad at :math:`w` and :math:`g_1` the grad at :math:`w + e`:

    .. math::
        e = \rho_t \frac{T^2 g_0}{\lVert T g_0 \rVert_2 + 10^{-12}} \qquad
        \cos = \frac{\langle g_0, g_1 \rangle}{\lVert g_1 \rVert \lVert g_0 \rVert + 10^{-12}} \qquad
        g_\perp = g_0 - \cos \lVert g_0 \rVert \frac{g_1}{\lVert g_1 \rVert + 10^{-12}}

    and the base optimizer steps from :math:`w` with :math:`g_1 - \alpha\, g_\perp`. :math:`T = I`, or
    :math:`|w|` with ``adaptive=True`` (in the perturbation only: the decomposition uses plain norms, as the
    authors' code does). All norms and the inner product are global over the parameters that have a grad in
    the second pass. ``rho_min=None`` keeps :math:`\rho_t = \rho`; otherwise :math:`\rho_t` follows each
    group's current lr linearly, as the authors' ProportionScheduler does:
    :math:`\rho_t = \rho_{min} + (\rho - \rho_{min}) (lr - lr_{min}) / (lr_0 - lr_{min})` with :math:`lr_0` the
    group's initial lr (its ``"initial_lr"``, which LR schedulers keep too), evaluated at each first step.

    The first pass's grad is copied in the perturbation's pass; the sums of the decomposition take one
    reduction over :math:`g_0, g_1` and one over :math:`g_0`, and the combination is formed inside the fused
    restore + SGD/Adam/AdamW step from coefficients kept on the device (no host sync). w is restored from
    its backup (the authors subtract e: equal to rounding).

    Args:
        params, base_optimizer, impl, nonfinite, **base_kwargs: as for :class:`fastsam.SAM`.
        rho: radius (default 0.05). alpha: weight of the orthogonal component (default 0.4, the authors'
            example; one value for all groups). rho_min: None for a constant radius, else the radius at
            ``lr_min`` (at most rho). lr_min: the lr at which the radius is rho_min (default 0; below each
            group's initial lr). adaptive: :math:`T = |w|`. rho, rho_min, lr_min and adaptive are
            param-group options.

    Example::

        opt = fastsam.GSAM(model.parameters(), torch.optim.SGD, rho=0.05, alpha=0.4, rho_min=0.01, lr=0.1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
        for x, y in data:
            def closure():
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss
            opt.step(closure)  # or the explicit loop of fastsam.SAM
            opt.zero_grad()
            sched.step()
    """

    _p2_only = True
    _update_uses_g0 = True  # the first pass's grad enters the update
    _buffers = ("grad0",)

    def __init__(self, params, base_optimizer, rho: float = 0.05, alpha: float = 0.4,
                 rho_min: Optional[float] = None, lr_min: float = 0.0, adaptive: bool = False,
                 impl: str = "auto", nonfinite: Optional[str] = None, **base_kwargs):
        self.alpha = _check_number("alpha", alpha)
        self._sums: Dict[_sharding.Scope, Tensor] = {}
        self._coef: Dict[torch.device, Tensor] = {}
        defaults = dict(rho=_check_nonneg("rho", rho), rho_min=rho_min, lr_min=lr_min, adaptive=bool(adaptive),
                        p=2.0, perturb=True)
        self._init_sam(params, base_optimizer, impl, defaults, base_kwargs, nonfinite)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        rho_min = group["rho_min"]
        if rho_min is None:
            return
        if _check_nonneg("rho_min", rho_min) > group["rho"]:
            raise ValueError(f"rho_min must be at most rho ({group['rho']}), got {rho_min}")
        lr0 = _host_lr(group.setdefault("initial_lr", group["lr"]))
        _host_lr(group["lr"])
        if not _check_number("lr_min", group["lr_min"]) < lr0:
            raise ValueError(f"lr_min must be below the group's initial lr ({lr0}) when rho_min is set, "
                             f"got {group['lr_min']}")

    def _radius(self, group: dict) -> float:
        rho_min = group["rho_min"]
        if rho_min is None:
            return group["rho"]
        lr, lr_min = _host_lr(group["lr"]), group["lr_min"]
        return rho_min + (group["rho"] - rho_min) * (lr - lr_min) / (group["initial_lr"] - lr_min)

    def _combination(self, buckets: List[_buckets.Bucket], inv=None, fused: bool = True) -> Combination:
        # g1 - alpha g_perp = (1 + alpha cos ||g0|| / (||g1|| + eps)) g1 - alpha g0: coef (c, -alpha, 0), g_b = g0.
        sums = _sharding.zeroed(self._sums, {b.scope for b in buckets}, 3)
        for b in buckets:
            grads = b.grads()
            # A parameter without a grad in this pass takes no step: the authors leave it out of the sums too.
            idx = with_grad(grads)
            g0, acc = take(b.buffers["grad0"], idx), sums[b.scope]
            ops.dot_norm_sq_(acc=acc[_DOT:_SQ_G1], a=take(grads, idx), b=g0, impl=b.impl)
            ops.norm_sq_(acc=acc[_SQ_G1:], grads=take(grads, idx), params=take(b.params, idx), row_scales=[],
                         mode=ops.MODE_IDENTITY, eta=0.0, amp=None if inv is None else ops.AmpArgs(inv[b.scope.device]),
                         impl=b.impl)
        totals = _sharding.global_sums(sums)
        coefs = _sharding.zeroed(self._coef, totals, 3)  # written in place: no allocation per step
        for d, acc in totals.items():
            dot, g0_sq, g1_sq = acc[_DOT], acc[_SQ_G0], acc[_SQ_G1]
            if inv is not None:  # g1 is still loss-scaled in the dot product (the kernels unscale it later)
                dot = dot * inv[d].reshape(())
            n0, n1 = g0_sq.sqrt(), g1_sq.sqrt()
            cos = dot / (n1 * n0 + _EPS)
            coef = coefs[d]
            coef[0] = 1 + self.alpha * cos * n0 / (n1 + _EPS)
            coef[1] = -self.alpha
        return (lambda b: (b.buffers["grad0"], [])), self._coef
