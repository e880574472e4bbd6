"""The passes of ``step(closure)``: whether the caller already ran the pass at w, and BatchNorm in later passes.

``step(closure)`` runs every pass of a step through the closure (torch's convention, which Lightning's
automatic optimization relies on), but davda54/sam users run the first backward themselves and then call
``step(closure)`` for the rest. :class:`GradLedger` tells the two apart from what happened to the grads since
the last step ended, never from whether a ``.grad`` merely exists: it keeps, per parameter, a weak reference
to the grad as the step left it and that tensor's version counter. Autograd either puts a new tensor in
``.grad`` (it was None) or adds into the old one in place, which bumps the counter; ``zero_grad`` either sets
None or zeroes in place (another bump).
"""
from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from fastsam.optim._sharding import local, scope_of, version
from fastsam.utils import stop_tracking_bn


class _Mark(NamedTuple):
    """A parameter's grad as a mark found it."""
    grad: "weakref.ReferenceType[Tensor]"  # weak: a mark must not keep a grad the caller dropped alive
    version: int  # the grad's version counter then
    zeroed: bool  # the optimizer had just zeroed it in place


class GradLedger:
    """What each parameter's ``.grad`` was when the last step ended or the optimizer zeroed it."""

    def __init__(self) -> None:
        self._marks: Dict[Tensor, Optional[_Mark]] = {}

    def mark(self, params: Iterable[Tensor], zeroed: bool = False) -> None:
        """Remembers the current grads (``zeroed``: the optimizer just zeroed them in place)."""
        for p in params:
            g = p.grad
            self._marks[p] = None if g is None else _Mark(weakref.ref(g), version(g), zeroed)

    def cleared(self) -> None:
        """Every grad was set to None (what a missing mark means too)."""
        self._marks.clear()

    def pass_at_w_done(self, params: List[Tensor]) -> bool:
        """Whether a backward pass has put grads into ``params`` since the last mark (the caller ran the pass
        at w: davda54's style). False: the grads are None, zeroed, or left from the last step, and the
        closure must run at w.

        Raises RuntimeError where the grads are neither: new grads beside grads left from the last step
        (the step would take those as gradients at w), or a backward added onto the last step's grads."""
        fresh: List[Tensor] = []
        stale: List[Tensor] = []  # unchanged since the last step ended
        changed: List[Tuple[Tensor, int]] = []  # changed in place since then, not by the optimizer's zero_grad
        for p in params:
            g = p.grad
            if g is None:
                continue
            mark = self._marks.get(p)
            if mark is None or mark.grad() is not g:
                fresh.append(g)  # a new tensor: autograd made it (or the caller assigned it) since the mark
                continue
            bumps = version(g) - mark.version
            if mark.zeroed:  # by the optimizer: any in-place change since is a backward
                if bumps:
                    fresh.append(g)
            elif bumps == 0:
                stale.append(g)
            else:
                changed.append((g, bumps))
        if changed:
            # One in-place change is either a zeroing outside the optimizer (model.zero_grad(set_to_none=False))
            # or a backward onto the last step's grads; the values tell (one host read, in this case only).
            written = nonzero([g for g, _ in changed])
            if any(nz and bumps == 1 for nz, (_, bumps) in zip(written, changed)):
                raise RuntimeError(
                    "a backward pass added its gradients onto those the last step left in .grad: zero the "
                    "grads after each step (opt.zero_grad()), or let step(closure) run every pass")
            fresh += [g for nz, (g, _) in zip(written, changed) if nz]
        if fresh and stale:
            raise RuntimeError(
                "some parameters have new gradients and others still hold those the last step left in .grad: "
                "zero the grads after each step (opt.zero_grad()) before the backward pass at w")
        return bool(fresh)


def nonzero(grads: List[Tensor]) -> List[bool]:
    """Per grad: whether it has a nonzero (or NaN) entry; one host read. A DTensor grad is read on its local
    shard, then the peaks of each process group's shards are all-reduced, so every rank decides alike."""
    shards = [local(g) for g in grads]
    peaks = torch.zeros(len(grads), device=shards[0].device)  # an empty shard (a rank of FSDP2 may hold one): 0
    held = [i for i, g in enumerate(shards) if g.numel()]
    if held:
        norms = torch._foreach_norm([shards[i] for i in held], float("inf"))
        peaks[held] = torch.stack([n.float().to(peaks.device) for n in norms])
    by_group: Dict[int, Tuple[object, List[int]]] = {}
    for i, g in enumerate(grads):
        group = scope_of(g).group
        if group is not None:
            by_group.setdefault(id(group), (group, []))[1].append(i)
    for group, idx in by_group.values():
        shared = peaks[idx]
        torch.distributed.all_reduce(shared, op=torch.distributed.ReduceOp.MAX, group=group)
        peaks[idx] = shared
    return peaks.ne(0).tolist()


@contextlib.contextmanager
def bn_stats_frozen() -> Iterator[None]:
    """Inside the block, every BatchNorm layer (of any model) in training mode normalizes with the batch's
    statistics but neither updates nor counts its running statistics, as in
    :func:`fastsam.utils.frozen_bn_stats`; the layers are switched back when the block ends.

    An optimizer does not know its model: a global forward pre-hook switches, at the first call of a module
    in the block, the BatchNorm layers among that module and all its submodules. So a ``torch.compile``d
    model works too: its compiled forward runs no hooks of the inner modules, but the call of the compiled
    wrapper does, and dynamo guards on the switched attribute (the frozen forward is compiled once)."""
    switched: List[torch.nn.Module] = []
    visited = set()

    def freeze(module: torch.nn.Module, args) -> None:
        if id(module) not in visited:
            inside = list(module.modules())
            visited.update(map(id, inside))
            switched.extend(stop_tracking_bn(inside))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(freeze)
    try:
        with warnings.catch_warnings():
            # torch warns that global hooks also fire for the compiled wrapper: here that is the point.
            warnings.filterwarnings("ignore", message="Using `torch.compile\\(module\\)` when there are global hooks")
            yield
    finally:
        handle.remove()
        for m in switched:
            m.track_running_stats = True


def check_no_foreign_accumulation(closure: Callable[[], Tensor]) -> None:
    """Raises where grads found at the start of a step come from micro-batches that a framework ran outside
    the optimizer, which the step would take for the pass at w while its closure covers the last micro-batch
    only: PyTorch Lightning's automatic optimization with ``accumulate_grad_batches > 1`` (its precision
    plugin hands ``step`` a ``functools.partial`` of ``_wrap_closure`` over the LightningModule)."""
    if not (isinstance(closure, functools.partial) and closure.args
            and getattr(closure.func, "__name__", "") == "_wrap_closure"):
        return
    trainer = getattr(closure.args[0], "_trainer", None)
    if getattr(trainer, "accumulate_grad_batches", 1) > 1:
        raise RuntimeError(
            f"Lightning's accumulate_grad_batches={trainer.accumulate_grad_batches} runs the micro-batches before "
            "the last outside optimizer.step(closure), so a SAM step could perturb with their grads but run its "
            "later passes on the last micro-batch only. Use accumulate_grad_batches=1 with a larger batch, or "
            "manual optimization that runs every micro-batch in each pass (README, \"Gradient accumulation\")")


class ClosurePasses:
    """Runs the passes of one ``step(closure)`` call: the closure under grad mode, BatchNorm statistics
    frozen in every pass but the first forward pass of the step (``freeze_bn``), which is the caller's own
    in davda54's style; counts the calls."""

    def __init__(self, closure: Callable[[], Tensor], freeze_bn: bool, caller_ran_pass_at_w: bool) -> None:
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        self._closure = closure
        self._freeze_bn = freeze_bn
        self.calls = 1 if caller_ran_pass_at_w else 0  # forward passes of this step so far

    def __call__(self) -> Tensor:
        frozen = bn_stats_frozen() if self._freeze_bn and self.calls else contextlib.nullcontext()
        self.calls += 1
        with torch.enable_grad(), frozen:
            return self._closure()
