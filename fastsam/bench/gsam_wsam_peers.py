"""Loop and foreach peers of GSAM and WSAM (decoupled or coupled, no clipping), extending :mod:`fastsam.bench.peers`.

* ``Loop*``: the authors' code per parameter (juntang-zhuang/GSAM's gsam.py; atorch's WeightedSAM): a clone of
  the first-pass grad per parameter and step, sums and norms per tensor stacked into global ones, the combined
  grad written into ``p.grad``, the base optimizer's own step (SGD with ``foreach=False``). The restore is
  LoopSAM's (rebinding ``p.data`` to the copy of w; the authors subtract e: the same memory traffic).
* ``Foreach*``: the same math with ``torch._foreach_*`` ops and buffers made once, over SGD(foreach=True); the
  dot products are one ``torch.dot`` per tensor (no foreach dot product in stock PyTorch), the norms foreach norms.

The math is that of :class:`fastsam.GSAM` and :class:`fastsam.WSAM` (docs/design.md section 2);
tests/test_bench_peers.py checks that the peers and the fastsam impls end a few steps at the same parameters.
"""
from __future__ import annotations

from typing import List

import torch

from fastsam.bench.peers import ForeachSAM, LoopSAM

EPS = 1e-12  # GSAM's perturb_eps, in the cosine and the projection too


def kept_g0(opt, ps: List[torch.Tensor]) -> List[torch.Tensor]:
    """The first-pass grads ``opt`` kept for the parameters ``ps`` (state key "g0")."""
    return [opt.state[p]["g0"] for p in ps]


def flat_dot(a: List[torch.Tensor], b: List[torch.Tensor]) -> torch.Tensor:
    """``<a, b>`` over two lists of same-shaped tensors (0-dim): a ``torch.dot`` per pair, summed."""
    return torch.stack([torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b)]).sum()


def foreach_global_norm(ts: List[torch.Tensor]) -> torch.Tensor:
    """The 2-norm over all of ``ts`` (0-dim): foreach norms, then the norm of those."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(ts, 2)), 2)


class LoopKeepsG0(LoopSAM):
    """A loop peer whose update uses g0, the grad of the pass at w: cloned per parameter at the first step."""

    def _direction(self, group, p):
        self.state[p]["g0"] = p.grad.clone()
        return p.grad

    def _inner_with_g0(self):
        """The parameters with a grad, and ``<g0, g>`` over them: per tensor, stacked and summed."""
        ps = [p for _, p in self._pairs_with_grad()]
        device = ps[0].device
        return ps, torch.stack([(self.state[p]["g0"] * p.grad).sum().to(device) for p in ps]).sum()


class ForeachKeepsG0(ForeachSAM):
    """A foreach peer whose update uses g0: copied into buffers made once, at the first step."""

    def _directions(self, group, ps, grads):
        torch._foreach_copy_([self._buffer(p, "g0") for p in ps], grads)
        return grads


# ---- GSAM ----------------------------------------------------------------------------------------------------
class LoopGSAM(LoopKeepsG0):
    """GSAM as gsam.py writes it: g0 cloned at the first pass; then the inner product and both norms per tensor,
    ``cos = <g0, g1> / (||g1|| ||g0|| + eps)`` and ``p.grad += -alpha (g0 - cos ||g0|| g1 / (||g1|| + eps))``."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, alpha: float = 0.4, adaptive: bool = False,
                 **kwargs):
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kwargs)
        self.alpha = alpha

    def _base_grads(self) -> None:
        ps, inner = self._inner_with_g0()
        n1 = self._global_norm([p.grad for p in ps])
        n0 = self._global_norm(kept_g0(self, ps))
        cos = inner / (n1 * n0 + EPS)
        for p in ps:
            vertical = self.state[p]["g0"] - cos * n0 * p.grad / (n1 + EPS)
            p.grad.add_(vertical, alpha=-self.alpha)


class ForeachGSAM(ForeachKeepsG0):
    """LoopGSAM's math on foreach ops: g0 copied into buffers made once, ``g1 <- (1 + alpha cos ||g0|| /
    (||g1|| + eps)) g1 - alpha g0`` in place in ``p.grad``."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, alpha: float = 0.4, adaptive: bool = False,
                 **kwargs):
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kwargs)
        self.alpha = alpha

    def _base_grads(self) -> None:
        ps = [p for group in self.param_groups for p in self._with_grad(group)]
        grads, g0s = [p.grad for p in ps], kept_g0(self, ps)
        n1, n0 = foreach_global_norm(grads), foreach_global_norm(g0s)
        cos = flat_dot(g0s, grads) / (n1 * n0 + EPS)
        torch._foreach_mul_(grads, 1 + self.alpha * cos * n0 / (n1 + EPS))
        torch._foreach_add_(grads, g0s, alpha=-self.alpha)


# ---- WSAM ----------------------------------------------------------------------------------------------------
class LoopWSAM(LoopKeepsG0):
    """WSAM as atorch's WeightedSAM writes it (max_norm None): g0 cloned at the first pass; coupled, ``p.grad <-
    a g1 + (1 - a) g0``; decoupled, the sharpness ``g1 - g0`` cloned, ``p.grad <- g0``, the base step, then
    ``w -= lr a (g1 - g0)`` per parameter."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, gamma: float = 0.9, decouple: bool = True,
                 adaptive: bool = False, **kwargs):
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kwargs)
        self.weight, self.decouple = gamma / (1 - gamma), decouple

    def _base_grads(self) -> None:
        for _, p in self._pairs_with_grad():
            state = self.state[p]
            if self.decouple:
                state["sharpness"] = p.grad.clone() - state["g0"]
                p.grad.copy_(state["g0"])
            else:
                p.grad.mul_(self.weight).add_(state["g0"], alpha=1 - self.weight)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        super().second_step(zero_grad=False)
        if self.decouple:
            for group, p in self._pairs_with_grad():
                p.add_(self.state[p]["sharpness"], alpha=-group["lr"] * self.weight)
        if zero_grad:
            self.zero_grad()


class ForeachWSAM(ForeachKeepsG0):
    """LoopWSAM's math on foreach ops: g0 copied into buffers made once; coupled, ``g1 <- lerp(g1, g0, 1 - a)``
    in place; decoupled, ``g1 - g0`` into a second buffer made once, ``p.grad <- g0`` for the base step, then
    ``w -= lr a (g1 - g0)``."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, gamma: float = 0.9, decouple: bool = True,
                 adaptive: bool = False, **kwargs):
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kwargs)
        self.weight, self.decouple = gamma / (1 - gamma), decouple

    def _base_grads(self) -> None:
        for group in self.param_groups:
            ps = self._with_grad(group)
            if not ps:
                continue
            grads, g0s = [p.grad for p in ps], kept_g0(self, ps)
            if self.decouple:
                sharpness = [self._buffer(p, "sharpness") for p in ps]
                torch._foreach_copy_(sharpness, grads)
                torch._foreach_sub_(sharpness, g0s)
                torch._foreach_copy_(grads, g0s)
            else:
                torch._foreach_lerp_(grads, g0s, 1 - self.weight)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        super().second_step(zero_grad=False)
        if self.decouple:
            for group in self.param_groups:
                ps = self._with_grad(group)
                if ps:
                    torch._foreach_add_(ps, [self.state[p]["sharpness"] for p in ps],
                                        alpha=-group["lr"] * self.weight)
        if zero_grad:
            self.zero_grad()
