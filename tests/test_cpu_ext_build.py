"""The compiled CPU kernels beyond what test_ops.py compares: registration, input checks, dense
non-contiguous layouts, determinism across thread counts, and the non-AVX2 fallback loops."""
import os
import subprocess
import sys

import pytest
import torch

from fastsam import _extension
from fastsam.ops import op_table
from fastsam.ops import reference as R

pytestmark = pytest.mark.skipif(not _extension.impl_works_on("cpu", "cpu"), reason="fastsam._C is not built")
OPS = op_table.NAMES


def F():
    return torch.ops.fastsam


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernel_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastsam::{op}", "CPU")


def _perturb(w=None, g=None, b=None, rows=(), norm=None, mode=0, ema=()):
    w = w if w is not None else [torch.randn(4, 5)]
    g = g if g is not None else [torch.randn(4, 5)]
    b = b if b is not None else [torch.empty(4, 5)]
    norm = norm if norm is not None else torch.ones(1)
    F().perturb_(w, g, b, list(rows), norm, 0.1, 1e-12, mode, 0.0, False, list(ema), 0.5, 0.9)


def _sgd(grads_b, coef):
    one = [torch.ones(3)]
    F().restore_sgd_(one, one, one, [], 0.1, 0.0, 0.0, 0.0, False, False, False, grads_b, [], coef)


@pytest.mark.parametrize("call,match", [
    (lambda: _perturb(b=[]), "backups has 0 tensors, expected 1"),
    (lambda: _perturb(g=[torch.randn(4, 6)]), "grads\\[0\\] has 24 elements, expected 20"),
    (lambda: _perturb(g=[torch.randn(4, 5).half()]), "grads\\[0\\] has dtype Half, expected Float"),
    (lambda: _perturb(w=[torch.randn(4, 5).double()], g=[torch.randn(4, 5).double()]), "unsupported dtype Double"),
    (lambda: _perturb(w=[torch.randn(4, 5), torch.randn(3).half()], g=[torch.randn(4, 5)] * 2,
                      b=[torch.empty(4, 5)] * 2), "one dtype per call"),
    (lambda: _perturb(g=[torch.randn(5, 4).t()]), "not laid out like"),
    (lambda: _perturb(g=[torch.randn(4, 10)[:, ::2]]), "not laid out like"),
    (lambda: _perturb(norm=torch.ones(2)), "norm_sq must be a float32 tensor with one element"),
    (lambda: _perturb(mode=3), "mode must be 0"),
    (lambda: _perturb(mode=2, rows=[torch.ones(5)]), "row_scales\\[0\\] must be a contiguous float32 tensor with 4"),
    (lambda: F().norm_sq_(torch.zeros(1, dtype=torch.bfloat16), [torch.ones(3)], [torch.ones(3)], [], 0, 0.0, [],
                          0.0), "acc must be a float32"),
    (lambda: F().restore_sgd_([torch.ones(3)], [torch.ones(3)], [torch.ones(3)], [], 0.1, 0.0, 0.9, 0.0, False,
                              False, False, [], [], None), "momentum_buffers has 0 tensors"),
    (lambda: _perturb(ema=[torch.randn(4, 6)]), "ema\\[0\\] has 24 elements"),
    (lambda: _sgd(grads_b=[torch.ones(3)], coef=torch.ones(2)), "coef"),
    (lambda: _sgd(grads_b=[torch.ones(3)] * 2, coef=torch.ones(3)), "grads_b"),
    (lambda: F().reflect_([torch.ones(3)], [torch.ones(3)], [torch.ones(3)], torch.ones(1), 0.1, 0.0,
                          [torch.ones(3)], []), "grad_copies"),
    (lambda: F().dot_norm_sq_(torch.zeros(1), [torch.ones(3)], [torch.ones(3)]), "acc"),
])
def test_bad_inputs_are_rejected(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def test_channels_last_and_zero_dim():
    w = torch.randn(8, 3, 5, 5).to(memory_format=torch.channels_last)
    g = torch.randn(8, 3, 5, 5).to(memory_format=torch.channels_last)
    rows, expected_rows = [torch.empty(8)], [torch.empty(8)]
    F().row_norm_(rows, [w], 0.01)
    R.row_norm_(expected_rows, [w], 0.01)
    torch.testing.assert_close(rows, expected_rows, rtol=1e-6, atol=0)
    ws, es = [w.clone(), torch.tensor(1.5)], [w.clone(), torch.tensor(1.5)]
    gs, rs = [g, torch.tensor(2.0)], [expected_rows[0], torch.tensor([3.0])]
    bs = [torch.empty_like(t) for t in ws]
    F().perturb_(ws, gs, bs, rs, torch.tensor([4.0]), 0.1, 0.0, 2, 0.0, False, [], 0.0, 0.0)
    R.perturb_(es, gs, [torch.empty_like(t) for t in es], rs, torch.tensor([4.0]), 0.1, 0.0, 2, 0.0, False, [], 0.0,
               0.0)
    assert torch.equal(ws[0], es[0]) and torch.equal(bs[0], w)
    torch.testing.assert_close(ws[1], es[1])


def test_reductions_do_not_depend_on_thread_count():
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in [(3, 70000), (2, 200001), (1000003,), (768,), (64, 3, 7, 7)]]
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    before, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            acc, rows, dots = torch.zeros(1), [torch.empty(p.shape[0]) for p in params], torch.zeros(2)
            F().norm_sq_(acc, grads, params, [], 1, 0.01, params, 0.5)
            F().row_norm_(rows, params, 0.01)
            F().dot_norm_sq_(dots, grads, params)
            results.append(torch.cat([acc, dots] + rows))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(r, results[0]) for r in results)


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="x86-64 only")
def test_baseline_isa_loops_match_reference():
    code = """
import torch, fastsam.ops as O
from fastsam.ops import reference as R
g = torch.Generator().manual_seed(0)
for dt in (torch.float32, torch.bfloat16, torch.float16):
    P, G, B, M = [[torch.randn(s, generator=g).to(dt) for s in [(1000,), (37, 3)]] for _ in range(4)]
    tol = dict(rtol=1e-5, atol=1e-6) if dt == torch.float32 else dict(rtol=2**-7, atol=1e-3)
    w1, w2, m1, m2 = [t.clone() for t in P], [t.clone() for t in P], [t.clone() for t in M], [t.clone() for t in M]
    O.restore_sgd_(w1, G, B, m1, 0.1, 1e-2, 0.9, 0.1, False, False, False, impl="cpu")
    R.restore_sgd_(w2, G, B, m2, 0.1, 1e-2, 0.9, 0.1, False, False, False, [], [], None)
    torch.testing.assert_close([t.float() for t in w1 + m1], [t.float() for t in w2 + m2], **tol)
    acc, exp = torch.zeros(1), torch.zeros(1)
    O.norm_sq_(acc, G, P, [], 1, 0.01, impl="cpu"); R.norm_sq_(exp, G, P, [], 1, 0.01, [], 0.0)
    torch.testing.assert_close(acc, exp, rtol=1e-5, atol=1e-6)
"""
    env = dict(os.environ, FASTSAM_CPU_ISA="base")
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="x86-64 only")
@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_cvar_isa_copies_match_reference(isa):
    # The CVaR ops run an AVX-512 copy of their loops where the CPU has it; this runs the others.
    code = """
import torch, fastsam.ops as O
from fastsam.ops import cvar_reference as R
g = torch.Generator().manual_seed(0)
for C in (3, 8, 13):
    x, y = torch.randn(2000, C, generator=g), torch.randint(-1, C, (2000,), generator=g)
    for ls in (0.0, 0.1):
        got, exp = O.cvar_cross_entropy(x, y, 0.3, -1, ls, impl="cpu"), R.cvar_cross_entropy(x, y, 0.3, -1, ls)
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)
    t = torch.randint(-1, 2, (2000, C), generator=g).float()
    pw = torch.rand(C, generator=g) + 0.5
    for per_sample in (False, True):
        got = O.cvar_bce_with_logits(x, t, pw, 0.3, per_sample, -1.0, impl="cpu")
        torch.testing.assert_close(got, R.cvar_bce_with_logits(x, t, pw, 0.3, per_sample, -1.0), rtol=1e-5, atol=1e-6)
l = torch.randn(300000, generator=g)
torch.testing.assert_close(O.cvar_select(l, 0.3, impl="cpu"), R.cvar_select(l, 0.3), rtol=1e-5, atol=1e-6)
"""
    subprocess.run([sys.executable, "-c", code], env=dict(os.environ, FASTSAM_CPU_ISA=isa), check=True)
