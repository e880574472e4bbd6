"""The benchmarked methods: how to build each row's optimizer, what one step calls, and its bandwidth limit.

Every method runs over SGD(lr=0.1, momentum=0.9) with its defaults below; a row is a peer (``SAM_PEERS``: "loop",
"foreach", "compiled": the foreach step under torch.compile, "pytorch_optimizer": the package's class where it
has the method) or a fastsam impl. The step timed is the method's step calls in order, without forward/backward:
the grads are the fixed synthetic ones of :func:`fastsam.bench.shapes.make_params`, so every pass sees the
same grad tensor. LookSAM's timed call is a cycle of k steps (a SAM step, then k - 1 steps between), its time
divided by k: ms per step, as for the others; its rows add into ``.grad`` on the steps between (the peers), which
on fixed grads would compound from call to call, so its grads are put back before each call, untimed
(:class:`GradReset`). Some values are then degenerate: Friendly SAM's d = g - m is ~0 from the second step on,
CR-SAM's combination is g, and the orthogonal projection of g off itself is 0 (the rows that write the
projected grad into ``.grad``, the loop and impl="torch", then run on zero grads; LookSAM's g_v, g_s less its
part along g = g_s, is 0 or rounding). The ops and the memory they
move are those of a real step, and their time does not depend on the values: no denormals arise (the values
stay exact zeros or far above the denormal range), no op skips work on zeros.

Bandwidth limit: the least memory traffic of a fully fused step, in words per parameter (fp32: 4 bytes each),
counted as docs/design.md section 3 counts SAM's 10 (m: SGD's momentum buffer). The restore is exact, from a
backup (docs/design.md section 1), and a grad kept for a later pass must be copied: ``.grad`` belongs to the
training loop (the next backward may accumulate into it).

* ``sam`` (10): norm: read g (1) | perturb: read g, w; write w, backup (4) | restore + update: read backup,
  g, m; write w, m (5).
* ``friendly_sam`` (13, the steady state): norm of d = g - sigma m: read g, m (2) | perturb: read g, m, w;
  write w, backup, m (the EMA update) (6) | restore + update (5). SAM + 3.
* ``crsam`` (17; first + second + third step, mode "authors"): norm: read g0 (1) | perturb: read g0, w;
  write w, backup, a copy of g0 (5) | second step: w - e = backup - e and keep g+: read backup, g0, g+;
  write w, h = (1 + a + b) g+ - 2a g0 over the g0 copy (5; a = gamma and b = beta are known up front in
  authors mode) | restore + update with g = (a - b) g- + h: read backup, g-, h, m; write w, m (6).
  fastsam keeps g0 and g+ apart (paper mode's coefficients need the third pass's loss): read backup, g0, g+;
  write w, a copy of g+ in the second step, then read backup, g-, g+, g0, m; write w, m: 18 words, so its
  best ratio to this limit is 18/17 = 1.06.
* ``lastsam`` (11; ASAM with T = |w| + eta on every parameter: the benchmark's parameters are unnamed):
  norm of T g: read g, w (2) | perturb (4) | restore + update (5). SAM + 1.
* ``lastsam_orthogonal`` (15): norm (2) | perturb, also copying g (5) | dot product g_sam . g and ||g||^2:
  read g_sam, g (2: the reduction cannot start before the second pass's grad exists, and the update needs
  its result) | restore + update with g_sam + c g: read backup, g_sam, g, m; write w, m (6).
* ``gsam`` (14): norm (1) | perturb, also copying g0 (5) | <g0, g1>, ||g0||^2 and ||g1||^2 in one pass: read g1,
  g0 (2) | restore + update with c g1 - alpha g0: read backup, g1, g0, m; write w, m (6). fastsam sums
  ||g1||^2 in a reduction of its own (one more read of g1: 15 words).
* ``wsam`` (12, decoupled): norm (1) | perturb, also copying g0 (5) | restore + update with g0 and the decoupled
  term folded in, ``w <- SGD(backup, g0) - lr a (g1 - g0)``: read backup, g0, g1, m; write w, m (6). fastsam's
  restore + update reads g1 with a zero weight and the decoupled term is a pass of its own (read w, g1, g0;
  write w): 16 words. Coupled (a g1 + (1 - a) g0 in the update) both are 12.
* ``looksam`` ((15 + 7 (k - 1)) / k per step: 8.6 at k = 5). A SAM step (15): norm of g, which is also the
  ||g||^2 of the projection (1) | perturb, also copying g (5) | <g, g_s> and ||g_s||^2: read g_s, g (2) |
  restore + update with g_s, writing g_v = g_s - c g beside it and summing ||g_v||^2 on the way: read backup,
  g_s, g, m; write w, m, g_v (7). A step between (7): ||g||^2: read g (1) | update with g + c' g_v: read w, g,
  g_v, m; write w, m (6). fastsam's SAM step writes g_v in a pass of its own (the restore + SGD op as an axpy:
  read g's copy twice and g_s; write g_v and the copy back, 5) and sums ||g_v||^2 in another (1): 19, so 47
  words per cycle of 5 against 43 (1.09).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

import fastsam
from fastsam.bench import family_peers as fp
from fastsam.bench import gsam_wsam_peers as gw
from fastsam.bench import looksam_peers as ls
from fastsam.bench import peers, po_peers


SAM_PEERS = ("loop", "foreach", "compiled", "pytorch_optimizer")


@dataclass(frozen=True)
class Method:
    name: str
    title: str
    loop: type
    foreach: type
    fastsam: Callable[..., torch.optim.Optimizer]
    words_per_param: Optional[float]  # per step; None: no justified limit (the ratio is left blank)
    steps: Tuple[str, ...] = ("first_step", "second_step")  # the calls of one timed call
    options: Dict[str, Any] = field(default_factory=dict)  # the method's hyper-parameters, for every row
    fastsam_options: Dict[str, Any] = field(default_factory=dict)  # for the fastsam rows only
    cycle: int = 1  # optimizer steps per timed call (LookSAM: k); the tables show its time / cycle
    po_steps: Optional[Tuple[str, ...]] = None  # the pytorch_optimizer row's calls, where they differ from steps
    fresh_grads: bool = False  # put the fixed grads back before each timed call (:class:`GradReset`)

    def make(self, row: str, params: Iterable[torch.Tensor], lr: float = 0.1, momentum: float = 0.9,
             **options) -> torch.optim.Optimizer:
        """The optimizer of a row: a peer ("loop", "foreach") or a fastsam impl; ``options`` override the
        method's hyper-parameters (an option given as None is left out: the class's default)."""
        kw = {k: v for k, v in dict(self.options, **options).items() if v is not None}
        kw.update(lr=lr, momentum=momentum)
        if row == "loop":
            return self.loop(params, torch.optim.SGD, foreach=False, **kw)
        if row == "foreach":
            return self.foreach(params, torch.optim.SGD, **kw)
        if row == "compiled":
            return peers.compile_steps(self.foreach(params, torch.optim.SGD, **kw), tuple(dict.fromkeys(self.steps)))
        if row == "pytorch_optimizer":
            return po_peers.make(self.name, params, torch.optim.SGD, **kw)
        return self.fastsam(params, torch.optim.SGD, impl=row, **self.fastsam_options, **kw)

    def peers(self) -> List[str]:
        """The peer rows this method has here: all of ``SAM_PEERS`` but pytorch_optimizer where that package is
        not installed or has no class for the method."""
        return [row for row in SAM_PEERS
                if row != "pytorch_optimizer" or (po_peers.available() and self.name in po_peers.PO_CLASSES)]

    def rows(self, device: str | torch.device, impls: Optional[Sequence[str]] = None) -> List[str]:
        """The benchmark rows of this method: its peers, then ``impls`` (default: the fastsam impls worth
        timing on ``device``)."""
        return [*self.peers(), *(peers.fastsam_impls(device) if impls is None else impls)]

    def passes_per_100_steps(self) -> int:
        """The forward/backward passes that 100 steps of the fastsam optimizer run through ``step(closure)``,
        counted (on a 4-element parameter, impl "torch"): what a training loop pays end to end, where the timed
        step leaves the passes out. Every peer row does the same passes."""
        w = torch.nn.Parameter(torch.ones(4))
        x = torch.linspace(-1.0, 1.0, 4)
        opt = self.make("torch", [w])
        calls = []

        def closure():
            calls.append(1)
            loss = (w * x).square().sum()
            loss.backward()
            return loss
        for _ in range(100):
            opt.step(closure)
            opt.zero_grad()
        return len(calls)

    def calls(self, row: str) -> Tuple[str, ...]:
        """The step calls of one timed call of ``row``, in order (pytorch_optimizer's LookSAM does a step
        between as ``first_step`` (which does nothing there) + ``second_step``)."""
        return self.po_steps if (row == "pytorch_optimizer" and self.po_steps) else self.steps

    def grad_reset(self, params: Sequence[torch.Tensor]) -> Optional["GradReset"]:
        """The reset of ``params``' grads shared by the rows of one (shape set, method) pair, where the method
        asks for one (:attr:`fresh_grads`), else None."""
        return GradReset(params) if self.fresh_grads else None

    def step_fn(self, opt: torch.optim.Optimizer, row: str, reset: Optional["GradReset"] = None) -> "StepCalls":
        """One timed call of ``opt`` (the optimizer of ``row``): its step calls in order (the forward/backward
        passes between them left out), with ``reset`` as its untimed ``prepare``."""
        return StepCalls([getattr(opt, name) for name in self.calls(row)], reset)


class StepCalls:
    """A timed call: ``calls`` in order. ``prepare`` (None, or a function of no arguments) is what the timers of
    :mod:`fastsam.bench.timing` run before each call, outside the timed interval."""

    def __init__(self, calls: List[Callable[[], Any]], prepare: Optional[Callable[[], None]] = None):
        self.calls, self.prepare = calls, prepare

    def __call__(self) -> None:
        for call in self.calls:
            call()


class GradReset:
    """Puts the benchmark's fixed grads back, bindings and values, from a copy made once.

    A row that adds into ``.grad`` (the LookSAM peers on the steps between, pytorch_optimizer's LookSAM) would
    otherwise step next time from what it wrote: on fixed grads, ``g <- g + alpha (||g|| / ||g_v||) g_v`` at
    every step between grows g without bound (by up to 1 + alpha a step). Called before every timed call of
    every row of the pair, it costs no row anything timed."""

    def __init__(self, params: Sequence[torch.Tensor]):
        self.params = list(params)
        self.grads = [p.grad for p in self.params]
        self.saved = [g.clone() for g in self.grads]

    def __call__(self) -> None:
        for p, g in zip(self.params, self.grads):
            p.grad = g
        torch._foreach_copy_(self.grads, self.saved)


def _looksam(k: int = 5) -> Method:
    """LookSAM at interval k: a timed call is one cycle, a SAM step and the k - 1 steps between."""
    return Method("looksam", f"LookSAM (k={k}: a SAM step, {k - 1} one-pass steps)", ls.LoopLookSAM,
                  ls.ForeachLookSAM, fastsam.LookSAM, (15 + 7 * (k - 1)) / k,
                  steps=("first_step", "second_step") + ("step",) * (k - 1), options=dict(rho=0.05, k=k, alpha=0.7),
                  cycle=k, po_steps=("first_step", "second_step") * k, fresh_grads=True)


METHODS: Dict[str, Method] = {m.name: m for m in [
    Method("sam", "SAM", peers.LoopSAM, peers.ForeachSAM, fastsam.SAM, 10, options=dict(rho=0.05)),
    Method("friendly_sam", "Friendly SAM", fp.LoopFriendlySAM, fp.ForeachFriendlySAM, fastsam.FriendlySAM, 13,
           options=dict(rho=0.05, sigma=1.0, lmbda=0.9)),
    Method("crsam", "CR-SAM (authors)", fp.LoopCRSAM, fp.ForeachCRSAM, fastsam.CRSAM, 17,
           steps=("first_step", "second_step", "third_step"), options=dict(rho=0.1, gamma=0.1, beta=0.1),
           fastsam_options=dict(mode="authors")),
    Method("lastsam", "LastSAM (ASAM phase)", fp.LoopLastSAM, fp.ForeachLastSAM, fastsam.LastSAM, 11,
           options=dict(sharpness="asam", orthogonal=False, rho=0.5, eta=0.01), fastsam_options=dict(switch_at=0)),
    Method("lastsam_orthogonal", "LastSAM (ASAM phase, orthogonal)", fp.LoopLastSAM, fp.ForeachLastSAM,
           fastsam.LastSAM, 15, options=dict(sharpness="asam", orthogonal=True, rho=0.5, eta=0.01),
           fastsam_options=dict(switch_at=0)),
    Method("gsam", "GSAM", gw.LoopGSAM, gw.ForeachGSAM, fastsam.GSAM, 14, options=dict(rho=0.05, alpha=0.4)),
    Method("wsam", "WSAM (decoupled)", gw.LoopWSAM, gw.ForeachWSAM, fastsam.WSAM, 12,
           options=dict(rho=0.05, gamma=0.9, decouple=True)),
    _looksam(),
]}

