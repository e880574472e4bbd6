"""The SAM implementations fastsam is compared with, and the rows of the benchmark (peers, then fastsam impls).

``loop``: davda54/sam's algorithm as written there: a Python loop over parameters, a fresh backup per
step, the restore by ``p.data = old_p``, and a per-tensor SGD (``foreach=False``) so the row stays a pure loop.
``foreach``: the same math with ``torch._foreach_*`` ops, backups made once, and SGD(foreach=True):
the best a careful user gets from stock PyTorch without custom kernels, on either device.
``compiled`` (the SAM table's rows, :mod:`fastsam.bench.methods`): the foreach step with each step method
under ``torch.compile`` (:func:`compile_steps`), which fuses its foreach ops into a few generated kernels.

Both classes have hooks (the normalization operator T, the direction of the perturbation, the grad the
base optimizer steps with) through which :mod:`fastsam.bench.family_peers` writes the other methods' peers.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

import fastsam

PEERS = ("loop", "foreach")


class LoopSAM(torch.optim.Optimizer):
    """The algorithm of davda54/sam (the de facto PyTorch SAM), operation for operation: a norm per tensor
    stacked into the global norm, a fresh clone of every parameter per step, the restore by rebinding
    ``p.data`` and the base optimizer's own step.

    ``e = rho * T^2 d / (||T d|| + eps)``; the hooks :meth:`_operator` (T), :meth:`_direction` (d) and
    :meth:`_base_grads` (called between the restore and the base step) give the other methods' loops.
    """

    eps = 1e-12  # added to the global norm

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, **kwargs):
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    def _pairs_with_grad(self):
        return [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]

    # ---- hooks ---------------------------------------------------------------------------------
    def _operator(self, group, p: torch.Tensor) -> Optional[torch.Tensor]:
        """T at the current ``p`` (a new tensor), or None for the identity."""
        return p.abs() if group["adaptive"] else None

    def _direction(self, group, p: torch.Tensor) -> torch.Tensor:
        """The direction d of the perturbation; called once per parameter and step, before any move."""
        return p.grad

    def _base_grads(self) -> None:
        """Sets the grads the base optimizer steps with (after the restore); default: the last pass's."""

    # ---- shared pieces -------------------------------------------------------------------------
    def _global_norm(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        device = self.param_groups[0]["params"][0].device
        return torch.norm(torch.stack([t.norm(p=2).to(device) for t in tensors]), p=2)

    @staticmethod
    def _times(t: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return x if t is None else t * x

    # ---- the steps -----------------------------------------------------------------------------
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Moves every parameter to ``w + e`` and keeps a copy of ``w``."""
        pairs = self._pairs_with_grad()
        dirs = [self._direction(group, p) for group, p in pairs]
        total = self._global_norm([self._times(self._operator(group, p), d) for (group, p), d in zip(pairs, dirs)])
        for (group, p), d in zip(pairs, dirs):
            self.state[p]["old_p"] = p.data.clone()
            t = self._operator(group, p)  # p is not moved yet: T at w, as in the norm
            factor = (group["rho"] / (total + self.eps)).to(p)
            p.add_(self._times(t, self._times(t, d)) * factor)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Puts ``w`` back and lets the base optimizer step with the grad taken at ``w + e``."""
        for _, p in self._pairs_with_grad():
            p.data = self.state[p]["old_p"]
        self._base_grads()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


def add_scaled_(tensors: List[torch.Tensor], others: List[torch.Tensor], scale: torch.Tensor,
                factor: float = 1.0) -> None:
    """``tensors += factor * scale * others`` with ``scale`` a 0-dim tensor, the cheapest way per device."""
    if scale.device.type == "cpu" and not torch.compiler.is_compiling():  # no stream to stall, and a step-sized
        # temporary would be page-faulted in afresh every step (compiled, the multiply fuses into the add instead)
        torch._foreach_add_(tensors, others, alpha=factor * scale.item())
    else:  # the caching allocator makes the temporary free; .item() would sync
        torch._foreach_add_(tensors, torch._foreach_mul(others, scale * factor if factor != 1.0 else scale))


class ForeachSAM(LoopSAM):
    """LoopSAM's math on ``torch._foreach_*`` ops: O(1) Python work per group, backups reused.

    Hooks, per param group (``ps``: its parameters with a grad): :meth:`_operators` (T),
    :meth:`_directions` (d) and :meth:`_base_grads`.
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, **kwargs):
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **{"foreach": True, **kwargs})

    # What one step call leaves for the next lives in ``self.state`` (per parameter) alone: under torch.compile,
    # dynamo drops assignments to an Optimizer's own attributes (torch 2.13: `self.x = [...]` in a compiled
    # method of an Optimizer subclass leaves self.x unchanged), and a peer that kept its perturbed list there
    # silently skipped the restore.
    def _with_grad(self, group) -> List[torch.Tensor]:
        return [p for p in group["params"] if p.grad is not None]

    def _buffer(self, p: torch.Tensor, key: str) -> torch.Tensor:
        """A per-parameter buffer made at its first use and reused by every later step."""
        state = self.state[p]
        if key not in state:
            state[key] = torch.empty_like(p)
        return state[key]

    def _backup(self, p: torch.Tensor) -> torch.Tensor:
        return self._buffer(p, "old_p")

    # ---- hooks ---------------------------------------------------------------------------------
    def _operators(self, group, ps: List[torch.Tensor]) -> Optional[List[torch.Tensor]]:
        """T at the current ``ps`` (new tensors), or None for the identity."""
        return torch._foreach_abs(ps) if group["adaptive"] else None

    def _directions(self, group, ps: List[torch.Tensor], grads: List[torch.Tensor]) -> List[torch.Tensor]:
        """The directions d of the perturbation; called once per group and step, before any move."""
        return grads

    # ---- the steps -----------------------------------------------------------------------------
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Moves every parameter to ``w + e`` and copies ``w`` into a buffer made at the first step."""
        plans = []
        for group in self.param_groups:
            ps = self._with_grad(group)
            if ps:
                ts = self._operators(group, ps)
                dirs = self._directions(group, ps, [p.grad for p in ps])
                plans.append((group, ps, ts, dirs, dirs if ts is None else torch._foreach_mul(ts, dirs)))
        scaled = [x for plan in plans for x in plan[4]]
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(scaled, 2)), 2)
        for group, ps, ts, dirs, tdirs in plans:
            torch._foreach_copy_([self._backup(p) for p in ps], ps)
            if ts is not None:
                torch._foreach_mul_(tdirs, ts)  # T^2 d, in the storage of T d
                dirs = tdirs
            add_scaled_(ps, dirs, group["rho"] / (grad_norm + self.eps))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Copies ``w`` back in place (every parameter with a grad, as the loop restores) and lets the base
        optimizer step."""
        for group in self.param_groups:
            ps = self._with_grad(group)
            if ps:
                torch._foreach_copy_(ps, [self.state[p]["old_p"] for p in ps])
        self._base_grads()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


def compile_steps(opt: torch.optim.Optimizer, steps: Sequence[str]) -> torch.optim.Optimizer:
    """Replaces each of ``opt``'s step methods named in ``steps`` by its ``torch.compile``d version, each
    compiled on its own (as a user compiles ``first_step`` and ``second_step``: the forward and backward pass
    between them cannot be in the same graph). Compilation happens at the first call.

    Dynamo's caches are reset first: a step method's code is shared by every instance of its class, and each new
    instance costs a recompile; past ``recompile_limit`` of them dynamo would fall back to eager silently.
    """
    torch._dynamo.reset()
    for name in steps:
        setattr(opt, name, torch.compile(getattr(opt, name)))
    return opt


def fastsam_impls(device: str | torch.device) -> List[str]:
    """The fastsam impls worth timing on ``device``: the available ones, less Triton's CPU interpreter."""
    cpu = torch.device(device).type == "cpu"
    return [i for i in fastsam.available_impls(device) if not (cpu and i == "triton")]


def rows(device: str | torch.device, impls: Optional[Sequence[str]] = None) -> List[str]:
    """Benchmark rows: the peers, then ``impls`` (default: :func:`fastsam_impls`)."""
    return [*PEERS, *(fastsam_impls(device) if impls is None else impls)]

