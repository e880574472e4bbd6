"""Calls every op of one fastsam implementation once, on small tensors: the run that `make gpu-check` puts under
``compute-sanitizer --tool memcheck``.

Every op the extension registers for CUDA (csrc/cuda/ops_cuda.cpp: the SAM ops and the fused SGD / Adam / AdamW
restore + update; csrc/cuda/cvar_cuda.cpp: the CVaR ops) runs once per dtype (fp32, bf16) with the optional
inputs given (EMA, grad combination, loss scale, found flag, device step counts), so that each kernel variant
that reads them is launched; then one SAM + SGD training step and one CVaR loss forward + backward. It checks
nothing itself: the sanitizer watches the memory accesses, and a failed launch raises here.

The shapes are small but reach each kernel's edge cases: a tensor longer than the CUDA launcher's 65536-element
chunk, odd sizes (vector loads with a scalar tail), a tensor whose storage is not 16-byte aligned (the scalar
path), more tensors than one multi-tensor launch holds, and CVaR inputs on both sides of the one-block
selection (8192 fp32 keys).

    python tools/gpu_smoke.py                        # impl cuda, on cuda:0
    python tools/gpu_smoke.py --device cpu --impl cpu  # the same calls on the CPU (how the tests check it)
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script, tools/ is on sys.path, not the repository
    sys.path.insert(0, ROOT)

import fastsam  # noqa: E402
from fastsam import losses  # noqa: E402
from fastsam import ops as O  # noqa: E402
import fastsam.ops as C  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16)
# 70001 > one chunk; 40 tiny tensors > one launch's tensor slots (29 with 7 lists); a 4-d filter bank for the
# per-row (filter-wise ASAM) scales.
SHAPES = [(3,), (5, 7), (2, 3, 3, 3), (70001,)] + [(i % 5 + 1,) for i in range(40)]


def tensors(device: str, dtype: torch.dtype, seed: int, positive: bool = False) -> List[torch.Tensor]:
    """One tensor per SHAPES entry, plus a 1000-element view one element into its storage (misaligned)."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(s, generator=g) for s in SHAPES + [(1001,)]]
    out = [(t.abs() + 0.1 if positive else t).to(device=device, dtype=dtype) for t in out]
    return out[:-1] + [out[-1][1:]]  # sliced on the device: a copy there would be aligned again


def scalar(device: str, value: float, n: int = 1) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.float32, device=device)


def sam_ops(device: str, impl: str, dtype: torch.dtype) -> None:
    """Each SAM op once, with every optional input that selects a kernel variant."""
    w, g, b, ema, gb, gc, m = (tensors(device, dtype, seed) for seed in range(7))
    v = tensors(device, dtype, 7, positive=True)
    rows = [torch.empty(t.shape[0], dtype=torch.float32, device=device) for t in w]
    acc, acc2 = scalar(device, 0.0), scalar(device, 0.0, 2)
    inv_scale, found_inf, coef = scalar(device, 0.5), scalar(device, 0.0), torch.tensor([1.0, 0.5, 0.25], device=device)
    steps = [scalar(device, 3.0) for _ in w]

    O.row_norm_(rows, w, 0.01, impl=impl)
    O.norm_sq_(acc, g, w, [], O.MODE_IDENTITY, 0.0, impl=impl)
    O.norm_sq_(acc, g, w, [], O.MODE_ABS, 0.01, ema=ema, sigma=0.5, amp=O.AmpArgs(inv_scale), impl=impl)
    O.norm_sq_(acc, g, w, rows, O.MODE_ROW, 0.01, impl=impl)
    O.perturb_(w, g, b, [], acc, 0.05, 1e-12, O.MODE_IDENTITY, 0.0, False, impl=impl)
    amp = O.AmpArgs(inv_scale, found_inf)
    O.perturb_(w, g, b, rows, acc, 0.05, 1e-12, O.MODE_ROW, 0.01, True, ema=ema, sigma=0.5, lmbda=0.9, amp=amp,
               impl=impl)
    O.reflect_(w, b, ema, acc, 0.1, 1e-12, grads=g, grad_copies=gb, amp=amp,
               impl=impl)
    O.dot_norm_sq_(acc2, g, gb, impl=impl)
    O.restore_(w, b, impl=impl)
    O.restore_sgd_(w, g, b, m, 0.1, 1e-4, 0.9, 0.0, True, False, True, impl=impl)
    O.restore_sgd_(w, g, b, m, 0.1, 1e-4, 0.9, 0.1, False, True, False, grad=O.GradArgs(coef, gb, gc), amp=amp,
                   impl=impl)
    O.restore_adam_(w, g, b, m, v, 1e-3, 0.9, 0.999, 1e-2, 1e-8, True, False, 3.0, impl=impl)
    O.restore_adam_(w, g, [], m, v, 1e-3, 0.9, 0.999, 1e-2, 1e-8, False, True, 3.0, steps=steps,
                    grad=O.GradArgs(coef, gb, gc), amp=amp, impl=impl)


def cvar_ops(device: str, impl: str, dtype: torch.dtype) -> None:
    """Each CVaR op once below and once above the one-block selection's size."""
    g = torch.Generator().manual_seed(11)
    for n in (100, 10000):
        C.cvar_select(torch.randn(n, generator=g).to(device, dtype), 0.3, impl=impl)
        logits = torch.randn(n, 8, generator=g).to(device, dtype)
        target = torch.randint(0, 8, (n,), generator=g)
        target[::7] = -1  # ignored samples
        C.cvar_cross_entropy(logits, target.to(device), 0.3, -1, 0.1, impl=impl)
        labels = torch.randint(0, 2, (n, 3), generator=g).to(dtype)
        labels[::5, 0] = -1
        pos_weight = torch.rand(3, generator=g).add(0.5).to(device)
        for per_sample in (False, True):
            C.cvar_bce_with_logits(logits[:, :3].contiguous(), labels.to(device), pos_weight, 0.3, per_sample, -1.0,
                                   impl=impl)


def training_step(device: str, impl: str) -> None:
    """One SAM + SGD(momentum) step and one CVaR cross-entropy forward + backward, through the public API."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 5)).to(device)
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, impl=impl)
    x, y = torch.randn(16, 12, device=device), torch.randint(0, 5, (16,), device=device)
    losses.cvar_cross_entropy(model(x), y, alpha=0.3, impl=impl).backward()
    opt.first_step(zero_grad=True)
    losses.cvar_cross_entropy(model(x), y, alpha=0.3, impl=impl).backward()
    opt.second_step(zero_grad=True)


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="default: cuda")
    p.add_argument("--impl", default="cuda", help="fastsam impl to call (default: cuda)")
    args = p.parse_args(argv)
    available = fastsam.available_impls(args.device)
    if args.impl not in available:
        print(f"gpu_smoke: impl {args.impl!r} is not available on {args.device} (available: {', '.join(available)})",
              file=sys.stderr)
        return 2
    for dtype in DTYPES:
        sam_ops(args.device, args.impl, dtype)
        cvar_ops(args.device, args.impl, dtype)
        print(f"ops ok: {args.impl} on {args.device}, {dtype}", flush=True)
    training_step(args.device, args.impl)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()  # a kernel fault surfaces here, not at the asynchronous launch
    print(f"training step ok: {args.impl} on {args.device}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
