"""LookSAM (Liu et al., CVPR 2022, Algorithm 1): a SAM step every k steps, whose sharpness direction the steps
between reuse at the cost of one pass."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

import fastsam.ops as ops
from fastsam.optim import _buckets, _gate, _sharding
from fastsam.optim._buckets import take, with_grad
from fastsam.optim.sam import SAM, Combination, _check_nonneg, _check_number

_EPS = 1e-12  # in the projection's ||g||^2
# Positions in the accumulator of a step's sums: <g_s, g> and ||g||^2 (a SAM step), ||g||^2 (a step between).
_DOT, _SQ_G = 0, 1


class LookSAM(SAM):
    r"""LookSAM: SAM on every k-th step, its orthogonal direction reused in between.

    On steps ``t`` with ``t % k == 0`` (the first included) a SAM step: :math:`g` at :math:`w`,
    :math:`e = \rho\, T^2 g / (\lVert T g \rVert + 10^{-12})`, :math:`g_s` at :math:`w + e`, the base step with
    :math:`g_s`, and the kept direction

    .. math::
        g_v = g_s - \lVert g_s \rVert \cos(g, g_s) \frac{g}{\lVert g \rVert}
            = g_s - \frac{\langle g, g_s \rangle}{\lVert g \rVert^2 + 10^{-12}}\, g

    On the other steps one pass gives :math:`g` at :math:`w` and the base step takes
    :math:`g + \alpha\, (\lVert g \rVert / \lVert g_v \rVert)\, g_v` (:math:`g` alone while no :math:`g_v` was
    kept). Norms and the inner product are global over all parameters; :math:`T = I`, or :math:`|w|` with
    ``adaptive=True`` (in the perturbation only). ``step(closure)`` runs two passes on SAM steps and one on the
    others (``sharpness_active`` tells an explicit loop which): 100 + 100 / k passes per 100 steps.

    :math:`g_v` is written by the restore + SGD op used as a skip-aware axpy (its momentum buffer, set to
    :math:`d_p` at an "initial" step, is :math:`g_v`; lr 0 leaves the op's parameter list, g's copy, as it was):
    a step skipped on the device keeps the old :math:`g_v`. It is saved by ``state_dict``; :math:`\lVert g_v
    \rVert^2` is summed once per SAM step, and the steps between form their grad inside the fused update from
    coefficients on the device.

    Args:
        params, base_optimizer, impl, nonfinite, **base_kwargs: as for :class:`fastsam.SAM`.
        rho: radius (default 0.05). k: SAM on every k-th step (default 5; the method's ``interval``). alpha: the
            weight of the reused direction (default 0.7). adaptive: :math:`T = |w|`. rho and adaptive are
            param-group options.
    """

    _p2_only = True
    _update_uses_g0 = True  # the first pass's grad enters the update
    _buffers = ("grad0", "grad_v")
    _saved_buffers = ("grad_v",)
    _one_pass_combines = True

    def __init__(self, params, base_optimizer, rho: float = 0.05, k: int = 5, alpha: float = 0.7,
                 adaptive: bool = False, impl: str = "auto", nonfinite: Optional[str] = None, **base_kwargs):
        if "interval" in base_kwargs:
            raise TypeError("LookSAM takes k, its SAM steps' interval, not interval")
        self.alpha = _check_number("alpha", alpha)
        self._sums: Dict[_sharding.Scope, Tensor] = {}
        self._sums_v: Dict[_sharding.Scope, Tensor] = {}
        self._sq_v: Dict[torch.device, Tensor] = {}  # ||g_v||^2 of the kept g_v (summed again after a load)
        self._coef: Dict[torch.device, Tensor] = {}
        self._projection: Dict[torch.device, Tensor] = {}
        defaults = dict(rho=_check_nonneg("rho", rho), adaptive=bool(adaptive), p=2.0, perturb=True)
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k must be an int >= 1, got {k!r}")
        if k < 1:
            raise ValueError(f"k must be an int >= 1, got {k}")
        self._init_sam(params, base_optimizer, impl, defaults, base_kwargs, nonfinite, interval=k)

    @property
    def k(self) -> int:
        return self.interval

    def _combination(self, buckets: List[_buckets.Bucket], inv=None, fused: bool = True) -> Optional[Combination]:
        if self.sharpness_active:
            return None  # the SAM step steps with g_s; _after_update keeps g_v
        # g + alpha (||g|| / ||g_v||) g_v: coef (1, c, 0), g_b = g_v, c = 0 while ||g_v|| = 0.
        if not self._sq_v:
            self._sq_v = self._kept_norm_sq(buckets)
        sums = _sharding.zeroed(self._sums, {b.scope for b in buckets}, 2)
        for b in buckets:
            grads = b.grads()
            idx = with_grad(grads)
            ops.norm_sq_(acc=sums[b.scope][_SQ_G:], grads=take(grads, idx), params=take(b.params, idx),
                         row_scales=[], mode=ops.MODE_IDENTITY, eta=0.0,
                         amp=None if inv is None else ops.AmpArgs(inv[b.scope.device]), impl=b.impl)
        totals = _sharding.global_sums(sums)
        coefs = _sharding.zeroed(self._coef, totals, 3)  # written in place: no allocation per step
        for d, acc in totals.items():
            coef, sq_v = coefs[d], self._sq_v[d]
            ratio = acc[_SQ_G].sqrt() / sq_v.sqrt()
            coef[0] = 1.0
            coef[1] = torch.where(sq_v > 0, self.alpha * ratio, torch.zeros_like(ratio))  # 0 before any g_v
        return (lambda b: (b.buffers["grad_v"], [])), self._coef

    def _kept_norm_sq(self, buckets: List[_buckets.Bucket]) -> Dict[torch.device, Tensor]:
        """||g_v||^2 of the kept g_v, by device (0-dim): summed once per SAM step, and after a load."""
        sums = _sharding.zeroed(self._sums_v, {b.scope for b in buckets}, 1)
        for b in buckets:
            ops.norm_sq_(acc=sums[b.scope], grads=b.buffers["grad_v"], params=b.params, row_scales=[],
                         mode=ops.MODE_IDENTITY, eta=0.0, impl=b.impl)
        return {d: acc[0].clone() for d, acc in _sharding.global_sums(sums).items()}

    def _after_update(self, buckets: List[_buckets.Bucket], gate: Optional[_gate.Gate], fused: bool) -> None:
        # g_v = g_s - (<g_s, g> / (||g||^2 + eps)) g, g_s the grad of this pass (unscaled in the op), g kept.
        sums = _sharding.zeroed(self._sums, {b.scope for b in buckets}, 2)
        taken = []  # per bucket: the grads of this pass, and which tensors have one
        for b in buckets:
            grads = b.grads()
            idx = with_grad(grads)
            taken.append((take(grads, idx), idx))
            ops.dot_norm_sq_(acc=sums[b.scope], a=taken[-1][0], b=take(b.buffers["grad0"], idx), impl=b.impl)
        inv = gate.inv if (gate is not None and fused) else None
        totals = _sharding.global_sums(sums)
        projection = _sharding.zeroed(self._projection, totals, 3)  # written in place: no allocation per step
        for d, acc in totals.items():
            dot = acc[_DOT] if inv is None else acc[_DOT] * inv[d].reshape(())
            projection[d][0] = 1.0
            projection[d][1] = -dot / (acc[_SQ_G] + _EPS)
        for b, (grads, idx) in zip(buckets, taken):
            d = b.params[0].device
            g0, gv = take(b.buffers["grad0"], idx), take(b.buffers["grad_v"], idx)
            amp = gate.on(d) if (gate is not None and fused) else None
            # The restore + SGD op as a skip-aware axpy: its momentum buffers (g_v) are set to d_p at an "initial"
            # step, d_p = g_s + coef[1] g; lr 0 leaves its parameters (g's copy) as they were; a skipped step
            # writes nothing.
            ops.restore_sgd_(params=g0, grads=grads, backups=[], momentum_buffers=gv, lr=0.0,
                             weight_decay=0.0, momentum=1.0, dampening=0.0, nesterov=False, maximize=False,
                             init_momentum=True, grad=ops.GradArgs(projection[d], g0), amp=amp, impl=b.impl)
        self._sq_v = self._kept_norm_sq(buckets)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._sq_v = {}  # summed again from the loaded g_v at the next step between
