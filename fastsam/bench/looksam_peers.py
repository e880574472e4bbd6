"""Loop and foreach peers of LookSAM (the paper's Algorithm 1, global norms), extending :mod:`fastsam.bench.peers`.

LookSAM has no authors' code; the peers follow Algorithm 1 (Liu et al., CVPR 2022) and its notation: on every
k-th step a SAM step that keeps ``g_v = g_s - (<g, g_s> / (||g||^2 + eps)) g`` (g: the grad at w, g_s: at w + e),
on the others one pass and the base step with ``g + alpha (||g|| / ||g_v||) g_v``. The caller's calls choose the
kind of each step, as the benchmark's :attr:`fastsam.bench.methods.Method.steps` do: ``first_step`` +
``second_step`` is a SAM step, ``step()`` a step between (``k`` is kept for the record, not counted here).

* ``LoopLookSAM``: per parameter, as Algorithm 1 reads: g cloned at the first pass, the inner product and the norms
  per tensor stacked into global ones, g_v a new tensor per parameter at each SAM step, ``||g_v||`` computed again
  at every step between, the combined grad added into ``p.grad``, SGD with ``foreach=False``.
* ``ForeachLookSAM``: the same math on ``torch._foreach_*`` ops over buffers made once (g's copy, g_v), ``||g_v||``
  kept from the SAM step, SGD(foreach=True).

Both add into ``p.grad`` on the steps between, as a training loop that gets a fresh grad from every backward
allows; the benchmark's fixed grads are therefore put back before each timed call
(:class:`fastsam.bench.methods.GradReset`). Before any g_v is kept a step between uses g alone, and a g_v of norm
0 adds nothing (as :class:`fastsam.LookSAM`). tests/test_bench_peers.py checks that the peers and the fastsam
impls end a few cycles at the same parameters.
"""
from __future__ import annotations

import torch

from fastsam.bench.gsam_wsam_peers import (EPS, ForeachKeepsG0, LoopKeepsG0, flat_dot, foreach_global_norm,
                                           kept_g0)
from fastsam.bench.peers import add_scaled_

_NORM_V = "g_v_norm"  # ForeachLookSAM: ||g_v||, kept in the state of the first parameter with a grad


def _ratio(alpha: float, norm: torch.Tensor, norm_v: torch.Tensor) -> torch.Tensor:
    """alpha ||g|| / ||g_v||, 0 where ||g_v|| is 0 (no host read)."""
    return torch.where(norm_v > 0, alpha * norm / norm_v, torch.zeros_like(norm))


class LoopLookSAM(LoopKeepsG0):
    """Algorithm 1 per parameter (see the module docstring)."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, k: int = 5, alpha: float = 0.7,
                 adaptive: bool = False, **kwargs):
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kwargs)
        self.k, self.alpha = k, alpha

    def _base_grads(self) -> None:
        # a SAM step, after the restore: keep g_v; the base step takes g_s as it is
        ps, inner = self._inner_with_g0()
        coef = inner / (self._global_norm(kept_g0(self, ps)) ** 2 + EPS)
        for p in ps:
            self.state[p]["g_v"] = p.grad - coef * self.state[p]["g0"]

    @torch.no_grad()
    def step(self, closure=None) -> None:
        """A step between SAM steps: the base step with ``g + alpha (||g|| / ||g_v||) g_v`` (one pass: no
        closure is run; the grads at w are given)."""
        ps = [p for _, p in self._pairs_with_grad()]
        if ps and "g_v" in self.state[ps[0]]:
            gvs = [self.state[p]["g_v"] for p in ps]
            ratio = _ratio(self.alpha, self._global_norm([p.grad for p in ps]), self._global_norm(gvs))
            for p, gv in zip(ps, gvs):
                p.grad.add_(gv * ratio)
        self.base_optimizer.step()


class ForeachLookSAM(ForeachKeepsG0):
    """LoopLookSAM's math on foreach ops (see the module docstring)."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, k: int = 5, alpha: float = 0.7,
                 adaptive: bool = False, **kwargs):
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kwargs)
        self.k, self.alpha = k, alpha

    def _all_with_grad(self):
        return [p for group in self.param_groups for p in self._with_grad(group)]

    def _base_grads(self) -> None:
        # a SAM step, after the restore: g_v = g_s - coef g into its buffers, and ||g_v||
        ps = self._all_with_grad()
        grads, g0s = [p.grad for p in ps], kept_g0(self, ps)
        coef = flat_dot(g0s, grads) / (foreach_global_norm(g0s) ** 2 + EPS)
        gvs = [self._buffer(p, "g_v") for p in ps]
        torch._foreach_copy_(gvs, grads)
        add_scaled_(gvs, g0s, coef, -1.0)
        self.state[ps[0]][_NORM_V] = foreach_global_norm(gvs)

    @torch.no_grad()
    def step(self, closure=None) -> None:
        """A step between SAM steps: the base step with ``g + alpha (||g|| / ||g_v||) g_v`` (one pass: no
        closure is run; the grads at w are given)."""
        ps = self._all_with_grad()
        if ps and _NORM_V in self.state[ps[0]]:
            grads = [p.grad for p in ps]
            ratio = _ratio(self.alpha, foreach_global_norm(grads), self.state[ps[0]][_NORM_V])
            add_scaled_(grads, [self.state[p]["g_v"] for p in ps], ratio)
        self.base_optimizer.step()
