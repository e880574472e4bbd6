"""The SAM implementations fastsam is compared with, and one factory for every benchmark row.

``loop``: davda54/sam's algorithm as written there: a Python loop over parameters, a fresh backup per
step, the restore by ``p.data = old_p``, and a per-tensor SGD (``foreach=False``) so the row stays a pure loop.
``foreach``: the same math with ``torch._foreach_*`` ops, backups made once, and SGD(foreach=True):
the best a careful user gets from stock PyTorch without custom kernels, on either device.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

import torch

import fastsam

PEERS = ("loop", "foreach")


class LoopSAM(torch.optim.Optimizer):
    """The algorithm of davda54/sam (the de facto PyTorch SAM), operation for operation: a norm per tensor
    stacked into the global norm, a fresh clone of every parameter per step, the restore by rebinding
    ``p.data`` and the base optimizer's own step."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, **kwargs):
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    def _pairs_with_grad(self):
        return [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Moves every parameter to ``w + e`` and keeps a copy of ``w``."""
        pairs = self._pairs_with_grad()
        device = self.param_groups[0]["params"][0].device
        norms = [((p.abs() if group["adaptive"] else 1.0) * p.grad).norm(p=2).to(device) for group, p in pairs]
        total = torch.norm(torch.stack(norms), p=2)
        for group, p in pairs:
            self.state[p]["old_p"] = p.data.clone()
            factor = (group["rho"] / (total + 1e-12)).to(p)
            p.add_((p.pow(2) if group["adaptive"] else 1.0) * p.grad * factor)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Puts ``w`` back and lets the base optimizer step with the grad taken at ``w + e``."""
        for _, p in self._pairs_with_grad():
            p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


class ForeachSAM(LoopSAM):
    """LoopSAM's math on ``torch._foreach_*`` ops: O(1) Python work per group, backups reused."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, **kwargs):
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **{"foreach": True, **kwargs})
        self._perturbed: List[List[torch.Tensor]] = []

    def _with_grad(self, group) -> List[torch.Tensor]:
        return [p for p in group["params"] if p.grad is not None]

    def _backup(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "old_p" not in state:
            state["old_p"] = torch.empty_like(p)
        return state["old_p"]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Moves every parameter to ``w + e`` and copies ``w`` into a buffer made at the first step."""
        groups = [(g, self._with_grad(g)) for g in self.param_groups]
        tgrads = []
        for group, ps in groups:
            grads = [p.grad for p in ps]
            tgrads += torch._foreach_mul(torch._foreach_abs(ps), grads) if group["adaptive"] else grads
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tgrads, 2)), 2)
        self._perturbed = []
        for group, ps in groups:
            if not ps:
                continue
            backups = [self._backup(p) for p in ps]
            torch._foreach_copy_(backups, ps)
            grads = [p.grad for p in ps]
            if group["adaptive"]:
                grads = torch._foreach_mul(torch._foreach_mul(ps, ps), grads)
            scale = group["rho"] / (grad_norm + 1e-12)
            if scale.device.type == "cpu":  # no stream to stall, and a step-sized temporary would be
                torch._foreach_add_(ps, grads, alpha=scale.item())  # page-faulted in afresh every step
            else:  # the caching allocator makes the temporary free; .item() would sync
                torch._foreach_add_(ps, torch._foreach_mul(grads, scale))
            self._perturbed.append(ps)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Copies ``w`` back in place (every perturbed parameter) and lets the base optimizer step."""
        for ps in self._perturbed:
            torch._foreach_copy_(ps, [self.state[p]["old_p"] for p in ps])
        self._perturbed = []
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


def fastsam_impls(device: str | torch.device) -> List[str]:
    """The fastsam impls worth timing on ``device``: the available ones, less Triton's CPU interpreter."""
    cpu = torch.device(device).type == "cpu"
    return [i for i in fastsam.available_impls(device) if not (cpu and i == "triton")]


def rows(device: str | torch.device, impls: Optional[Sequence[str]] = None) -> List[str]:
    """Benchmark rows: the peers, then ``impls`` (default: :func:`fastsam_impls`)."""
    return [*PEERS, *(fastsam_impls(device) if impls is None else impls)]


def make_optimizer(row: str, params: Iterable[torch.Tensor], rho: float = 0.05, lr: float = 0.1,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    """SAM over SGD(lr, momentum) for a benchmark row: a peer name or a fastsam impl ("torch", "cpu", ...)."""
    if row == "loop":
        return LoopSAM(params, torch.optim.SGD, rho=rho, lr=lr, momentum=momentum, foreach=False)
    if row == "foreach":
        return ForeachSAM(params, torch.optim.SGD, rho=rho, lr=lr, momentum=momentum)
    return fastsam.SAM(params, torch.optim.SGD, rho=rho, impl=row, lr=lr, momentum=momentum)
