"""WSAM (Yue et al., KDD 2023): sharpness as a weighted regularization term of the base step."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

import fastsam.ops as ops
from fastsam.optim import _buckets, _gate, _sharding
from fastsam.optim._buckets import take, with_grad
from fastsam.optim.sam import SAM, Combination, _check_bool, _check_nonneg, _check_number

# torch.nn.utils.clip_grad_norm_'s epsilon: the clip factor is max_norm / (norm + 1e-6), at most 1.
_CLIP_EPS = 1e-6
# Positions in a device's coefficient buffer: the update's grad combination (of g1, g0), the clip factors of g0
# and g1, and the decoupled term's combination (of g1, g0).
_UPDATE, _CLIP0, _CLIP1, _SHARP = slice(0, 3), 3, 4, slice(5, 8)


class WSAM(SAM):
    r"""Weighted SAM: sharpness as a regularizer whose weight is :math:`a = \gamma / (1 - \gamma)`.

    With :math:`g_0` the grad at :math:`w`, the perturbation is SAM's, :math:`e = \rho\, T^2 g_0 /
    (\lVert T g_0 \rVert + 10^{-12})`, and :math:`g_1` is the grad at :math:`w + e`. With ``max_norm``, each
    of :math:`g_0` and :math:`g_1` is then clipped to that global norm (``clip_grad_norm_``'s rule: a factor
    :math:`\min(1, \text{max\_norm} / (\lVert g \rVert + 10^{-6}))`; the perturbation uses the unclipped
    :math:`g_0`, as the authors' code does). Then, from :math:`w`:

    * ``decouple=False``: the base optimizer steps with :math:`a\, g_1 + (1 - a)\, g_0`;
    * ``decouple=True`` (default): the base optimizer steps with :math:`g_0`, and then
      :math:`w \leftarrow w - lr\, a\, (g_1 - g_0)` (the group's lr).

    The first pass's grad is copied in the perturbation's pass; the clip norms are fused reductions and the
    clip factors stay on the device; the combination is formed inside the fused restore + SGD/Adam/AdamW step,
    and the decoupled term is one more fused pass (the restore + SGD op with no restore, no momentum and the
    lr ``lr a``). w is restored from its backup (the authors subtract e: equal to rounding).

    Args:
        params, base_optimizer, impl, nonfinite, **base_kwargs: as for :class:`fastsam.SAM`.
        rho: radius (default 0.05). gamma: in [0, 1), the sharpness weight (default 0.9, so a = 9).
        decouple: the decoupled update (default True). max_norm: None (no clipping) or the global norm
            the grads are clipped to. adaptive: :math:`T = |w|`. gamma, decouple and max_norm hold for all
            groups; rho and adaptive are param-group options.
    """

    _p2_only = True
    _update_uses_g0 = True  # the first pass's grad enters the update
    _buffers = ("grad0",)

    def __init__(self, params, base_optimizer, rho: float = 0.05, gamma: float = 0.9, decouple: bool = True,
                 max_norm: Optional[float] = None, adaptive: bool = False, impl: str = "auto",
                 nonfinite: Optional[str] = None, **base_kwargs):
        if not 0.0 <= _check_number("gamma", gamma) < 1.0:
            raise ValueError(f"gamma must be in [0, 1), got {gamma}")
        if max_norm is not None and not _check_number("max_norm", max_norm) > 0:
            raise ValueError(f"max_norm must be None or positive, got {max_norm}")
        self.gamma, self.decouple, self.max_norm = float(gamma), _check_bool("decouple", decouple), max_norm
        self.weight = self.gamma / (1.0 - self.gamma)
        self._sums: Dict[_sharding.Scope, Tensor] = {}
        self._coef: Dict[torch.device, Tensor] = {}
        self._base_grads: Dict[int, List[Tensor]] = {}  # the generic decoupled path's c0 g0, by bucket
        defaults = dict(rho=_check_nonneg("rho", rho), adaptive=bool(adaptive), p=2.0, perturb=True)
        self._init_sam(params, base_optimizer, impl, defaults, base_kwargs, nonfinite)

    def _clip_factors(self, buckets: List[_buckets.Bucket], inv) -> Dict[torch.device, Tensor]:
        """The coefficient buffer of every device, its clip factors set (1 without max_norm)."""
        for d in {b.params[0].device for b in buckets}:
            if d not in self._coef:
                self._coef[d] = torch.ones(8, device=d)
        if self.max_norm is None:
            return self._coef
        sums = _sharding.zeroed(self._sums, {b.scope for b in buckets}, 2)  # ||g0||^2, ||g1||^2
        for b in buckets:
            grads = b.grads()
            idx = with_grad(grads)
            params, acc = take(b.params, idx), sums[b.scope]
            # g0 is clipped over every parameter that had a grad at w (all of a bucket's), g1 over those with one now.
            ops.norm_sq_(acc=acc[0:1], grads=b.buffers["grad0"], params=b.params, row_scales=[],
                         mode=ops.MODE_IDENTITY, eta=0.0, impl=b.impl)
            ops.norm_sq_(acc=acc[1:2], grads=take(grads, idx), params=params, row_scales=[],
                         mode=ops.MODE_IDENTITY, eta=0.0, amp=None if inv is None else ops.AmpArgs(inv[b.scope.device]),
                         impl=b.impl)
        for d, acc in _sharding.global_sums(sums).items():
            factors = self._coef[d][_CLIP0:_CLIP1 + 1]
            torch.reciprocal(acc.sqrt().add_(_CLIP_EPS), out=factors)
            factors.mul_(self.max_norm).clamp_(max=1.0)
        return self._coef

    def _combination(self, buckets: List[_buckets.Bucket], inv=None, fused: bool = True) -> Combination:
        a = self.weight
        for coef in self._clip_factors(buckets, inv).values():
            c0, c1 = coef[_CLIP0], coef[_CLIP1]
            update, sharp = coef[_UPDATE], coef[_SHARP]
            if self.decouple:  # the base step takes c0 g0; then w -= lr a (c1 g1 - c0 g0)
                update[0], update[1] = 0.0, c0
                sharp[0], sharp[1], sharp[2] = c1, -c0, 0.0
            else:  # a c1 g1 + (1 - a) c0 g0
                update[0], update[1] = a * c1, (1 - a) * c0
            update[2] = 0.0
        if self.decouple and not fused:
            return self._decoupled_generic(buckets)
        return (lambda b: (b.buffers["grad0"], [])), {d: c[_UPDATE] for d, c in self._coef.items()}

    def _decoupled_generic(self, buckets: List[_buckets.Bucket]) -> Combination:
        """The base optimizer's own step reads ``.grad``: it is given c0 g0, and g0's buffer then holds the
        decoupled term's c1 g1 - c0 g0, which _after_update applies (the grads are unscaled here)."""
        self._base_grads = {}
        for b in buckets:
            grads, g0 = b.grads(), b.buffers["grad0"]
            coef = self._coef[b.params[0].device]
            idx = [i for i, g in enumerate(grads) if g is not None]
            base = torch._foreach_mul(take(g0, idx), coef[_CLIP0])
            sharp = torch._foreach_mul(take(grads, idx), coef[_CLIP1])
            torch._foreach_sub_(sharp, base)
            torch._foreach_copy_(take(g0, idx), sharp)
            full = list(g0)  # aligned with the bucket; entries without a grad are not read
            for i, t in zip(idx, base):
                full[i] = t
            self._base_grads[id(b)] = full
        unit = {d: c.new_tensor([0.0, 1.0, 0.0]) for d, c in self._coef.items()}
        return (lambda b: (self._base_grads[id(b)], [])), unit

    def _after_update(self, buckets: List[_buckets.Bucket], gate: Optional[_gate.Gate], fused: bool) -> None:
        if not self.decouple:
            return
        a = self.weight
        for b in buckets:
            lr = b.group["lr"] * a
            if fused:
                d = b.params[0].device
                ops.restore_sgd_(params=b.params, grads=b.grads(), backups=[], momentum_buffers=[], lr=lr,
                                 weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, maximize=False,
                                 init_momentum=False, grad=ops.GradArgs(self._coef[d][_SHARP], b.buffers["grad0"]),
                                 amp=gate.on(d) if gate else None, impl=b.impl)
            else:
                idx = with_grad(b.grads())
                torch._foreach_add_(take(b.params, idx), take(b.buffers["grad0"], idx), alpha=-lr)
        self._base_grads = {}
