"""LastSAM (Zhang): the base optimizer alone first, SAM or ASAM for the last steps; optionally orthogonal."""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import Tensor

import fastsam.ops as ops
from fastsam.optim import _buckets, _sharding
from fastsam.optim._buckets import take, with_grad
from fastsam.optim.asam import ASAM, _check_normalization, check_asam_group
from fastsam.optim.sam import SAM, Combination, _check_bool, _check_nonneg, _check_p

_SHARPNESS = ("asam", "sam")
_EPS_ORTHO = 1e-12  # in ||g||^2 + eps of the projection


class LastSAM(SAM):
    r"""The base optimizer alone until ``switch_at``, then SAM or ASAM (one pass per step, then two).

    Before the switch a step is the base optimizer's step (its state carries over into the SAM
    phase); from step ``switch_at`` on, it is a :class:`fastsam.SAM` (``sharpness="sam"``) or
    :class:`fastsam.ASAM` (``sharpness="asam"``) step with the same options. ``sharpness_active`` tells
    an explicit training loop which one to run; ``step(closure)`` runs one or two passes by itself.

    ``orthogonal=True`` (the paper's orthogonal variant) keeps the grad :math:`g` of the first pass
    (copied in the fused perturb pass) and steps with the sharpness grad projected onto the
    complement of :math:`g`, over all parameters at once:

    .. math::
        g_\perp = g_{\text{SAM}} - \frac{g_{\text{SAM}} \cdot g}{\lVert g \rVert_2^2 + 10^{-12}}\, g

    The dot product and the norm are one fused on-device reduction; the projection runs inside the
    fused restore + update kernel (no host sync), which leaves ``.grad`` as it is (the generic path for
    other base optimizers writes :math:`g_\perp` into ``.grad``).

    Args:
        params, base_optimizer, impl, nonfinite: as for :class:`fastsam.SAM`.
        switch_at: the step (count of completed steps, an int >= 0) at which the sharpness phase
            starts, or a float in (0, 1): that fraction of ``total_steps`` (rounded down).
        sharpness: "asam" (default) or "sam".
        orthogonal: project the sharpness grad as above.
        rho: radius; None takes the method's default (0.5 for ASAM, 0.05 for SAM).
        total_steps: the planned number of steps, required when ``switch_at`` is a fraction.
        **kwargs: the sharpness method's options (ASAM: ``eta``, ``normalization``, ``p``; SAM:
            ``adaptive``, ``p``); the rest go to the base optimizer.

    Example::

        opt = fastsam.LastSAM(model.named_parameters(), torch.optim.SGD, switch_at=0.66, total_steps=n,
                              lr=0.1, momentum=0.9)
        for x, y in batches:
            def closure():
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss
            opt.step(closure)  # one pass before the switch, two after
            opt.zero_grad()
    """

    def __init__(self, params, base_optimizer, switch_at, sharpness: str = "asam", orthogonal: bool = False,
                 rho: Optional[float] = None, impl: str = "auto", total_steps: Optional[int] = None,
                 nonfinite: Optional[str] = None, **kwargs):
        if sharpness not in _SHARPNESS:
            raise ValueError(f"sharpness must be one of {_SHARPNESS}, got {sharpness!r}")
        self.sharpness = sharpness
        self.orthogonal = _check_bool("orthogonal", orthogonal)
        self._update_uses_g0 = self.orthogonal  # the orthogonal projection uses the grad at w
        self.switch_step = _switch_step(switch_at, total_steps)
        self._dot: Dict[torch.device, Tensor] = {}
        self._coef: Dict[torch.device, Tensor] = {}
        asam = sharpness == "asam"
        rho = (0.5 if asam else 0.05) if rho is None else rho
        defaults = dict(rho=_check_nonneg("rho", rho), p=_check_p(kwargs.pop("p", 2)), perturb=True)
        if asam:
            defaults.update(eta=_check_nonneg("eta", kwargs.pop("eta", 0.01)), normalize=True,
                            normalization=_check_normalization(kwargs.pop("normalization", "elementwise")))
        else:
            defaults.update(adaptive=bool(kwargs.pop("adaptive", False)))
        self._method = ASAM if asam else SAM
        self._eps_norm = self._method._eps_norm
        self._operator_options = self._method._operator_options
        self._buffers = ("grad0",) if self.orthogonal else ()
        self._init_sam(params, base_optimizer, impl, defaults, kwargs, nonfinite)

    # The operator T and the group checks are those of the sharpness method.
    def _operator(self, p: Tensor, name: Optional[str], group: dict):
        return self._method._operator(self, p, name, group)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        if self._method is ASAM:
            check_asam_group(group)

    @property
    def _twin_class(self) -> type:
        return self._method  # the perturbation is SAM's or ASAM's, with the same group options

    @property
    def sharpness_active(self) -> bool:
        """True from step ``switch_at`` on (every ``interval``-th step from there): such a step takes two
        forward/backward passes."""
        return self.steps_done >= self.switch_step and (self.steps_done - self.switch_step) % self.interval == 0

    def _phase(self) -> str:
        return f"the switch at step {self.switch_step}, {super()._phase()}"

    def _combination(self, buckets: List[_buckets.Bucket], inv=None, fused: bool = True) -> Optional[Combination]:
        if not self.orthogonal or not self.sharpness_active:
            return None
        # coef = (1, -(g_sam . g) / (||g||^2 + eps), 0), from one fused reduction over all buckets.
        dots = _sharding.zeroed(self._dot, {b.scope for b in buckets}, 2)
        for b in buckets:
            grads = b.grads()
            # A parameter without a grad in this pass takes no step: it is left out of the projection too.
            idx = with_grad(grads)
            ops.dot_norm_sq_(acc=dots[b.scope], a=take(grads, idx), b=take(b.buffers["grad0"], idx), impl=b.impl)
        for d, acc in _sharding.global_sums(dots).items():
            if d not in self._coef:
                self._coef[d] = torch.tensor([1.0, 0.0, 0.0], device=d)
            c = self._coef[d][1:2]  # written in place: no allocation per step
            torch.add(acc[1:2], _EPS_ORTHO, out=c)
            torch.div(acc[0:1], c, out=c)
            c.neg_()
            if inv is not None:  # g_sam is still scaled (the kernel unscales it), g was kept unscaled
                c.mul_(inv[d])
        return (lambda b: (b.buffers["grad0"], [])), self._coef

    @torch.no_grad()
    def _method_name(self) -> str:
        # The sharpness method decides the group options (eta, normalization or adaptive).
        return f"LastSAM({self.sharpness})"

    def __repr__(self) -> str:
        return (f"LastSAM(sharpness={self.sharpness!r}, switch_step={self.switch_step}, "
                f"orthogonal={self.orthogonal}, impl={self.impl!r}, base_optimizer={self.base_optimizer!r})")


def _switch_step(switch_at, total_steps) -> int:
    if isinstance(switch_at, bool) or not isinstance(switch_at, (int, float)):
        raise TypeError(f"switch_at must be an int (a step) or a float in (0, 1), got {switch_at!r}")
    if isinstance(switch_at, int):
        if switch_at < 0:
            raise ValueError(f"switch_at must be >= 0, got {switch_at}")
        return switch_at
    if not 0.0 < switch_at < 1.0:
        raise ValueError(f"a float switch_at is a fraction of total_steps and must be in (0, 1), got {switch_at}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
        raise ValueError(f"switch_at={switch_at} is a fraction: total_steps (an int > 0) is required, "
                         f"got {total_steps!r}")
    return math.floor(switch_at * total_steps)
