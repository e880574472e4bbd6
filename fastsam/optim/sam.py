"""SAM: sharpness-aware minimization on fused kernels, with davda54/sam's API."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

import fastsam.ops as ops
from fastsam._checks import _check_bool, _check_nonneg, _check_number  # noqa: F401  (re-exported to the family)
from fastsam.optim import _buckets, _fused_update, _gate, _passes, _sharding
from fastsam.ops.reference import upcast
from fastsam.optim._buckets import take, with_grad

# (indices of a bucket's params or None for all, ema, sigma, lmbda): one perturb call; see reference.perturb_.
Direction = Tuple[Optional[List[int]], List[Tensor], float, float]
# Per bucket: (grads_b, grads_c) of the grad combination, and the coefficients by device.
Combination = Tuple[Callable[[_buckets.Bucket], Tuple[List[Tensor], List[Tensor]]], Dict[torch.device, Tensor]]


def _check_interval(interval) -> int:
    if isinstance(interval, bool) or not isinstance(interval, int):
        raise TypeError(f"interval must be an int >= 1, got {interval!r}")
    if interval < 1:
        raise ValueError(f"interval must be an int >= 1, got {interval}")
    return interval


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

    A param group with ``rho=0`` or ``perturb=False`` is not perturbed: it is left out of the norm,
    gets no backup and costs no perturbation traffic; its parameters still take the base optimizer's
    step with the grad of the second pass (e.g. perturb only the normalization layers).

    Args:
        params: parameters, ``(name, parameter)`` pairs or param-group dicts. Ignored (may be None)
            when ``base_optimizer`` is an instance, whose param groups SAM then shares.
        base_optimizer: a ``torch.optim.Optimizer`` class (built with ``params`` and
            ``**base_kwargs``) or instance.
        rho: neighbourhood radius (per group; default 0.05).
        adaptive: use :math:`T = |w|` (davda54's ASAM variant; no eta).
        p: 2 or ``math.inf``.
        impl: "auto", "cuda", "triton", "cpu" or "torch" (see :func:`fastsam.available_impls`).
        nonfinite: what a step does when a grad is inf or NaN and no GradScaler handles it: None (the
            default, as torch's optimizers: no check, the NaN spreads), "skip" (the step is skipped:
            parameters, base optimizer state and the method's state stay as they were; counted in
            :attr:`skipped_steps`; no host sync) or "raise" (skipped, then FloatingPointError: one host
            read of the flag per pass checked). A step begun with ``first_step(grad_scaler=...)``
            follows the scaler instead: it skips, and ``scaler.update()`` backs off.
        interval: every method takes it (Composer's name; default 1): the method's step on every
            ``interval``-th step (:attr:`steps_done` ``% interval == 0``, from the first step on), the base
            optimizer's plain one-pass step on the others. ``step(closure)`` runs the right number of passes;
            an explicit loop asks :attr:`sharpness_active` and, when it is False, runs the pass at w and calls
            ``opt.step()``. Method state that follows the grads (Friendly SAM's EMA, ...) is updated on the
            method's steps only. A step skipped on the device (GradScaler, ``nonfinite``) still counts, so the
            phase never needs a host read. The count is saved by ``state_dict``.
        **base_kwargs: the base optimizer's arguments (lr, momentum, ...).

    Example::

        opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with fastsam.utils.frozen_bn_stats(model):
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)

    Or with a closure, as for any torch optimizer (every pass runs through it; BatchNorm statistics update
    in the pass at w only; see :meth:`step` for the contract, which the other methods share)::

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)

    With ``torch.amp.GradScaler`` (the grads are unscaled inside the kernels, and a non-finite grad in
    either pass skips the whole step on the device)::

        scaler.scale(loss_fn(model(x), y)).backward()
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        with fastsam.utils.frozen_bn_stats(model):
            scaler.scale(loss_fn(model(x), y)).backward()
        scaler.step(opt)  # calls opt.step(), which finishes the SAM step
        scaler.update()
        opt.zero_grad()
    """

    _eps_norm = 1e-12
    # Freeze BatchNorm running statistics in every pass of ``step(closure)`` after the step's first
    # forward pass (the one at w), as the explicit loop does with fastsam.utils.frozen_bn_stats. Set it to
    # False on an optimizer to let them update in every pass (davda54/sam's step does that).
    freeze_bn: bool = True
    # GradScaler.step hands a step its grad_scale / found_inf instead of unscaling and syncing itself.
    _step_supports_amp_scaling = True

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, p: float = 2,
                 impl: str = "auto", nonfinite: Optional[str] = None, **base_kwargs):
        self._init_sam(params, base_optimizer, impl, dict(rho=_check_nonneg("rho", rho), adaptive=bool(adaptive),
                                                          p=_check_p(p), perturb=True), base_kwargs, nonfinite)

    # ---- construction ------------------------------------------------------------------------
    def _init_sam(self, params, base_optimizer, impl: str, defaults: dict, base_kwargs: dict,
                  nonfinite: Optional[str] = None, interval: Optional[int] = None) -> None:
        """``interval``: None takes it from ``base_kwargs`` (every method accepts ``interval=``), default 1."""
        self.impl = ops.check_impl(impl)
        self.interval = _check_interval(base_kwargs.pop("interval", 1) if interval is None else interval)
        self.steps_done = 0  # completed steps, the method's and the base optimizer's one-pass ones
        self.nonfinite = _gate.check_nonfinite(nonfinite)
        self._gate: Optional[_gate.Gate] = None  # the found flags of the step under way, when it is gated
        self._found: Dict[torch.device, Tensor] = {}  # their buffers
        self._check: Dict[torch.device, Tensor] = {}  # scratch sums of the checks of later passes
        self._skipped: Optional[Tensor] = None  # skipped steps, counted on the device
        self._plan: Optional[List[_buckets.Bucket]] = None
        self._plan_key: Optional[tuple] = None
        self._plan_grads: Optional[tuple] = None  # which parameters had a grad in the last first_step
        self._perturbed: Optional[List[_buckets.Bucket]] = None
        self._moved_elsewhere = False  # the coming first step leaves w be (see _perturbation_made_elsewhere)
        self._acc: Dict[_sharding.Scope, Tensor] = {}  # the squared norm of the first step, per scope
        self._norm_sq: Dict[torch.device, Tensor] = {}  # its global total, per device
        self._ledger = _passes.GradLedger()  # the grads as the last step left them (see step)
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
        for group in self.param_groups:
            self._check_group(group)

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
        if self._p2_only and group["p"] != 2:
            raise ValueError(f"{type(self).__name__} supports p=2 only, got p={group['p']}")
        _check_bool("perturb", group.get("perturb", True))

    @staticmethod
    def _moves(group: dict) -> bool:
        """Whether the first step perturbs this group."""
        return group.get("perturb", True) and group["rho"] != 0

    # ---- what a method adds to the SAM step (overridden by FriendlySAM, CRSAM, LastSAM) ----------
    # State keys of per-parameter buffers the method keeps, made zero-filled at a parameter's first step.
    _buffers: Tuple[str, ...] = ()
    # Those of them that are method state (saved by state_dict), not scratch space within a step.
    _saved_buffers: Tuple[str, ...] = ()
    # Whether the one-pass steps update with the method's combination too (LookSAM: g + kept g_v), not g alone.
    _one_pass_combines = False
    # Whether the method's own update is made of the grad of the pass at w too (CR-SAM, GSAM, WSAM, LookSAM).
    _update_uses_g0 = False
    # Whether the method is defined for p = 2 only.
    _p2_only = False

    def _radius(self, group: dict) -> float:
        """The radius of this step's perturbation of ``group`` (GSAM: rho following the lr)."""
        return group["rho"]

    def _directions(self, bucket: _buckets.Bucket) -> List[Direction]:
        """The perturb calls of a bucket: the direction transform of every subset of its params. With a
        "grad0" buffer, the first-pass grad is copied there in the same pass (ema with lmbda = 0)."""
        return [(None, bucket.buffers.get("grad0", []), 0.0, 0.0)]

    def _combination(self, buckets: List[_buckets.Bucket], inv: Optional[Dict[torch.device, Tensor]] = None,
                     fused: bool = True) -> Optional[Combination]:
        """The grad of the base step as a combination of kept grads; None: the grad of the last pass.
        ``inv``: the inverse loss scale of the last pass's grads, which the update unscales in the kernel
        (kept grads are stored unscaled). ``fused``: the fused update takes the combination (else it is
        written into ``.grad`` for the base optimizer's own step, the grads already unscaled)."""
        return None

    def _after_update(self, buckets: List[_buckets.Bucket], gate: Optional[_gate.Gate], fused: bool) -> None:
        """What the method does to w after the base step (WSAM's decoupled sharpness term); ``gate``: the
        step's, whose found flag skips it; ``fused``: whether the update was the fused one."""

    # ---- the normalization operator ------------------------------------------------------------
    def _operator(self, p: Tensor, name: Optional[str], group: dict):
        """(mode, eta) of T for parameter ``p``; see fastsam.ops.reference."""
        return (ops.MODE_ABS, 0.0) if group["adaptive"] else (ops.MODE_IDENTITY, 0.0)

    # Group options that decide the operator T of a parameter: a change rebuilds the plan.
    _operator_options = ("adaptive",)

    def _buckets(self) -> List[_buckets.Bucket]:
        with_grad = _buckets.grad_signature(self.param_groups)
        key = with_grad + tuple((self._moves(g),) + tuple(g.get(k) for k in self._operator_options)
                                for g in self.param_groups)
        if self._plan is None or key != self._plan_key:
            for group in self.param_groups:
                self._check_group(group)
            self._plan = _buckets.build(self.param_groups, self.state, self.impl, self._operator, self._moves,
                                        self._buffers)
            self._plan_key = key
        self._plan_grads = with_grad
        return self._plan

    # ---- the two steps -----------------------------------------------------------------------
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: Optional[torch.amp.GradScaler] = None) -> None:
        """Back up w and move every parameter with a grad to w + e (see the class docstring).

        ``grad_scaler``: the GradScaler whose scaled loss gave these grads. They are unscaled inside the
        kernels, and a non-finite one leaves w where it is and flags the step, which ``scaler.step(opt)``
        then skips (``scaler.update()`` backs off). Finish such a step with ``scaler.step(opt)``.

        Raises RuntimeError while a step is under way (a ``first_step`` not yet finished): the backups
        hold the w to restore, and a second ``first_step`` would overwrite them with w + e."""
        if not self._moved_elsewhere and self.next_pass_at_w and not self.sharpness_active:
            raise RuntimeError(f"{type(self).__name__}.first_step(): step {self.steps_done} is the base optimizer's "
                               f"one-pass step ({self._phase()}; sharpness_active is False): run the pass at w and "
                               "call opt.step(), or use opt.step(closure)")
        if not self.next_pass_at_w:
            raise RuntimeError(f"{type(self).__name__}.first_step() was called again before the step it began "
                               f"ended: finish that step first ({self._finish_hint()}); the parameters are "
                               "still at the perturbed point")
        if self._moved_elsewhere:
            self._moved_elsewhere = False
            self._perturbed, self._gate = _PERTURBED_ELSEWHERE, None
            if zero_grad:
                self.zero_grad()
            return
        scaler = _gate.active_scaler(grad_scaler)
        buckets = self._buckets()
        devices = {b.params[0].device for b in buckets}
        inv = _gate.scaler_inverse_scales(scaler, devices) if scaler is not None else None
        for b in buckets:
            if b.perturbed and b.mode == ops.MODE_ROW:
                ops.row_norm_(out=b.row_scales, params=b.params, eta=b.eta, impl=b.impl)
        grads = [b.grads() for b in buckets]
        norm_sq = self._norm_sq = self._global_norm_sq(buckets, grads, inv)
        gate = None
        if scaler is not None or self.nonfinite is not None:
            gate = _gate.Gate(self._found_at_w(buckets, grads, norm_sq), inv, scaler)
        for b, g in zip(buckets, grads):
            amp = gate.on(b.params[0].device) if gate else None
            for idx, ema, sigma, lmbda in self._directions(b):
                if b.perturbed:
                    ops.perturb_(params=take(b.params, idx), grads=take(g, idx), backups=take(b.backups, idx),
                                 row_scales=take(b.row_scales, idx), norm_sq=norm_sq[b.params[0].device],
                                 rho=self._radius(b.group), eps=self._eps_norm, mode=b.mode, eta=b.eta,
                                 sign=b.group["p"] == math.inf, ema=take(ema, idx), sigma=sigma, lmbda=lmbda,
                                 amp=amp, impl=b.impl)
                elif ema:  # not perturbed, but the kept grads (EMA, copy) follow every step
                    _ema_update(take(ema, idx), take(g, idx), lmbda, amp)
            b.fresh = []
        self._perturbed, self._gate = buckets, gate
        weights_moved()
        if gate is not None and scaler is None and self.nonfinite == "raise" and _any_found(gate):
            self._perturbed = self._gate = None  # w was not moved: the step simply did not happen
            raise FloatingPointError("a grad of the pass at w is inf or NaN (nonfinite='raise'); "
                                     "the step was not taken")
        if zero_grad:
            self.zero_grad()

    def _global_norm_sq(self, buckets, grads, inv=None) -> Dict[torch.device, Tensor]:
        """sum ||T d||^2 over all perturbed p=2 buckets, as an fp32 [1] tensor on every device involved
        (``inv``: the inverse loss scale of the grads, by device)."""
        accs = _sharding.zeroed(self._acc, {b.scope for b in buckets}, 1)
        normed = [b.perturbed and b.group["p"] != math.inf for b in buckets]
        for b, g, n in zip(buckets, grads, normed):
            if n:
                for idx, ema, sigma, _ in self._directions(b):
                    ops.norm_sq_(acc=accs[b.scope], grads=take(g, idx), params=take(b.params, idx),
                                 row_scales=take(b.row_scales, idx), mode=b.mode, eta=b.eta, ema=take(ema, idx),
                                 sigma=sigma, amp=None if inv is None else ops.AmpArgs(inv[b.scope.device]),
                                 impl=b.impl)
        return _sharding.global_sums(accs, added={b.scope for b, n in zip(buckets, normed) if n})

    def _found_at_w(self, buckets, grads, norm_sq) -> Dict[torch.device, Tensor]:
        """The found flags of the pass at w: the norm already summed the grads of the perturbed p=2
        buckets (a non-finite grad makes it non-finite); the other grads get a sum of their own."""
        covered = [b.perturbed and b.group["p"] != math.inf for b in buckets]
        found = self._nonfinite_sums(self._found, [(b, g) for b, g, c in zip(buckets, grads, covered) if not c],
                                     {b.scope for b in buckets})
        for d, f in found.items():
            f.add_(norm_sq[d])
            _gate.flag_nonfinite_(f)
        return found

    def _nonfinite_sums(self, buffers, pairs, scopes) -> Dict[torch.device, Tensor]:
        """Into ``buffers`` (zeroed first), by scope: sum g^2 over the given (bucket, grads) pairs (a read
        of the grads), summed over scopes and ranks: non-finite iff one of the grads is. By device."""
        sums = _sharding.zeroed(buffers, scopes, 1)
        for b, g in pairs:
            idx = with_grad(g)
            ops.norm_sq_(acc=sums[b.scope], grads=take(g, idx), params=take(b.params, idx), row_scales=[],
                         mode=ops.MODE_IDENTITY, eta=0.0, impl=b.impl)
        return _sharding.global_sums(sums, added={b.scope for b, _ in pairs})

    def _flag_pass(self, gate: _gate.Gate, buckets) -> None:
        """Adds the found flag of the grads of the pass just done to ``gate`` (the nonfinite policy's
        check: one read of the grads)."""
        checks = self._nonfinite_sums(self._check, [(b, b.grads()) for b in buckets], {b.scope for b in buckets})
        for d, f in gate.found.items():
            f.add_(_gate.flag_nonfinite_(checks[d])).clamp_(max=1.0)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w exactly, then step the base optimizer with the grads of the second pass."""
        perturbed = self._take_perturbed("second_step", "first_step")
        if perturbed is _PERTURBED_ELSEWHERE:  # w was not moved: nothing to restore
            self._update(self._buckets(), restore=False)
        else:
            self._update(perturbed)
        if zero_grad:
            self.zero_grad()

    def _take_perturbed(self, this: str, before: str) -> List[_buckets.Bucket]:
        perturbed, self._perturbed = self._perturbed, None
        if perturbed is None:
            raise RuntimeError(f"{this}() called without a {before}() before it")
        return perturbed

    def _update(self, perturbed: List[_buckets.Bucket], restore: bool = True) -> None:
        """Restore w exactly (``restore=False``: there is nothing to restore, LastSAM before its switch),
        then step the base optimizer with the grad of the last pass, or the method's combination of kept
        grads. A gated step skips the update on the device when its found flag is set."""
        gate = self._finish_gate(perturbed, restore)
        # A one-pass step (interval, LastSAM before its switch) is the base optimizer's step with the grad of its
        # pass: the method's combination of kept grads and its after-update belong to the method's steps.
        method_step = self.sharpness_active
        combines = method_step or self._one_pass_combines
        kind = self._fused_kind
        same_params = _buckets.grad_signature(self.param_groups) == self._plan_grads
        if kind is not None and same_params and all(
                _fused_update.group_supported(kind, b.group) for b in perturbed) and all(
                b.impl != "torch" for b in perturbed):
            combination = self._combination(perturbed, gate.inv if gate else None) if combines else None
            for b in perturbed:
                grad = None
                if combination is not None:
                    grad = ops.GradArgs(combination[1][b.params[0].device], *combination[0](b))
                _fused_update.restore_and_update(kind, self.base_optimizer, b, b.grads(), grad=grad,
                                                 amp=gate.on(b.params[0].device) if gate else None, restore=restore)
            if method_step:
                self._after_update(perturbed, gate, fused=True)
        else:
            # Every perturbed parameter is restored, also one that got no grad in this pass.
            for b in perturbed:
                if restore and b.perturbed:
                    ops.restore_(params=b.params, backups=b.backups, impl=b.impl)
                b.adam_steps = None  # the base's own step moves the counters of some parameters
                if gate is not None and gate.inv is not None:
                    grads = [g for g in b.grads() if g is not None]
                    if grads:
                        torch._foreach_mul_(grads, gate.inv[b.params[0].device])
            combination = self._combination(perturbed, None, fused=False) if combines else None
            if combination is not None:
                for b in perturbed:
                    _combine_into_grads(b, *combination[0](b), combination[1][b.params[0].device])
            # torch's own step cannot read a found flag on the device: here a gated step reads it.
            if gate is None or not _any_found(gate):
                self.base_optimizer.step()
                if method_step:
                    self._after_update(perturbed, None, fused=False)
        if gate is not None:
            self._count_skipped(gate)
        self._step_ended()
        weights_moved()
        # An LR scheduler on SAM counts calls of SAM.step; in an explicit loop the last step is that step.
        self._opt_called = True
        if gate is not None and gate.scaler is None and self.nonfinite == "raise" and _any_found(gate):
            raise FloatingPointError("a grad of this step is inf or NaN (nonfinite='raise'); the step was not "
                                     "taken (parameters and optimizer state are as before it)")
        self.steps_done += 1

    def _finish_gate(self, perturbed: List[_buckets.Bucket], restore: bool) -> Optional[_gate.Gate]:
        """The gate of the update: the step's found flags with those of the last pass added (GradScaler's
        ``found_inf`` when ``scaler.step`` called, else the nonfinite policy's check), and the inverse
        scale of the last pass's grads. None: the step is not gated."""
        at_w, self._gate = self._gate, None
        scaler_found = getattr(self, "found_inf", None)  # set by GradScaler.step around its call of step()
        scaled_at_w = at_w is not None and at_w.scaler is not None
        if restore and scaled_at_w != (scaler_found is not None):
            restore_w(perturbed)  # not left at w + e
            if scaled_at_w:
                raise RuntimeError("first_step() got a grad_scaler: finish the step with scaler.step(optimizer), "
                                   "not second_step() (w was restored)")
            raise RuntimeError("scaler.step(optimizer) after a first_step() without grad_scaler: pass "
                               "grad_scaler=scaler to first_step() (w was restored)")
        if scaler_found is None and self.nonfinite is None:
            return None
        devices = {b.params[0].device for b in perturbed}
        if at_w is None:  # LastSAM's base step: no pass at w before this one
            at_w = _gate.Gate(_sharding.zeroed(self._found, devices, 1))
        if scaler_found is None:
            self._flag_pass(at_w, perturbed)
            return at_w
        if at_w.scaler is not None:
            _gate.report_to_scaler(at_w.scaler, self, at_w.found)
        for d, f in at_w.found.items():  # kept 0 or 1: a skipped Adam step takes back one increment
            f.add_(scaler_found.to(d, non_blocking=True).reshape(1)).clamp_(max=1.0)
        grad_scale = getattr(self, "grad_scale", None)  # None: the user unscaled the grads (scaler.unscale_)
        inv = None if grad_scale is None else _gate.inverse_scales(grad_scale, devices)
        return _gate.Gate(at_w.found, inv, at_w.scaler)

    def _count_skipped(self, gate: _gate.Gate) -> None:
        flag = next(iter(gate.found.values()))
        if self._skipped is None:
            self._skipped = torch.zeros(1, dtype=torch.float32, device=flag.device)
        elif self._skipped.device != flag.device:  # loaded from a state dict, on the CPU
            self._skipped = self._skipped.to(flag.device)
        self._skipped += flag > 0

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite grad (GradScaler or ``nonfinite``); reading it syncs the device."""
        return 0 if self._skipped is None else int(self._skipped.item())

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        """A whole SAM step: ``closure`` runs forward and backward at the current point and returns the loss.

        The step(closure) contract (every fastsam optimizer): ``step(closure)`` runs every pass of the
        step through the closure, whatever the closure does with the grads (zeroes them with
        ``set_to_none`` True or False, or not at all) and whether or not the caller zeroes them after the
        step; the grads are zeroed between the passes. The davda54/sam style also works: the caller runs
        the backward at w, then ``step(closure)`` runs only the later passes. The two are told apart from
        what happened to the grads since the last step ended (a new grad tensor, or autograd's in-place
        accumulation, which bumps the tensor's version), never from whether a ``.grad`` exists; a mix
        that fits neither (new grads beside the last step's, or a backward added onto the last step's
        grads) raises RuntimeError. BatchNorm running statistics update in the first forward pass of
        the step only (at w): the later passes run with them frozen (:attr:`freeze_bn`).

        Returns the loss at w when this call computed it, otherwise the loss at w + e. If the closure
        raises during a later pass, w is restored and the step is abandoned before the error propagates.

        Without a closure, after ``first_step``: finishes the step (what ``scaler.step(opt)`` calls).
        Without a closure, every lr 0 and every grad zero: makes the state a checkpoint loads into (see
        :meth:`_is_state_init_call`)."""
        if closure is None:
            if self._perturbed is not None:  # after first_step: GradScaler.step's call, or a loop's own
                self.second_step()
                return None
            self._step_without_closure()
            return None
        if not self.sharpness_active:
            return self._plain_step(closure)
        passes = self._closure_passes(closure)
        with self._abandoned_on_error():
            loss = None if passes.calls else self._pass_at_w(passes)
            self.first_step(zero_grad=True)
            second_loss = passes()
            self.second_step()
        return second_loss if loss is None else loss

    def _params(self) -> List[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _closure_passes(self, closure) -> _passes.ClosurePasses:
        """The passes of a ``step(closure)`` call, knowing whether the caller already ran the one at w."""
        if not self.next_pass_at_w:
            raise RuntimeError(f"{type(self).__name__}.step(closure) was called while a step begun with "
                               f"first_step() is under way: finish it first ({self._finish_hint()})")
        caller_ran_pass_at_w = self._ledger.pass_at_w_done(self._params())
        if caller_ran_pass_at_w:
            _passes.check_no_foreign_accumulation(closure)
        return _passes.ClosurePasses(closure, bool(self.freeze_bn), caller_ran_pass_at_w)

    def _pass_at_w(self, passes: _passes.ClosurePasses) -> Tensor:
        """Zeroes the grads (left from the last step, or zeroed in place), then runs the closure at w."""
        self.zero_grad(set_to_none=True)
        return passes()

    def _step_ended(self) -> None:
        """Marks the grads as the step leaves them: a later ``step(closure)`` knows them as the last step's."""
        self._ledger.mark(self._params())

    _explicit_steps = "first_step() and second_step()"  # the explicit form of a step, for messages

    def _finish_hint(self) -> str:
        """How to finish a step under way, for messages."""
        return "second_step(), or scaler.step(opt) after first_step(grad_scaler=scaler)"

    def _step_without_closure(self) -> None:
        """``step()`` without a closure and no step under way: the state initialisation of a distributed
        checkpoint, or a mistake, which raises RuntimeError."""
        if self._is_state_init_call():
            self._init_state()
            return
        if not self.sharpness_active:
            self._plain_step(None)
            return
        self._raise_no_closure()

    def _plain_step(self, closure: Optional[Callable[[], Tensor]]) -> Optional[Tensor]:
        """The base optimizer's one-pass step (between the method's steps under ``interval``; LastSAM before its
        switch), after running ``closure`` at w unless the caller already ran that backward (davda54's style;
        see :meth:`step` for the contract). Returns the closure's loss (None when it did not run)."""
        loss = None
        if closure is not None:
            passes = self._closure_passes(closure)
            if not passes.calls:
                loss = self._pass_at_w(passes)
        if getattr(self, "found_inf", None) is not None or self.nonfinite is not None or self._one_pass_combines:
            self._update(self._buckets(), restore=False)  # gated (unscaled, skipped on the device), or combined
        else:
            self.base_optimizer.step()
            for b in self._plan or ():
                b.adam_steps = None  # the base's own step moved the Adam counters
            self._step_ended()
            self._opt_called = True
            self.steps_done += 1
        return loss

    @property
    def sharpness_active(self) -> bool:
        """Whether the coming step is the method's (two or more passes) rather than the base optimizer's
        one-pass step: every ``interval``-th step, from the first on (``steps_done % interval == 0``).
        ``step(closure)`` runs the right passes by itself; an explicit loop asks this before ``first_step``."""
        return self.steps_done % self.interval == 0

    def _phase(self) -> str:
        """Why the coming step is what it is, for messages."""
        return f"interval={self.interval}, steps_done={self.steps_done}"

    def _is_state_init_call(self) -> bool:
        """Whether this ``step()`` is torch.distributed.checkpoint's way to make an optimizer's state before
        it reads or loads a state dict (get/set_optimizer_state_dict, when ``.state`` is empty): every
        group's lr set to 0 and every grad zero-filled. A SAM step there would run no closure, and the base
        optimizer's step with zero grads would still decay momentum and count an Adam step."""
        if getattr(self, "found_inf", None) is not None or not self.next_pass_at_w:
            return False
        if not all(_is_zero_lr(g["lr"]) for g in self.param_groups):
            return False
        grads = [p.grad for p in self._params() if p.grad is not None]
        return bool(grads) and not any(_passes.nonzero(grads))

    @torch.no_grad()
    def _init_state(self) -> None:
        """The state a checkpoint loads into, changing nothing a step would see: the base optimizer's
        state, made by its own step as torch's helpers do (only when it has none: with zero grads that step
        still decays momentum), and the method's saved buffers, zero-filled and marked so that the first
        step still treats their parameters as new."""
        if not self.base_optimizer.state:
            self.base_optimizer.step()
        for p in self._params():
            st = self.state[p]
            for k in self._saved_buffers:
                if p.grad is not None and k not in st:
                    st[k] = self._zero_buffer(p, k)
                    st[_buckets.UNSTARTED] = True
        self._plan = None

    def _raise_no_closure(self):
        if getattr(self, "found_inf", None) is not None:  # GradScaler.step called step() without a first_step
            raise RuntimeError(
                f"GradScaler.step called {type(self).__name__}.step() with no closure and no first_step(): the "
                "later passes of the step cannot run. Begin the step with first_step(zero_grad=True, "
                "grad_scaler=scaler) and run the later passes before scaler.step(opt) (README, \"Mixed "
                "precision\"). Under PyTorch Lightning, precision=\"16-mixed\" runs the closure outside the "
                "optimizer: use precision=\"bf16-mixed\" or \"32-true\", or manual optimization")
        raise RuntimeError(f"{type(self).__name__}.step() needs a closure that runs forward and backward; "
                           f"or call {self._explicit_steps} yourself")

    @contextlib.contextmanager
    def _abandoned_on_error(self) -> Iterator[None]:
        """If the block raises, restores w and drops the step under way, then lets the error propagate."""
        try:
            yield
        except BaseException:
            self._abandon_step()
            raise

    def _abandon_step(self) -> None:
        perturbed, self._perturbed, self._gate = self._perturbed, None, None
        restore_w(perturbed or [])

    # ---- a perturbation made outside the optimizer (fastsam.distributed's m-sharpness under FSDP2) ------
    def _perturbation_made_elsewhere(self) -> None:
        """The coming ``first_step`` leaves every parameter where it is and needs no grads: the caller has
        made the perturbation where the later passes see the weights (each rank's own w + e in FSDP2's
        unsharded parameters). ``second_step`` then updates w with the grads of the last pass, with nothing
        to restore."""
        self._moved_elsewhere = True

    @property
    def _step_perturbed_elsewhere(self) -> bool:
        """Whether the step under way was begun with its perturbation made elsewhere."""
        return self._perturbed is _PERTURBED_ELSEWHERE

    def _twin(self, param_groups: List[dict]) -> "SAM":
        """This method's perturbation over other tensors (e.g. a rank's full copy of sharded parameters), for
        its ``first_step`` only: ``param_groups`` are groups like this optimizer's whose "params" (and
        "param_names") are the other tensors; their method options are kept, the rest dropped. The base
        optimizer is a plain SGD that is never stepped. Made by :attr:`_twin_class`, whose constructor must
        do nothing but ``_init_sam`` with options kept in the groups (SAM, ASAM)."""
        options = self._method_options
        kept = options | {"params", "param_names"}
        groups = [{k: v for k, v in g.items() if k in kept} for g in param_groups]
        cls = self._twin_class
        twin = cls.__new__(cls)
        twin._init_sam(groups, torch.optim.SGD, self.impl, {k: self.defaults[k] for k in options}, dict(lr=0.0))
        return twin

    @property
    def _method_options(self) -> set:
        """The group options of the method (rho, ...), as opposed to the base optimizer's."""
        return set(self.defaults) - set(self.base_optimizer.defaults)

    @property
    def _twin_class(self) -> type:
        return type(self)

    # The twin's per-parameter buffers that carry over from step to step, and the state keys of this
    # optimizer that keep them for each rank (e.g. Friendly SAM's EMA of a rank's own grads).
    _per_rank_buffers: Dict[str, str] = {}

    def _zero_buffer(self, p: Tensor, key: str) -> Tensor:
        """A zero-filled method buffer ``key`` for parameter ``p`` (laid out like ``p``)."""
        return torch.zeros_like(p, memory_format=torch.contiguous_format)

    # ---- where a step stands (for loops that treat the passes differently, e.g. fastsam.distributed) --
    @property
    def next_pass_at_w(self) -> bool:
        """True when no step is under way: the next forward/backward pass is the one at w."""
        return self._perturbed is None

    @property
    def update_uses_grad_at_w(self) -> bool:
        """Whether the base update of the coming step uses the grad of the pass at w, not only the
        perturbation does (under DDP that pass must then be all-reduced): the base optimizer's one-pass step, and
        every step of a method whose update uses it."""
        return self._update_uses_g0 or not self.sharpness_active

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The base optimizer's state dict, in torch's layout, with the method's own state inside it:

        - every param group gets the key "fastsam": {"method": the method (:meth:`_method_name`), and the
          method's counters (``steps_done``, which ``interval`` and LastSAM's switch count on; ``skipped_steps``
          once a step was gated)}; the
          group also holds the method's options (rho, ...), which the groups share with the base;
        - a parameter's entry under "state" gets the method's own buffers under keys prefixed "fastsam_"
          (Friendly SAM's EMA: "fastsam_ema"), laid out like the parameter (a DTensor for FSDP2).

        Nothing lives outside "state" and "param_groups", so ``torch.distributed.checkpoint``'s
        get/set_optimizer_state_dict keep all of it. Backups and grad copies are scratch space within a
        step and are not saved: a state dict taken between whole steps resumes bit for bit, also in a new
        process (on another impl: to rounding)."""
        state_dict = self.base_optimizer.state_dict()
        state = state_dict["state"]
        for i, p in enumerate(self._params()):
            own = {BUFFER_PREFIX + k: self.state[p][k] for k in self._saved_buffers if k in self.state[p]}
            if own:  # a new dict: the base's entries are its live per-parameter state
                state[i] = {**state.get(i, {}), **own}
        counters = dict(method=self._method_name(), **self._own_counters())
        for group in state_dict["param_groups"]:
            group[OWN_KEY] = dict(counters)
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state dict of the same method (also one that went through torch.distributed.checkpoint,
        keyed by parameter names), or a base optimizer's (no "fastsam" entries): then the method options it
        lacks keep their current values and the method's own state starts afresh, as in a new optimizer.
        The method's state is replaced, never merged with what this optimizer had. State dicts of earlier
        fastsam versions (a top-level "fastsam" key) load too.

        Raises ValueError for a state dict of another method (its options and state mean something
        else there), before anything is changed."""
        groups = state_dict["param_groups"]
        legacy = state_dict.get(OWN_KEY)  # earlier fastsam: {"method", "state" by index, counters}
        own = legacy if legacy is not None else next((g[OWN_KEY] for g in groups if OWN_KEY in g), None)
        if own is not None and own.get("method") != self._method_name():
            raise ValueError(f"state_dict was saved by {own.get('method')!r}; this optimizer is "
                             f"{self._method_name()!r}")
        # The saved ids of the parameters (indices, or names after a distributed checkpoint), in order.
        saved_ids = [i for g in groups for i in g["params"]]
        if legacy is not None:
            buffers = {saved_ids[int(i)]: s for i, s in legacy.get("state", {}).items()}
        else:
            buffers = {i: {k[len(BUFFER_PREFIX):]: v for k, v in s.items() if k.startswith(BUFFER_PREFIX)}
                       for i, s in state_dict["state"].items()}
        base_dict = {"state": {i: {k: v for k, v in s.items() if not k.startswith(BUFFER_PREFIX)}
                               for i, s in state_dict["state"].items()},
                     "param_groups": [{k: v for k, v in g.items() if k != OWN_KEY} for g in groups]}
        current = self.param_groups
        self.base_optimizer.load_state_dict(base_dict)
        self.param_groups = self.base_optimizer.param_groups  # re-link: the base made new group dicts
        method_options = self._method_options
        for old, new in zip(current, self.param_groups):
            for k in method_options & set(old):
                new.setdefault(k, old[k])
        self._plan = None
        self._perturbed = None
        self.state.clear()  # buffers are made again at the next step; the saved ones are loaded below
        by_id = dict(zip(saved_ids, self._params()))
        for i, saved in buffers.items():
            p = by_id[i]
            for k, v in saved.items():
                self.state[p][k] = v.detach().to(device=p.device, dtype=p.dtype, copy=True).contiguous()
        self._load_own_counters(own or {})

    def _method_name(self) -> str:
        """The method a state dict belongs to: a state dict loads only into the same method."""
        return type(self).__name__

    def _own_counters(self) -> dict:
        """The method's counters, saved in every param group's "fastsam" entry."""
        counters = {"steps_done": self.steps_done}
        return counters if self._skipped is None else dict(counters, skipped_steps=self.skipped_steps)

    def _load_own_counters(self, own: dict) -> None:
        """Loads the counters of a "fastsam" entry ({} for a base optimizer's state dict)."""
        self.steps_done = int(own.get("steps_done", 0))
        skipped = own.get("skipped_steps")
        self._skipped = None if skipped is None else torch.tensor([float(skipped)])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)
        if set_to_none:
            self._ledger.cleared()
        else:
            self._ledger.mark(self._params(), zeroed=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(impl={self.impl!r}, base_optimizer={self.base_optimizer!r})"


# What a step's first_step leaves in ``_perturbed`` when the perturbation was made elsewhere (never appended to).
_PERTURBED_ELSEWHERE: List[_buckets.Bucket] = []

# Where a state dict holds the method's own state (see SAM.state_dict).
OWN_KEY = "fastsam"
BUFFER_PREFIX = "fastsam_"


def restore_w(buckets: List[_buckets.Bucket]) -> None:
    """Every perturbed parameter of ``buckets`` back to w, exactly (from its backup)."""
    for b in buckets:
        if b.perturbed:
            ops.restore_(params=b.params, backups=b.backups, impl=b.impl)
    weights_moved()


def weights_moved() -> None:
    """Drops autocast's cache of low-precision copies of the weights. The cache is keyed by the parameter, not
    its values, and lives until the outermost autocast block ends: a step run inside one (``with autocast():
    opt.step(closure)``) would otherwise evaluate w + e with the copies made at w."""
    if not torch.compiler.is_compiling():
        torch.clear_autocast_cache()


def _is_zero_lr(lr) -> bool:
    """Whether ``lr`` is 0, read on the host only where that costs no device sync: torch's checkpoint helpers
    set a tensor lr to a CPU ``torch.tensor(0.0)``, so an lr on another device is not theirs."""
    if isinstance(lr, Tensor):
        return lr.device.type == "cpu" and lr.item() == 0
    return lr == 0


def _any_found(gate: _gate.Gate) -> bool:
    """Whether the step's found flag is set (a host read: only where torch's own step or the raise policy
    needs it)."""
    return bool(next(iter(gate.found.values())).item())


def _ema_update(ema: List[Tensor], grads: List[Tensor], lmbda: float, amp: Optional[ops.AmpArgs] = None) -> None:
    """``m <- lmbda m + (1 - lmbda) g`` (``m <- g`` for ``lmbda = 0``) outside a fused perturb; ``g``
    unscaled by ``amp.inv_scale``, and ``m`` kept when ``amp.found_inf`` is set (see reference.perturb_)."""
    inv_scale, found_inf = amp or (None, None)
    if inv_scale is None and found_inf is None:
        if lmbda == 0:
            torch._foreach_copy_(ema, grads)
        else:
            torch._foreach_mul_(ema, lmbda)
            torch._foreach_add_(ema, grads, alpha=1 - lmbda)
        return
    g = [upcast(t) for t in grads] if inv_scale is None else torch._foreach_mul([upcast(t) for t in grads], inv_scale)
    new = g if lmbda == 0 else torch._foreach_add(torch._foreach_mul([upcast(m) for m in ema], lmbda), g,
                                                  alpha=1 - lmbda)
    skip = found_inf.reshape(()) != 0 if found_inf is not None else torch.zeros((), dtype=torch.bool)
    for m, n in zip(ema, new):
        m.copy_(torch.where(skip.to(m.device), m, n.to(m.dtype)))


def _combine_into_grads(bucket: _buckets.Bucket, grads_b: List[Tensor], grads_c: List[Tensor], coef: Tensor) -> None:
    """``p.grad <- coef[0] p.grad + coef[1] g_b + coef[2] g_c`` for the base optimizer's own step (the
    generic path); parameters without a grad in the last pass keep none. Summed in fp32 and rounded once
    into ``.grad``, like the fused kernels (fp16/bf16 partial sums would add a rounding per term)."""
    every = bucket.grads()
    idx = with_grad(every)
    grads = take(every, idx)
    if not grads:
        return
    # fp32 and fp64 grads are summed in place; only fp16/bf16 ones get an fp32 copy.
    total = [upcast(g) for g in grads]
    torch._foreach_mul_(total, coef[0])
    for k, more in ((1, grads_b), (2, grads_c)):
        if more:
            torch._foreach_add_(total, torch._foreach_mul([upcast(m) for m in take(more, idx)], coef[k]))
    low = [i for i, (g, t) in enumerate(zip(grads, total)) if t is not g]
    if low:
        torch._foreach_copy_(take(grads, low), take(total, low))
