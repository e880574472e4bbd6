"""SAM: sharpness-aware minimization on fused kernels, with davda54/sam's API."""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

import fastsam.ops as ops
from fastsam.optim import _buckets, _fused_update


def _check_nonneg(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value >= 0.0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def _check_p(p) -> float:
    if p not in (2, math.inf):
        raise ValueError(f"p must be 2 or math.inf, got {p!r}")
    return float(p)


class SAM(torch.optim.Optimizer):
    r"""Sharpness-aware minimization (Foret et al., 2021) around any base optimizer.

    Each step takes two forward/backward passes. With :math:`g` the gradient at :math:`w`,
    :math:`T` the normalization operator (identity, or :math:`|w|` with ``adaptive=True``) and the
    norm taken over the parameters of *all* groups:

    .. math::
        e = \frac{\rho}{\lVert T g \rVert_2 + 10^{-12}}\, T^2 g \quad (p = 2), \qquad
        e = \rho\, T\, \mathrm{sign}(g) \quad (p = \infty)

    ``first_step`` backs up :math:`w` and moves to :math:`w + e`; the second backward pass gives
    :math:`g_{\text{SAM}} = \nabla L(w + e)`; ``second_step`` restores :math:`w` from the backup
    exactly and lets the base optimizer step with :math:`g_{\text{SAM}}`. For ``torch.optim.SGD``,
    ``Adam`` and ``AdamW`` the restore and the update run as one fused kernel.

    Every pass over memory is one fused op call per (param group, device, dtype) bucket: the norm
    stays on the device (no host sync), backups are allocated once, parameters keep their storage.

    Args:
        params: parameters, ``(name, parameter)`` pairs or param-group dicts. Ignored (may be None)
            when ``base_optimizer`` is an instance, whose param groups SAM then shares.
        base_optimizer: a ``torch.optim.Optimizer`` class (built with ``params`` and
            ``**base_kwargs``) or instance.
        rho: neighbourhood radius (per group; default 0.05).
        adaptive: use :math:`T = |w|` (davda54's ASAM variant; no eta).
        p: 2 or ``math.inf``.
        impl: "auto", "cuda", "triton", "cpu" or "torch" (see :func:`fastsam.available_impls`).
        **base_kwargs: the base optimizer's arguments (lr, momentum, ...).

    Example::

        opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with fastsam.utils.frozen_bn_stats(model):
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)
    """

    _eps_norm = 1e-12

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, p: float = 2,
                 impl: str = "auto", **base_kwargs):
        self._init_sam(params, base_optimizer, impl, dict(rho=_check_nonneg("rho", rho),
                                                          adaptive=bool(adaptive), p=_check_p(p)), base_kwargs)

    # ---- construction ------------------------------------------------------------------------
    def _init_sam(self, params, base_optimizer, impl: str, defaults: dict, base_kwargs: dict) -> None:
        self.impl = ops.check_impl(impl)
        self._plan: Optional[List[_buckets.Bucket]] = None
        self._plan_key: Optional[tuple] = None
        self._plan_grads: Optional[tuple] = None  # which parameters had a grad in the last first_step
        self._perturbed: Optional[List[_buckets.Bucket]] = None
        self._acc: Dict[torch.device, Tensor] = {}
        if isinstance(base_optimizer, torch.optim.Optimizer):
            if base_kwargs:
                raise TypeError(f"base optimizer arguments {sorted(base_kwargs)} were given with an optimizer "
                                "instance; pass them to its constructor instead")
            super().__init__(base_optimizer.param_groups, defaults)  # adds SAM's options to the base's groups
            self.base_optimizer = base_optimizer
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
            if params is None:
                raise TypeError("params is required when base_optimizer is a class")
            super().__init__(params, defaults)
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        else:
            raise TypeError("base_optimizer must be a torch.optim.Optimizer subclass or instance, "
                            f"got {base_optimizer!r}")
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self._fused_kind = _fused_update.fused_kind(self.base_optimizer)

    def add_param_group(self, param_group: dict) -> None:
        if not hasattr(self, "base_optimizer"):  # called by Optimizer.__init__ while building the groups
            super().add_param_group(param_group)
            return
        for name, default in self.defaults.items():
            param_group.setdefault(name, default)
        self._check_group(param_group)
        self.base_optimizer.add_param_group(param_group)
        self._plan = None

    def _check_group(self, group: dict) -> None:
        _check_nonneg("rho", group["rho"])
        _check_p(group["p"])

    # ---- the normalization operator ------------------------------------------------------------
    def _operator(self, p: Tensor, name: Optional[str], group: dict):
        """(mode, eta) of T for parameter ``p``; see fastsam.ops.reference."""
        return (ops.MODE_ABS, 0.0) if group["adaptive"] else (ops.MODE_IDENTITY, 0.0)

    # Group options that decide the operator T of a parameter: a change rebuilds the plan.
    _operator_options = ("adaptive",)

    def _buckets(self) -> List[_buckets.Bucket]:
        with_grad = _buckets.grad_signature(self.param_groups)
        key = with_grad + tuple(g.get(k) for g in self.param_groups for k in self._operator_options)
        if self._plan is None or key != self._plan_key:
            for group in self.param_groups:
                self._check_group(group)
            self._plan = _buckets.build(self.param_groups, self.state, self.impl, self._operator)
            self._plan_key = key
        self._plan_grads = with_grad
        return self._plan

    # ---- the two steps -----------------------------------------------------------------------
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Back up w and move every parameter with a grad to w + e (see the class docstring)."""
        buckets = self._buckets()
        for b in buckets:
            if b.mode == ops.MODE_ROW:
                ops.row_norm_(b.row_scales, b.params, b.eta, impl=b.impl)
        grads = [b.grads() for b in buckets]
        norm_sq = self._global_norm_sq(buckets, grads)
        for b, g in zip(buckets, grads):
            ops.perturb_(b.params, g, b.backups, b.row_scales, norm_sq.get(b.params[0].device),
                         b.group["rho"], self._eps_norm, b.mode, b.eta, b.group["p"] == math.inf, impl=b.impl)
        self._perturbed = buckets
        if zero_grad:
            self.zero_grad()

    def _global_norm_sq(self, buckets, grads) -> Dict[torch.device, Tensor]:
        """sum ||T g||^2 over all p=2 buckets, as an fp32 [1] tensor on every device involved."""
        l2 = [(b, g) for b, g in zip(buckets, grads) if b.group["p"] != math.inf]
        devices = {b.params[0].device for b in buckets}
        for d in devices:
            if d not in self._acc:
                self._acc[d] = torch.zeros(1, device=d, dtype=torch.float32)
            self._acc[d].zero_()
        for b, g in l2:
            ops.norm_sq_(self._acc[b.params[0].device], g, b.params, b.row_scales, b.mode, b.eta, impl=b.impl)
        if len(devices) > 1:  # one global norm: every device gets the sum of all partial sums
            total = sum(a.to(next(iter(devices))) for a in self._acc.values() if a.device in devices)
            for d in devices:
                self._acc[d].copy_(total)
        return self._acc

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w exactly, then step the base optimizer with the grads of the second pass."""
        perturbed, self._perturbed = self._perturbed, None
        if perturbed is None:
            raise RuntimeError("second_step() called without a first_step() before it")
        kind = self._fused_kind
        same_params = _buckets.grad_signature(self.param_groups) == self._plan_grads
        if kind is not None and same_params and all(
                _fused_update.group_supported(kind, b.group) for b in perturbed) and all(
                b.impl != "torch" for b in perturbed):
            for b in perturbed:
                _fused_update.restore_and_update(kind, self.base_optimizer, b, b.grads())
        else:
            # Every perturbed parameter is restored, also one that got no grad in this pass.
            for b in perturbed:
                ops.restore_(b.params, b.backups, impl=b.impl)
                b.adam_steps = None  # the base's own step moves the counters of some parameters
            self.base_optimizer.step()
        # An LR scheduler on SAM counts calls of SAM.step; in an explicit loop second_step is that step.
        self._opt_called = True
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        """A whole SAM step. ``closure`` runs forward and backward and returns the loss; it need not
        zero the grads (the step does between the passes). If no parameter has a grad yet, the closure
        first runs at w (the first pass). Returns the loss at w when this call computed it, otherwise
        the loss at w + e."""
        if closure is None:
            raise RuntimeError("SAM.step() needs a closure that runs forward and backward; "
                               "or call first_step() and second_step() yourself")
        closure = torch.enable_grad()(closure)
        loss = None
        if not any(_buckets.grad_signature(self.param_groups)):
            loss = closure()
        self.first_step(zero_grad=True)
        second_loss = closure()
        self.second_step()
        return second_loss if loss is None else loss

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The base optimizer's state dict; its param groups hold SAM's options (rho, ...) as well.
        Backups are scratch space between the two passes and are not saved."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups  # re-link: the base made new group dicts
        self._plan = None
        self._perturbed = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(impl={self.impl!r}, base_optimizer={self.base_optimizer!r})"
