"""Loop and foreach peers of Friendly SAM, CR-SAM and LastSAM's sharpness phase (ASAM or SAM, orthogonal or not).

Same two styles as :mod:`fastsam.bench.peers`, whose classes these extend:

* ``Loop*``: the published algorithm per parameter, as its authors' PyTorch code is written: fresh clones
  every step, the restore by rebinding ``p.data`` (CR-SAM: by adding and subtracting e, as its authors do),
  and the base optimizer's own step (SGD with ``foreach=False``).
* ``Foreach*``: the same math with ``torch._foreach_*`` ops and buffers made once, over SGD(foreach=True).

The math is that of fastsam's optimizers (docs/design.md section 2); tests/test_bench_peers.py checks that the peers
and every available fastsam impl end a few steps at the same parameters. Unlike the authors' Friendly SAM code,
the peers never write into ``.grad`` before the base step: the benchmark gives each pass the same grad tensors.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastsam.bench.peers import ForeachSAM, LoopSAM, add_scaled_

ORTHO_EPS = 1e-12  # LastSAM's projection: g_sam - (g_sam . g) / (||g||^2 + eps) g
ASAM_EPS = 1e-16  # ASAM's official epsilon, added to the norm


# ---- Friendly SAM --------------------------------------------------------------------------------------------
class LoopFriendlySAM(LoopSAM):
    """Friendly SAM per parameter: at a parameter's first step ``d = g`` and ``m = g``; later
    ``d = g - sigma m`` and ``m <- lmbda m + (1 - lmbda) g`` (the EMA of the raw grad), each a new tensor;
    then SAM's move along d."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, sigma: float = 1.0, lmbda: float = 0.9,
                 adaptive: bool = False, **kwargs):
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kwargs)
        self.sigma, self.lmbda = sigma, lmbda

    def _direction(self, group, p):
        state, g = self.state[p], p.grad
        m = state.get("ema")
        if m is None:
            state["ema"] = g.clone()
            return g
        state["ema"] = m * self.lmbda + g * (1 - self.lmbda)
        return g - m * self.sigma


class ForeachFriendlySAM(ForeachSAM):
    """Friendly SAM on foreach ops: the EMA buffers are made once; ``d = g - sigma m`` is one foreach op (a
    temporary: the norm needs d whole before the move), the EMA update one ``lerp_``."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, sigma: float = 1.0, lmbda: float = 0.9,
                 adaptive: bool = False, **kwargs):
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kwargs)
        self.sigma, self.lmbda = sigma, lmbda

    def _directions(self, group, ps, grads):
        seen = [i for i, p in enumerate(ps) if "ema" in self.state[p]]
        emas = [self._buffer(p, "ema") for p in ps]
        if len(seen) == len(ps):  # the steady state: one call per op
            dirs = torch._foreach_add(grads, emas, alpha=-self.sigma)
            torch._foreach_lerp_(emas, grads, 1 - self.lmbda)
            return dirs
        dirs, new = list(grads), sorted(set(range(len(ps))) - set(seen))
        if seen:
            old_g, old_m = [grads[i] for i in seen], [emas[i] for i in seen]
            for i, d in zip(seen, torch._foreach_add(old_g, old_m, alpha=-self.sigma)):
                dirs[i] = d
            torch._foreach_lerp_(old_m, old_g, 1 - self.lmbda)
        torch._foreach_copy_([emas[i] for i in new], [grads[i] for i in new])  # first step: m = g, d = g
        return dirs


# ---- CR-SAM (mode "authors") -----------------------------------------------------------------------------------
def _crsam_init(opt, gamma: float, beta: float) -> None:
    opt.gamma, opt.beta = gamma, beta
    for group in opt.param_groups:
        if group["adaptive"]:
            raise ValueError("CR-SAM peers: adaptive=False only")


class LoopCRSAM(LoopSAM):
    """CR-SAM in its authors' style: every pass clones the grads, e = rho g0 / (||g0|| + 1e-12) is kept,
    the parameters go w -> w + e -> w - e -> w by adding and subtracting e, and the base optimizer steps with
    ``g+ + gamma (g+ + g- - 2 g0) + beta (g+ - g-)`` written into ``p.grad``.
    A step is ``first_step``, ``second_step``, ``third_step`` (a forward/backward before each)."""

    def __init__(self, params, base_optimizer, rho: float = 0.1, gamma: float = 0.1, beta: float = 0.1, **kwargs):
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        _crsam_init(self, gamma, beta)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Keeps g0 and moves to w + e."""
        pairs = self._pairs_with_grad()
        total = self._global_norm([p.grad for _, p in pairs])
        for group, p in pairs:
            state = self.state[p]
            state["g0"] = p.grad.clone()
            state["e"] = p.grad * (group["rho"] / (total + self.eps)).to(p)
            p.add_(state["e"])
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Keeps g+ and moves from w + e to w - e."""
        for _, p in self._pairs_with_grad():
            self.state[p]["g_plus"] = p.grad.clone()
            p.sub_(self.state[p]["e"] * 2)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def third_step(self, zero_grad: bool = False) -> None:
        """Keeps g-, moves back to w and lets the base optimizer step with the combined grad."""
        pairs = self._pairs_with_grad()
        for _, p in pairs:
            self.state[p]["g_minus"] = p.grad.clone()
            p.add_(self.state[p]["e"])
        for _, p in pairs:
            state = self.state[p]
            g_plus, g_minus = state["g_plus"], state["g_minus"]
            p.grad = (g_plus + self.gamma * (g_plus + g_minus - 2 * state["g0"])
                      + self.beta * (g_plus - g_minus))
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


class ForeachCRSAM(ForeachSAM):
    """CR-SAM on foreach ops: g0 and g+ copied into buffers made once, the moves w + e, w - e, w as scaled
    adds of g0 (as the loop does: no backup), and the combination ``(a - b) g- + (1 + a + b) g+ - 2a g0``
    (a = gamma, b = beta) written into ``p.grad`` in place. The step's scale ``rho / (||g0|| + eps)`` is kept
    in each moved parameter's state (see ForeachSAM: nothing on the optimizer's own attributes)."""

    def __init__(self, params, base_optimizer, rho: float = 0.1, gamma: float = 0.1, beta: float = 0.1, **kwargs):
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        _crsam_init(self, gamma, beta)

    def _moved(self):
        """(params, g0 copies, scale) of each param group moved by this step's first_step."""
        for group in self.param_groups:
            ps = [p for p in self._with_grad(group) if "scale" in self.state[p]]
            if ps:
                yield ps, [self.state[p]["g0"] for p in ps], self.state[ps[0]]["scale"]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Copies g0 and moves to w + e."""
        groups = [(group, ps) for group in self.param_groups for ps in [self._with_grad(group)] if ps]
        norm = torch.linalg.vector_norm(
            torch.stack(torch._foreach_norm([p.grad for _, ps in groups for p in ps], 2)), 2)
        for group, ps in groups:
            grads, g0s = [p.grad for p in ps], [self._buffer(p, "g0") for p in ps]
            torch._foreach_copy_(g0s, grads)
            scale = group["rho"] / (norm + self.eps)
            add_scaled_(ps, grads, scale)
            for p in ps:
                self.state[p]["scale"] = scale
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Copies g+ and moves from w + e to w - e."""
        for ps, g0s, scale in self._moved():
            torch._foreach_copy_([self._buffer(p, "g_plus") for p in ps], [p.grad for p in ps])
            add_scaled_(ps, g0s, scale, -2.0)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def third_step(self, zero_grad: bool = False) -> None:
        """Moves back to w and lets the base optimizer step with the combined grad."""
        a, b = self.gamma, self.beta
        for ps, g0s, scale in self._moved():
            add_scaled_(ps, g0s, scale)
            grads = [p.grad for p in ps]
            torch._foreach_mul_(grads, a - b)
            torch._foreach_add_(grads, [self.state[p]["g_plus"] for p in ps], alpha=1 + a + b)
            torch._foreach_add_(grads, g0s, alpha=-2 * a)
            for p in ps:
                del self.state[p]["scale"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


# ---- LastSAM's sharpness phase ----------------------------------------------------------------------------------
def _lastsam_init(opt, sharpness: str, orthogonal: bool, eta: float) -> None:
    if sharpness not in ("asam", "sam"):
        raise ValueError(f"sharpness must be 'asam' or 'sam', got {sharpness!r}")
    opt.asam, opt.orthogonal, opt.eta = sharpness == "asam", orthogonal, eta
    if opt.asam:
        opt.eps = ASAM_EPS
        for group in opt.param_groups:
            group["adaptive"] = False  # ASAM's T replaces SAM's adaptive one


def _lastsam_rho(sharpness: str, rho: Optional[float]) -> float:
    return (0.5 if sharpness == "asam" else 0.05) if rho is None else rho


class LoopLastSAM(LoopSAM):
    """LastSAM after its switch: an ASAM step (T = |w| + eta on every parameter, eps 1e-16, as for unnamed
    parameters) or a SAM step, in davda54's loop style. ``orthogonal=True`` clones g at the first pass and
    projects the second pass's grad: ``g_sam - (g_sam . g) / (||g||^2 + 1e-12) g``, over all parameters."""

    def __init__(self, params, base_optimizer, sharpness: str = "asam", orthogonal: bool = False,
                 rho: Optional[float] = None, eta: float = 0.01, adaptive: bool = False, **kwargs):
        super().__init__(params, base_optimizer, rho=_lastsam_rho(sharpness, rho), adaptive=adaptive, **kwargs)
        _lastsam_init(self, sharpness, orthogonal, eta)

    def _operator(self, group, p):
        return p.abs() + self.eta if self.asam else super()._operator(group, p)

    def _direction(self, group, p):
        if self.orthogonal:
            self.state[p]["g0"] = p.grad.clone()
        return p.grad

    def _base_grads(self) -> None:
        if not self.orthogonal:
            return
        kept = [(p, self.state[p]["g0"]) for _, p in self._pairs_with_grad() if "g0" in self.state[p]]
        device = self.param_groups[0]["params"][0].device
        dot = torch.stack([(p.grad * g0).sum().to(device) for p, g0 in kept]).sum()
        norm_sq = torch.stack([(g0 * g0).sum().to(device) for _, g0 in kept]).sum()
        coef = dot / (norm_sq + ORTHO_EPS)
        for p, g0 in kept:
            p.grad.sub_(g0 * coef.to(p))


class ForeachLastSAM(ForeachSAM):
    """LoopLastSAM's math on foreach ops. The first-pass grads of the orthogonal variant go into buffers made
    once; the dot product is one ``torch.dot`` per tensor (stock PyTorch 2.4 has no foreach dot product, and
    ``_foreach_mul`` then a sum would add a step-sized temporary and a pass), ``||g||^2`` one foreach norm.
    A parameter whose g0 was copied this step is marked in its state (see ForeachSAM: nothing on the
    optimizer's own attributes)."""

    def __init__(self, params, base_optimizer, sharpness: str = "asam", orthogonal: bool = False,
                 rho: Optional[float] = None, eta: float = 0.01, adaptive: bool = False, **kwargs):
        super().__init__(params, base_optimizer, rho=_lastsam_rho(sharpness, rho), adaptive=adaptive, **kwargs)
        _lastsam_init(self, sharpness, orthogonal, eta)

    def _operators(self, group, ps):
        if not self.asam:
            return super()._operators(group, ps)
        ts = torch._foreach_abs(ps)
        torch._foreach_add_(ts, self.eta)
        return ts

    def _directions(self, group, ps, grads):
        if self.orthogonal:
            torch._foreach_copy_([self._buffer(p, "g0") for p in ps], grads)
            for p in ps:
                self.state[p]["kept"] = True
        return grads

    def _base_grads(self) -> None:
        if not self.orthogonal:
            return
        ps = [p for group in self.param_groups for p in group["params"] if self.state[p].pop("kept", False)]
        ps = [p for p in ps if p.grad is not None]
        grads, g0s = [p.grad for p in ps], [self.state[p]["g0"] for p in ps]
        dot = torch.stack([torch.dot(g.reshape(-1), g0.reshape(-1)) for g, g0 in zip(grads, g0s)]).sum()
        norm_sq = torch.stack(torch._foreach_norm(g0s, 2)).square().sum()
        add_scaled_(grads, g0s, dot / (norm_sq + ORTHO_EPS), -1.0)
