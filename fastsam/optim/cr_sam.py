"""CR-SAM (Wu et al., AAAI 2024): SAM with a curvature regularizer from finite differences at w +- e."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

import fastsam.ops as ops
from fastsam.optim import _buckets, _sharding
from fastsam.optim.sam import SAM, Combination, _check_nonneg, _check_number, restore_w, weights_moved

_MODES = ("authors", "paper")
_EPS_LOSS = 1e-12  # keeps the paper mode's loss differences away from zero


class CRSAM(SAM):
    r"""Curvature-regularized SAM: three forward/backward passes per step.

    With :math:`v = g_0 / (\lVert g_0 \rVert_2 + 10^{-12})` from the grad at :math:`w` and
    :math:`e = \rho v`, the passes give :math:`g_0` at :math:`w`, :math:`g_+` at :math:`w + e` and
    :math:`g_-` at :math:`w - e`; then :math:`w` is restored and the base optimizer steps with

    .. math::
        g = g_+ + a\,(g_+ + g_- - 2 g_0) + b\,(g_+ - g_-)

    ``mode="authors"`` (the authors' code): :math:`a = \gamma`, :math:`b = \beta`.
    ``mode="paper"`` (the gradient of :math:`R_c = \gamma \log \mathrm{Tr}(H) + \beta \log \lVert g \rVert`
    by finite differences): :math:`a = \gamma / (L_+ + L_- - 2 L_0)`, :math:`b = \beta / (L_+ - L_-)`,
    from the three losses (computed on the device; a difference closer to zero than 1e-12 is taken as
    :math:`\pm 10^{-12}`).

    ``first_step`` backs up :math:`w`, keeps :math:`g_0` and moves to :math:`w + e` (one fused pass);
    ``second_step`` moves to :math:`w - e` = backup :math:`- e` and keeps :math:`g_+` (one fused pass);
    ``third_step`` restores :math:`w` exactly and runs the base step with the combined grad (one fused
    kernel for SGD, Adam and AdamW). Groups with ``rho=0`` or ``perturb=False`` are not moved; their
    grads still enter the combination.

    Args:
        params, base_optimizer, impl, nonfinite, **base_kwargs: as for :class:`fastsam.SAM`.
        rho: radius (default 0.1). gamma: curvature (trace) weight (default 0.1). beta: gradient-norm
            weight (default 0.1; the authors' training script uses 0.01). mode: "authors" or "paper".

    Example::

        opt = fastsam.CRSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
        loss0 = loss_fn(model(x), y); loss0.backward()
        opt.first_step(zero_grad=True)
        with fastsam.utils.frozen_bn_stats(model):
            loss_plus = loss_fn(model(x), y); loss_plus.backward()
            opt.second_step(zero_grad=True)
            loss_minus = loss_fn(model(x), y); loss_minus.backward()
        opt.third_step(zero_grad=True, losses=(loss0, loss_plus, loss_minus))  # losses: paper mode only
    """

    _buffers = ("grad0", "grad_plus")
    _update_uses_g0 = True  # g0 enters the combined grad

    def __init__(self, params, base_optimizer, rho: float = 0.1, gamma: float = 0.1, beta: float = 0.1,
                 mode: str = "authors", impl: str = "auto", nonfinite: Optional[str] = None, **base_kwargs):
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.mode = mode
        self.gamma = _check_number("gamma", gamma)
        self.beta = _check_number("beta", beta)
        self._coef: Dict[torch.device, Tensor] = {}
        self._coef_key: Dict[torch.device, tuple] = {}
        self._moved: Optional[List[_buckets.Bucket]] = None  # buckets at w - e, between second and third step
        defaults = dict(rho=_check_nonneg("rho", rho), adaptive=False, p=2.0, perturb=True)
        self._init_sam(params, base_optimizer, impl, defaults, base_kwargs, nonfinite)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        if group["adaptive"] or group["p"] != 2:
            raise ValueError("CRSAM supports adaptive=False and p=2 only")

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Keep g+ and move from w + e to w - e (computed from the backup, so w comes back exactly)."""
        buckets = self._take_perturbed("second_step", "first_step")
        if any(g is None for b in buckets for g in b.grads()):
            restore_w(buckets)  # not left at w + e
            raise RuntimeError("CRSAM: every parameter that had a grad at w needs one at w + e (w was restored)")
        gate = self._gate
        if gate is not None:  # g+ joins the step's found flag before w - e is computed from it
            self._flag_pass(gate, buckets)
        for b in buckets:
            grads, copies = b.grads(), b.buffers["grad_plus"]
            amp = gate.on(b.params[0].device) if gate else None
            if b.perturbed:
                ops.reflect_(params=b.params, backups=b.backups, dirs=b.buffers["grad0"],
                             norm_sq=self._norm_sq[b.params[0].device], rho=b.group["rho"], eps=self._eps_norm,
                             grads=grads, grad_copies=copies, amp=amp, impl=b.impl)
            elif amp is not None and amp.inv_scale is not None:
                torch._foreach_copy_(copies, torch._foreach_mul([g.float() for g in grads], amp.inv_scale))
            else:
                torch._foreach_copy_(copies, grads)
        self._moved = buckets
        weights_moved()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def third_step(self, zero_grad: bool = False, losses: Optional[Sequence] = None) -> None:
        """Restore w exactly and step the base optimizer with the combined grad. ``losses`` = (L0, L+, L-)
        (tensors or numbers) is required in paper mode and ignored in authors mode.

        The fused update forms the combined grad on the fly and leaves ``.grad`` (g-) as it is; the generic
        path (other base optimizers, impl="torch") writes it into ``.grad`` for ``base_optimizer.step()``.
        Either way ``.grad`` is spent: zero it before the next first pass."""
        buckets, self._moved = self._moved, None
        if buckets is None:
            raise RuntimeError("third_step() called without a second_step() before it")
        devices = {b.params[0].device for b in buckets}
        if self.mode == "paper":
            if losses is None or len(losses) != 3:
                raise ValueError("CRSAM(mode='paper').third_step needs losses=(loss at w, at w + e, at w - e)")
            self._paper_coefficients(buckets, devices, losses)
        else:
            a, b = self.gamma, self.beta
            for d in devices:  # made again only when gamma or beta changed: no host-to-device copy per step
                if self._coef_key.get(d) != (a, b):
                    self._coef[d] = torch.tensor([a - b, 1 + a + b, -2 * a], dtype=torch.float32, device=d)
                    self._coef_key[d] = (a, b)
        self._update(buckets)
        if zero_grad:
            self.zero_grad()

    def _paper_coefficients(self, buckets, devices, losses) -> None:
        """(a - b, 1 + a + b, -2a) with a = gamma / (L+ + L- - 2 L0), b = beta / (L+ - L-), on the device.
        With sharded (FSDP2) parameters, each loss is first averaged over the ranks (one all-reduce): the
        ranks' grads are averaged too, and every rank must take the same coefficients."""
        device = next(iter(devices))
        values = torch.stack([torch.as_tensor(x).detach().float().reshape(()).to(device) for x in losses])
        # The parameters of a bucket share their mesh: one per bucket tells them all.
        groups = _sharding.data_parallel_groups(b.keys()[0] for b in buckets)
        values = _sharding.mean_over_ranks(values, groups)
        l0, lp, lm = values
        diffs = torch.stack([lp + lm - 2 * l0, lp - lm])
        tiny = torch.full_like(diffs, _EPS_LOSS).copysign(diffs)
        diffs = torch.where(diffs.abs() < _EPS_LOSS, tiny, diffs)
        inv = diffs.reciprocal()  # scalars from the host only as Python numbers: no copy, no sync
        a, b = inv[0] * self.gamma, inv[1] * self.beta
        coef = torch.stack([a - b, 1 + a + b, -2 * a])
        for d in devices:
            self._coef[d] = coef.to(d, non_blocking=True)
            self._coef_key[d] = None

    def _combination(self, buckets: List[_buckets.Bucket], inv=None, fused: bool = True) -> Combination:
        # The last pass's grad is g-; grads_b = g+, grads_c = g0.
        return (lambda b: (b.buffers["grad_plus"], b.buffers["grad0"])), self._coef

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None, losses: Optional[Sequence] = None):
        """A whole CR-SAM step: ``closure`` runs forward and backward at the current point and returns the
        loss. The contract is :meth:`SAM.step`'s: three closure calls, or two when the caller ran the
        backward at w itself (davda54's style), except in paper mode, which needs the loss at w and so
        runs the closure at w again then (with BatchNorm statistics frozen: the caller's pass updated them).
        Returns the loss at w when this call computed it, otherwise the loss at w + e.

        Without a closure, after ``second_step``: the third step (what ``scaler.step(opt, losses=...)``
        calls; ``losses`` as for :meth:`third_step`)."""
        if closure is None and self._moved is not None:
            self.third_step(losses=losses)
            return None
        if closure is None:
            self._step_without_closure()
            return None
        if not self.sharpness_active:
            return self._plain_step(closure)
        passes = self._closure_passes(closure)
        with self._abandoned_on_error():
            loss0 = self._pass_at_w(passes) if self.mode == "paper" or not passes.calls else None
            self.first_step(zero_grad=True)
            loss_plus = passes()
            self.second_step(zero_grad=True)
            loss_minus = passes()
            self.third_step(losses=(loss0, loss_plus, loss_minus) if self.mode == "paper" else None)
        return loss_plus if loss0 is None else loss0

    _explicit_steps = "first_step(), second_step() and third_step()"

    def _finish_hint(self) -> str:
        return "second_step() and third_step(), or scaler.step(opt) after first_step(grad_scaler=scaler)"

    def _abandon_step(self) -> None:
        moved, self._moved = self._moved, None
        restore_w(moved or [])  # from w - e
        super()._abandon_step()

    @property
    def next_pass_at_w(self) -> bool:
        return super().next_pass_at_w and self._moved is None

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._moved = None
