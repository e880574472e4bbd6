"""Wall-clock timing of steps: one row alone, or several rows in paired rounds; GPU launches per step."""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence

import torch


def sync(device: torch.device) -> None:
    """Waits for queued GPU work, so a timer read afterwards covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn``, its ``prepare`` (where it has one, not None) run first, untimed."""
    prepare = getattr(fn, "prepare", None)
    if prepare is not None:
        prepare()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def time_calls(fn: Callable[[], object], device: torch.device, reps: Optional[int] = None, warmup: int = 3,
               budget_s: float = 1.5, min_reps: int = 7, max_reps: int = 200) -> List[float]:
    """Seconds per call of ``fn``, one sample per call, after ``warmup`` calls.

    Without ``reps`` the count fits ``budget_s`` (from the last warmup call) within [min_reps, max_reps]:
    slow rows (the loop peer on ViT-B/16) get few samples, launch-bound ones many. A ``fn`` with a ``prepare``
    attribute (:class:`fastsam.bench.methods.StepCalls`) has it called before each call, outside the timer.
    """
    last = 0.0
    for _ in range(max(warmup, 1)):  # at least one: lazy state (backups, momentum) is made in the first step
        last = _timed(fn, device)
    if reps is None:
        reps = min(max_reps, max(min_reps, int(budget_s / max(last, 1e-9))))
    return [_timed(fn, device) for _ in range(reps)]


def time_paired(fns: Dict[str, Callable[[], object]], device: torch.device, rounds: Optional[int] = None,
                warmup: int = 3, budget_s: float = 1.5, min_rounds: int = 7,
                max_rounds: int = 200) -> Dict[str, Dict[str, object]]:
    """Seconds per call of each of ``fns``, timed in interleaved rounds: each round calls every function once,
    in an order rotated by one from round to round, so that drift of the machine (another process, the
    clock, the allocator's placement of a new tensor) hits every row alike and no row always runs first.

    Each function is called ``warmup`` times first (at least once: lazy state, and torch.compile's
    compilation, happen in the first call); ``first_s`` keeps the first call's time. A function's ``prepare``
    runs before each of its calls, untimed (as in :func:`time_calls`). Without ``rounds`` the
    count fits ``budget_s`` for the slowest row (from each row's last warm-up call) within
    [min_rounds, max_rounds].

    Returns ``{name: {"first_s": float, "times": [seconds per round]}}``.
    """
    names = list(fns)
    out: Dict[str, Dict[str, object]] = {}
    slowest = 0.0  # the slowest row's last warm-up call
    for name in names:
        first = last = _timed(fns[name], device)
        for _ in range(max(warmup, 1) - 1):
            last = _timed(fns[name], device)
        out[name] = dict(first_s=first, times=[])
        slowest = max(slowest, last)
    if rounds is None:
        rounds = min(max_rounds, max(min_rounds, int(budget_s / max(slowest, 1e-9))))
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            out[name]["times"].append(_timed(fns[name], device))
    return out


def gpu_launches(events: Sequence[object]) -> int:
    """The GPU activities (kernels, memcpys, memsets) among a profiler's ``events``: each is one launch of
    work on the GPU."""
    from torch.autograd import DeviceType
    return sum(1 for e in events if getattr(e, "device_type", None) == DeviceType.CUDA)


def count_launches(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """GPU launches of one call of ``fn`` (after its warm-up), counted with the torch profiler; None on the
    CPU, where a step launches no GPU work (its thread count is in the record instead)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    return gpu_launches(prof.events())
