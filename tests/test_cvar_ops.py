"""Every implementation of the CVaR ops against the reference (fastsam.ops.cvar_reference), same inputs."""
import math
import os

import pytest
import torch

from fastsam import _extension
import fastsam.ops as C
from fastsam.ops import cvar_reference as R

from _impls import assert_close, impl_params

OP_IMPLS = [p for p in impl_params() if p.values[1] != "torch"]  # torch *is* the reference
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ALPHAS = [1.0, 0.5, 0.3, 0.77, 1e-4]  # 0.77 n is not an integer; 1e-4 n < 1 for small n


def gen(seed):
    return torch.Generator().manual_seed(seed)


def _cpu_or_skip():
    required = os.environ.get("FASTSAM_REQUIRE_IMPLS", "").split(",")
    if not _extension.impl_works_on("cpu", "cpu") and "cpu" not in required:
        pytest.skip("cpu impl not built")


def check(out, ref, grad_dtype):
    """value and var (opmath) to fp32 tolerance; the gradient to that of its dtype; NaN where the ref has NaN."""
    for a, b in zip(out[:2], ref[:2]):
        assert a.shape == () and a.dtype == b.dtype
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-5, atol=1e-6, equal_nan=True)
    assert out[2].dtype == grad_dtype and out[2].shape == ref[2].shape
    nan = ref[2].isnan()
    assert torch.equal(out[2].isnan().cpu(), nan.cpu())
    assert_close(torch.where(nan, 0, out[2]).cpu(), torch.where(nan, 0, ref[2]).cpu(), grad_dtype)


def ce_inputs(n, c, dtype, device, seed, ignore_every=0, dup=False):
    g = gen(seed)
    logits = (torch.randn(n, c, generator=g) * 3).to(dtype)
    target = torch.randint(0, c, (n,), generator=g)
    if ignore_every:
        target[::ignore_every] = -1
    if dup and n >= 4:  # exact ties: a quarter of the rows repeat row 0
        logits[1::4] = logits[0]
        target[1::4] = target[0] if target[0] >= 0 else 0
        target[0] = target[1]
    return logits.to(device), target.to(device)


def bce_inputs(n, labels, dtype, device, seed, ignore_frac=0.0):
    g = gen(seed)
    logits = (torch.randn(n, labels, generator=g) * 2).to(dtype)
    target = torch.randint(0, 2, (n, labels), generator=g).to(dtype)
    if ignore_frac:
        target[torch.rand(n, labels, generator=g) < ignore_frac] = -1
    return logits.to(device), target.to(device)


# ------------------------------------------------------------------------------------- cvar_select
@pytest.mark.parametrize("device,impl", OP_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 3, 32, 1000])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_select(device, impl, dtype, n, alpha):
    losses = torch.randn(n, generator=gen(n)).to(dtype).to(device)
    check(C.cvar_select(losses, alpha, impl=impl), R.cvar_select(losses.cpu(), alpha), dtype)


@pytest.mark.parametrize("device,impl", OP_IMPLS)
@pytest.mark.parametrize("alpha", [0.3, 0.25, 0.5, 0.9])
def test_select_ties(device, impl, alpha):
    # integer losses: many ties, also exactly at the threshold (the tied losses share its weight)
    losses = torch.randint(0, 5, (40,), generator=gen(1)).float().to(device)
    out = C.cvar_select(losses, alpha, impl=impl)
    check(out, R.cvar_select(losses.cpu(), alpha), torch.float32)
    w = out[2].cpu()
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-6)
    tied = losses.cpu() == out[1].cpu()
    assert torch.unique(w[tied]).numel() == 1


@pytest.mark.parametrize("device,impl", OP_IMPLS)
def test_select_special(device, impl):
    nan = torch.tensor([1.0, float("nan"), 3.0], device=device)
    check(C.cvar_select(nan, 0.5, impl=impl), R.cvar_select(nan.cpu(), 0.5), torch.float32)
    assert C.cvar_select(nan, 0.5, impl=impl)[2].isnan().all()
    empty = torch.empty(0, device=device)
    out = C.cvar_select(empty, 0.5, impl=impl)
    assert out[0].isnan() and out[1].isnan() and out[2].shape == (0,)
    same = torch.full((7,), 2.5, device=device)  # all tied: the mean, whatever alpha
    out = C.cvar_select(same, 0.3, impl=impl)
    assert float(out[0]) == 2.5 and float(out[1]) == 2.5
    assert torch.allclose(out[2].cpu(), torch.full((7,), 1 / 7))


@pytest.mark.parametrize("device,impl", OP_IMPLS)
def test_select_snaps_k(device, impl):
    # 0.3 * 10 is 3.0000000000000004 in float64: k snaps to 3, the 4th largest gets no weight
    losses = torch.arange(10, 0, -1).float().to(device)
    value, var, w = C.cvar_select(losses, 0.3, impl=impl)
    assert float(value) == 9.0 and float(var) == 8.0
    assert w.cpu()[3] == 0 and torch.allclose(w.cpu()[:3], torch.full((3,), 1 / 3))


def test_select_large_n_cpu_exact_ordering():
    # the same loss vector in both: the ordering is the same, so every weight matches
    _cpu_or_skip()
    losses = torch.randn(1000003, generator=gen(5)).exp()
    losses[::7] = losses[3]  # ties near the middle of the distribution
    for alpha in (0.3, 0.5, 0.77, 1.0):
        check(C.cvar_select(losses, alpha, impl="cpu"), R.cvar_select(losses, alpha), torch.float32)


# ---------------------------------------------------------------------------------- cross-entropy
@pytest.mark.parametrize("device,impl", OP_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c", [(1, 1), (3, 8), (32, 8), (257, 100), (64, 1000)])
@pytest.mark.parametrize("alpha", [1.0, 0.3, 0.77, 1e-4])
def test_cross_entropy(device, impl, dtype, n, c, alpha):
    logits, target = ce_inputs(n, c, dtype, device, seed=n + c, ignore_every=5 if n > 5 else 0)
    out = C.cvar_cross_entropy(logits, target, alpha, -1, 0.0, impl=impl)
    check(out, R.cvar_cross_entropy(logits.cpu(), target.cpu(), alpha, -1, 0.0), dtype)


@pytest.mark.parametrize("device,impl", OP_IMPLS)
@pytest.mark.parametrize("alpha", [0.3, 0.5])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_ties_and_smoothing(device, impl, alpha, smoothing):
    logits, target = ce_inputs(64, 8, torch.float32, device, seed=3, ignore_every=9, dup=True)
    out = C.cvar_cross_entropy(logits, target, alpha, -1, smoothing, impl=impl)
    check(out, R.cvar_cross_entropy(logits.cpu(), target.cpu(), alpha, -1, smoothing), torch.float32)


@pytest.mark.parametrize("device,impl", OP_IMPLS)
def test_cross_entropy_special(device, impl):
    logits, target = ce_inputs(6, 4, torch.float32, device, seed=0)
    # an ignored row with NaN logits changes nothing; a NaN in a counted row makes everything NaN
    logits_nan = logits.clone()
    ignored = target.clone()
    ignored[2] = 7  # ignore_index=7 here
    logits_nan[2, 1] = float("nan")
    for lg, tg, ii in ((logits_nan, ignored, 7), (logits_nan, target, -1)):
        check(C.cvar_cross_entropy(lg, tg, 0.5, ii, 0.0, impl=impl),
              R.cvar_cross_entropy(lg.cpu(), tg.cpu(), 0.5, ii, 0.0), torch.float32)
    value, var, grad = C.cvar_cross_entropy(logits_nan, target, 0.5, -1, 0.0, impl=impl)
    assert value.isnan() and var.isnan() and grad.isnan().all()
    # all targets ignored: NaN loss, zero gradient
    value, var, grad = C.cvar_cross_entropy(logits, torch.full_like(target, -1), 0.5, -1, 0.0, impl=impl)
    assert value.isnan() and var.isnan() and torch.equal(grad.cpu(), torch.zeros(6, 4))
    # a class outside [0, C) is a NaN loss in the op (the Python layer raises on the CPU)
    bad = target.clone()
    bad[0] = 4
    assert C.cvar_cross_entropy(logits, bad, 0.5, -1, 0.0, impl=impl)[0].isnan()
    # no rows
    value, var, grad = C.cvar_cross_entropy(logits[:0], target[:0], 0.5, -1, 0.0, impl=impl)
    assert value.isnan() and grad.shape == (0, 4)


# ------------------------------------------------------------------------------------------- BCE
@pytest.mark.parametrize("device,impl", OP_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,labels", [(1, 1), (5, 12), (32, 12), (300, 7)])
@pytest.mark.parametrize("per_sample", [False, True], ids=["element", "sample"])
@pytest.mark.parametrize("alpha", [1.0, 0.3, 0.77])
def test_bce(device, impl, dtype, n, labels, per_sample, alpha):
    logits, target = bce_inputs(n, labels, dtype, device, seed=n * labels, ignore_frac=0.2)
    out = C.cvar_bce_with_logits(logits, target, None, alpha, per_sample, -1.0, impl=impl)
    check(out, R.cvar_bce_with_logits(logits.cpu(), target.cpu(), None, alpha, per_sample, -1.0), dtype)


@pytest.mark.parametrize("device,impl", OP_IMPLS)
@pytest.mark.parametrize("per_sample", [False, True], ids=["element", "sample"])
def test_bce_pos_weight_soft_targets_ties(device, impl, per_sample):
    logits, target = bce_inputs(40, 12, torch.float32, device, seed=11, ignore_frac=0.1)
    target[5] = torch.rand(12, generator=gen(2)).to(device)  # soft labels
    logits[10:20] = logits[0]
    target[10:20] = target[0]
    target[3] = -1  # a sample with no valid label
    pw = (torch.rand(12, generator=gen(3)) * 3 + 0.25).to(device)
    out = C.cvar_bce_with_logits(logits, target, pw, 0.3, per_sample, -1.0, impl=impl)
    check(out, R.cvar_bce_with_logits(logits.cpu(), target.cpu(), pw.cpu(), 0.3, per_sample, -1.0), torch.float32)
    assert torch.equal(out[2][3].cpu(), torch.zeros(12))


@pytest.mark.parametrize("device,impl", OP_IMPLS)
def test_bce_special(device, impl):
    logits, target = bce_inputs(4, 3, torch.float32, device, seed=0)
    value, _, grad = C.cvar_bce_with_logits(logits, torch.full_like(target, -1), None, 0.5, False, -1.0, impl=impl)
    assert value.isnan() and torch.equal(grad.cpu(), torch.zeros(4, 3))
    logits[1, 2] = float("nan")
    value, var, grad = C.cvar_bce_with_logits(logits, target, None, 0.5, True, -1.0, impl=impl)
    assert value.isnan() and var.isnan() and grad.isnan().all()


# ------------------------------------------------------------------------ large n: reference vs cpu
def check_large(out, ref, losses_ref):
    """value and var tightly; gradient rows whose loss is not within rounding of the threshold."""
    check(out[:2] + (ref[2],), ref, ref[2].dtype)
    t = float(ref[1])
    far = (losses_ref - t).abs() > 1e-5 * max(abs(t), 1.0)
    assert far.float().mean() > 0.99
    torch.testing.assert_close(out[2][far], ref[2][far], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.3, 0.77])
def test_cross_entropy_large_n_cpu(alpha):
    _cpu_or_skip()
    logits, target = ce_inputs(262144, 8, torch.float32, "cpu", seed=9, ignore_every=11)
    ref = R.cvar_cross_entropy(logits, target, alpha, -1, 0.0)
    losses = torch.nn.functional.cross_entropy(logits, target, ignore_index=-1, reduction="none")
    check_large(C.cvar_cross_entropy(logits, target, alpha, -1, 0.0, impl="cpu"), ref,
                losses.unsqueeze(1).expand_as(logits))


@pytest.mark.parametrize("per_sample", [False, True], ids=["element", "sample"])
def test_bce_large_n_cpu(per_sample):
    _cpu_or_skip()
    logits, target = bce_inputs(100000, 12, torch.float32, "cpu", seed=4, ignore_frac=0.05)
    ref = R.cvar_bce_with_logits(logits, target, None, 0.3, per_sample, -1.0)
    el = torch.nn.functional.binary_cross_entropy_with_logits(logits, target.clamp(min=0), reduction="none")
    valid = target != -1
    losses = (torch.where(valid, el, 0).sum(1) / valid.sum(1).clamp(min=1)).unsqueeze(1) if per_sample else el
    check_large(C.cvar_bce_with_logits(logits, target, None, 0.3, per_sample, -1.0, impl="cpu"), ref,
                losses.expand_as(logits))


def test_cpu_threads_do_not_change_results():
    _cpu_or_skip()
    logits, target = ce_inputs(50000, 8, torch.float32, "cpu", seed=2, ignore_every=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = C.cvar_cross_entropy(logits, target, 0.3, -1, 0.1, impl="cpu")
        torch.set_num_threads(max(threads, 2))
        many = C.cvar_cross_entropy(logits, target, 0.3, -1, 0.1, impl="cpu")
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ triton: the multi-program path
@pytest.mark.parametrize("device,impl", [p for p in OP_IMPLS if p.values[1] == "triton"])
def test_triton_large_n_path(device, impl, monkeypatch):
    from fastsam.ops import triton_cvar

    monkeypatch.setattr(triton_cvar, "SMALL_N", 16)
    losses = torch.randint(0, 50, (300,), generator=gen(8)).float().to(device)
    check(C.cvar_select(losses, 0.3, impl=impl), R.cvar_select(losses.cpu(), 0.3), torch.float32)
    logits, target = ce_inputs(200, 8, torch.float32, device, seed=5, ignore_every=7, dup=True)
    check(C.cvar_cross_entropy(logits, target, 0.77, -1, 0.1, impl=impl),
          R.cvar_cross_entropy(logits.cpu(), target.cpu(), 0.77, -1, 0.1), torch.float32)
    logits, target = bce_inputs(30, 12, torch.float32, device, seed=6, ignore_frac=0.2)
    for per_sample in (False, True):
        check(C.cvar_bce_with_logits(logits, target, None, 0.3, per_sample, -1.0, impl=impl),
              R.cvar_bce_with_logits(logits.cpu(), target.cpu(), None, 0.3, per_sample, -1.0), torch.float32)
