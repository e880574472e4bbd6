"""Wall-clock timing of optimizer steps and the machine's copy bandwidth."""
from __future__ import annotations

import statistics
import time
from typing import Callable, List, Optional

import torch

WORDS_PER_PARAM = 10  # DESIGN.md section 4: the least traffic of a fused SAM + SGD(momentum) step
# (the other methods' counts: fastsam.bench.methods)


def sync(device: torch.device) -> None:
    """Waits for queued GPU work, so a timer read afterwards covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, reps: Optional[int] = None, warmup: int = 3,
               budget_s: float = 1.5, min_reps: int = 7, max_reps: int = 200) -> List[float]:
    """Seconds per call of ``fn``, one sample per call, after ``warmup`` calls.

    Without ``reps`` the count fits ``budget_s`` (from the last warmup call) within [min_reps, max_reps]:
    slow rows (the loop peer on ViT-B/16) get few samples, launch-bound ones many.
    """
    last = 0.0
    for _ in range(max(warmup, 1)):  # at least one: lazy state (backups, momentum) is made in the first step
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        last = time.perf_counter() - t0
    if reps is None:
        reps = min(max_reps, max(min_reps, int(budget_s / max(last, 1e-9))))
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def copy_bandwidth(device: torch.device, nbytes: Optional[int] = None, reps: int = 7) -> float:
    """Bytes per second moved by ``dst.copy_(src)`` (read + write) on a tensor far larger than the caches."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 28)
    # filled, not empty: reading untouched pages would read the shared zero page and flatter the figure
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = time_calls(lambda: dst.copy_(src), device, reps=reps, warmup=2)
    return 2 * nbytes / statistics.median(times)


def limit_seconds(numel: int, dtype: torch.dtype, bandwidth: float, words: int = WORDS_PER_PARAM) -> float:
    """The bandwidth limit of one step moving ``words`` words per parameter at ``bandwidth`` bytes/s (default:
    SAM + SGD(momentum)'s 10; the other methods': fastsam.bench.methods)."""
    return words * torch.empty((), dtype=dtype).element_size() * numel / bandwidth
