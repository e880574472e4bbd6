"""Friendly SAM (Li et al., CVPR 2024): SAM whose perturbation leaves out the full-gradient component."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from fastsam.optim import _buckets, _sharding
from fastsam.optim.sam import SAM, Direction, _check_bool, _check_nonneg, _check_number


class FriendlySAM(SAM):
    r"""Friendly SAM: the perturbation follows the batch gradient minus an estimate of the full gradient.

    With :math:`g_t` the gradient at :math:`w` and :math:`m` the exponential moving average of past raw
    gradients (the authors' ordering):

    .. math::
        t = 1:\quad d = g_1,\quad m_1 = g_1 \qquad\qquad
        t \ge 2:\quad d = g_t - \sigma\, m_{t-1},\quad m_t = \lambda\, m_{t-1} + (1 - \lambda)\, g_t

        e = \rho\, \frac{T^2 d}{\lVert T d \rVert_2 + 10^{-12}}

    with :math:`T = I`, or :math:`|w|` when ``adaptive=True``; the norm is global over all perturbed
    groups. The EMA update, the subtraction, the norm of :math:`d` and the move to :math:`w + e` run in
    the fused norm and perturb ops (two passes over memory, as for SAM); ``second_step`` is SAM's.
    The step counts per parameter: one that first gets a grad later starts its own EMA then.

    ``.grad`` is left untouched (the authors' code overwrites it with :math:`d`, which only shows when
    the second pass accumulates into it). The EMA is saved by ``state_dict``.

    Args:
        params, base_optimizer, impl, nonfinite, **base_kwargs: as for :class:`fastsam.SAM`.
        rho: radius (default 0.05). sigma: weight of the removed full-gradient estimate (default 1.0).
        lmbda: EMA decay in [0, 1) (default 0.9). adaptive: :math:`T = |w|`.
        per_rank_ema: for m-sharpness under FSDP2 (``fastsam.distributed.sam_closure(...,
            sync_first_pass=False)``, which every step must then use): each rank keeps the EMA of its own
            grads over the full parameters, as each DDP rank does under m-sharpness. Saved as a state
            ``"rank_ema"`` of shape ``(world, *p.shape)`` sharded on dim 0 (a full-size tensor per rank,
            for good), which a distributed checkpoint saves rank by rank; it must be chosen when the
            optimizer is built, so that a fresh optimizer's checkpoint template has that layout. Needs every
            parameter to be a DTensor on a 1-D mesh (``fully_shard``).
        sigma, lmbda and rho are param-group options.

    Example::

        opt = fastsam.FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with fastsam.utils.frozen_bn_stats(model):
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)
    """

    _buffers = ("ema",)
    _p2_only = True
    _saved_buffers = ("ema",)
    per_rank_ema = False

    def __init__(self, params, base_optimizer, rho: float = 0.05, sigma: float = 1.0, lmbda: float = 0.9,
                 adaptive: bool = False, impl: str = "auto", nonfinite: Optional[str] = None,
                 per_rank_ema: bool = False, **base_kwargs):
        defaults = dict(rho=_check_nonneg("rho", rho), sigma=_check_number("sigma", sigma), lmbda=_check_lmbda(lmbda),
                        adaptive=bool(adaptive), p=2.0, perturb=True)
        if _check_bool("per_rank_ema", per_rank_ema):
            # The optimizer's own steps keep no EMA; the per-rank perturbation's twin updates "rank_ema".
            self.per_rank_ema = True
            self._buffers, self._saved_buffers = (), ("rank_ema",)
            self._per_rank_buffers = {"ema": "rank_ema"}
        self._init_sam(params, base_optimizer, impl, defaults, base_kwargs, nonfinite)
        if self.per_rank_ema:
            meshes = _sharding.mesh_dims(self._params())
            if meshes != {1}:
                raise ValueError("per_rank_ema=True is for FSDP2 parameters (DTensors on a 1-D mesh) under "
                                 "fastsam.distributed.sam_closure(..., sync_first_pass=False); these parameters "
                                 f"have meshes of {sorted(meshes)} dimensions (0: a plain tensor)")

    def first_step(self, zero_grad: bool = False, grad_scaler: Optional[torch.amp.GradScaler] = None) -> None:
        if self.per_rank_ema and not self._moved_elsewhere and self.next_pass_at_w:
            raise RuntimeError("FriendlySAM(per_rank_ema=True) perturbs each rank's full parameters with its own "
                               "EMA: step with opt.step(fastsam.distributed.sam_closure(opt, model, compute_loss, "
                               "sync_first_pass=False))")
        super().first_step(zero_grad, grad_scaler)

    def _zero_buffer(self, p: Tensor, key: str) -> Tensor:
        return _sharding.per_rank_zeros(p) if key == "rank_ema" else super()._zero_buffer(p, key)

    def _method_name(self) -> str:
        # The EMA of one layout does not load into the other.
        return "FriendlySAM(per_rank_ema)" if self.per_rank_ema else "FriendlySAM"

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        _check_number("sigma", group["sigma"])
        _check_lmbda(group["lmbda"])

    def _directions(self, bucket: _buckets.Bucket) -> List[Direction]:
        ema = bucket.buffers["ema"]
        steady = (None, ema, float(bucket.group["sigma"]), float(bucket.group["lmbda"]))
        if not bucket.fresh:
            return [steady]
        # A parameter's first step: d = g and m = g (sigma = lmbda = 0), in a call of its own.
        fresh = set(bucket.fresh)
        rest = [i for i in range(len(bucket.params)) if i not in fresh]
        return ([(rest,) + steady[1:]] if rest else []) + [(bucket.fresh, ema, 0.0, 0.0)]


def _check_lmbda(lmbda) -> float:
    if not 0.0 <= _check_number("lmbda", lmbda) < 1.0:
        raise ValueError(f"lmbda must be in [0, 1), got {lmbda}")
    return float(lmbda)
