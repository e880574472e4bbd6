"""The extraction rows of the affect table: frames per second of ``python -m fastsam.affect extract`` on the
demo data (its tiny random CLIP tower), at 1, 2 and all (:func:`fastsam.affect.bank.default_workers`) decoding
worker processes.

Each run extracts the demo's training split into a fresh bank with :func:`fastsam.affect.bank.extract_bank`,
as the command line does, and its figure is the one the command prints and the manifest stores (the rows over
the seconds from the first batch requested, worker start-up included, to the last row written). The worker
counts run in interleaved rounds, so that drift of the machine hits them alike.
"""
from __future__ import annotations

import os
import statistics
import tempfile
from typing import Any, Dict, List

import torch

from fastsam.affect.bank import default_workers, extract_bank
from fastsam.affect.data import scan_split
from fastsam.affect.demo import make_demo
from fastsam.affect.tasks import get_task

BATCH = 64  # extract's default batch
VIDEOS, FRAMES = 4, 300  # the demo's training split: 1,031 frames with an image and a valid label
QUICK_VIDEOS, QUICK_FRAMES = 2, 40


def worker_counts() -> List[int]:
    """1, 2 and all workers, each once (on a 2-CPU machine "all" is 2)."""
    return sorted({1, 2, default_workers()})


def dtype_for(device: str | torch.device) -> str:
    """The encoder dtype timed on ``device``: float16 on a GPU (what a real run uses there), float32 on the CPU
    (float16 is GPU-only)."""
    return "float16" if torch.device(device).type == "cuda" else "float32"


def run_extraction(device: str | torch.device, rounds: int = 3, quick: bool = False) -> Dict[str, Any]:
    """Extracts the demo's training split ``rounds`` times per worker count (interleaved) and returns the
    record's ``extraction`` entry: the setting and a row per worker count with every run's frames/s, their
    median and the speed-up over 1 worker."""
    videos, frames_per_video = (QUICK_VIDEOS, QUICK_FRAMES) if quick else (VIDEOS, FRAMES)
    task, dtype, counts = get_task("expr"), dtype_for(device), worker_counts()
    rates: Dict[int, List[float]] = {w: [] for w in counts}
    with tempfile.TemporaryDirectory(prefix="fastsam-bench-extract-") as tmp:
        demo = make_demo(os.path.join(tmp, "demo"), task, videos=videos, frames=frames_per_video)
        frames, stats = scan_split(demo["images"], demo["annotations"], task, "train")
        for r in range(rounds):
            for w in counts[r % len(counts):] + counts[:r % len(counts)]:
                bank = extract_bank(frames, stats, task, "train", demo["images"], demo["checkpoint"],
                                    os.path.join(tmp, f"bank-{w}-{r}"), batch_size=BATCH, device=device, progress=False,
                                    workers=w, dtype=dtype)
                rates[w].append(float(bank.manifest["frames_per_second"]))
    medians = {w: statistics.median(v) for w, v in rates.items()}
    rows = [dict(workers=w, all=w == default_workers(), frames_per_s=medians[w], runs=rates[w],
                 speedup_vs_1=medians[w] / medians[1]) for w in counts]
    return dict(frames=len(frames), dtype=dtype, batch=BATCH, default_workers=default_workers(), rows=rows)
