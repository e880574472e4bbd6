"""Loss scaling and skipped steps in the fused ops: ``inv_scale`` (unscale inside the kernel), ``found_inf``
(a skipped step leaves w where it began) and Adam's device step counts, every implementation against the
reference, and the reference against the unscaled math."""
import math

import pytest
import torch

import fastsam.ops as O
from fastsam.ops import reference as R

from _impls import TOL, assert_close
from test_ops import DTYPES, MODES, OP_IMPLS, clone, make, row_scales_for, skip_row_on_scalars

CASES = {
    "size3": [(3,)],
    "size100003": [(100003,)],
    "200tensors": [((i * 7) % 23 + 1, (i * 5) % 11 + 1) if i % 3 else ((i * 13) % 97 + 1,) for i in range(200)],
    "scalars": [(), (2,), ()],
}
SCALE = 1024.0  # a power of two, like GradScaler's: unscaling is then exact
FOUND = [0.0, 1.0]


def scalar(value, device):
    return torch.full((), value, dtype=torch.float32, device=device)


def poison(grads, found):
    """A skipped step has a non-finite grad: put an inf and a nan in (when there is room)."""
    out = clone(grads)
    if found and out:
        out[0].view(-1)[0] = math.inf
        out[-1].view(-1)[-1] = math.nan
    return out


def scaled(ts, s=SCALE):
    return [(t.float() * s).to(t.dtype) for t in ts]


# ---- the reference: scaled grads with inv_scale give the unscaled result; found_inf keeps w ----------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sign", [False, True], ids=["p2", "pinf"])
def test_reference_unscales(dtype, mode, sign):
    shapes = CASES["200tensors"]
    params, grads, ema = make(shapes, dtype, "cpu", 0), make(shapes, dtype, "cpu", 1), make(shapes, dtype, "cpu", 2)
    rows = row_scales_for(params, mode)
    inv = scalar(1 / SCALE, "cpu")
    acc_a, acc_b = torch.zeros(1), torch.zeros(1)
    R.norm_sq_(acc_a, grads, params, rows, mode, 0.01, ema, 0.3)
    R.norm_sq_(acc_b, scaled(grads), params, rows, mode, 0.01, ema, 0.3, inv)
    torch.testing.assert_close(acc_b, acc_a, rtol=1e-6, atol=0)
    outs = []
    for g, s in ((grads, None), (scaled(grads), inv)):
        w, b, m = clone(params), clone(params), clone(ema)
        R.perturb_(w, g, b, rows, acc_a, 0.05, 1e-12, mode, 0.01, sign, m, 0.3, 0.9, s)
        outs.append((w, m))
    for x, y in zip(outs[0][0] + outs[0][1], outs[1][0] + outs[1][1]):
        torch.testing.assert_close(y, x, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_found_inf_keeps_w(dtype):
    shapes = CASES["200tensors"]
    params, ema = make(shapes, dtype, "cpu", 0), make(shapes, dtype, "cpu", 2)
    grads = poison(make(shapes, dtype, "cpu", 1), True)
    found = scalar(1.0, "cpu")
    acc = torch.zeros(1)
    R.norm_sq_(acc, grads, params, [], O.MODE_IDENTITY, 0.0, [], 0.0)
    assert not torch.isfinite(acc).all()  # the optimizers' found_inf of the pass at w
    w, b, m = clone(params), [torch.empty_like(p) for p in params], clone(ema)
    R.perturb_(w, grads, b, [], acc, 0.05, 1e-12, O.MODE_IDENTITY, 0.0, False, m, 0.3, 0.9, None, found)
    for x, y in zip(w + b + m, params + params + ema):
        assert torch.equal(x, y)
    moved = make(shapes, dtype, "cpu", 3)
    bufs, v = make(shapes, dtype, "cpu", 4), [t.abs() for t in make(shapes, dtype, "cpu", 5)]
    for op in ("sgd", "adam"):
        w, m2, v2 = clone(moved), clone(bufs), clone(v)
        if op == "sgd":
            R.restore_sgd_(w, grads, params, m2, 0.1, 0.01, 0.9, 0.0, False, False, False, [], [], None, None, found)
        else:
            R.restore_adam_(w, grads, params, m2, v2, 0.1, 0.9, 0.999, 0.01, 1e-8, True, False, 3.0, [], [], None,
                            None, found)
        for x, y in zip(w + m2 + v2, params + bufs + v):
            assert torch.equal(x, y)
    w = clone(moved)
    R.reflect_(w, params, ema, acc, 0.05, 1e-12, [], [], None, found)
    for x, y in zip(w, params):
        assert torch.equal(x, y)


def test_reference_device_steps_match_float_step():
    shapes = CASES["200tensors"]
    params, grads = make(shapes, torch.float32, "cpu", 0), make(shapes, torch.float32, "cpu", 1)
    m, v = make(shapes, torch.float32, "cpu", 2), [t.abs() for t in make(shapes, torch.float32, "cpu", 3)]
    out = []
    for steps in (None, [torch.tensor(7.0) for _ in shapes]):
        w, m2, v2 = clone(params), clone(m), clone(v)
        R.restore_adam_(w, grads, [], m2, v2, 1e-3, 0.9, 0.999, 0.0, 1e-8, False, False, 7.0, [], [], None,
                        steps=steps)
        out.append(w + m2 + v2)
    for x, y in zip(*out):
        torch.testing.assert_close(y, x, rtol=0, atol=0)


# ---- every implementation against the reference --------------------------------------------------------
def _inv(device):
    return scalar(1 / 3.0, device)  # not a power of two: the multiply itself is checked


@pytest.mark.parametrize("device,impl", OP_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", MODES)
def test_norm_sq_scaled(device, impl, dtype, case, mode):
    skip_row_on_scalars(case, mode)
    shapes = CASES[case]
    params, grads, ema = make(shapes, dtype, device, 0), make(shapes, dtype, device, 1), make(shapes, dtype, device, 2)
    rows = row_scales_for(params, mode)
    for e, sigma in (([], 0.0), (ema, 0.5)):
        acc, expected = torch.zeros(1, device=device), torch.zeros(1, device=device)
        R.norm_sq_(expected, grads, params, rows, mode, 0.01, e, sigma, _inv(device))
        O.norm_sq_(acc, grads, params, rows, mode, 0.01, e, sigma, amp=O.AmpArgs(_inv(device)), impl=impl)
        torch.testing.assert_close(acc, expected, rtol=1e-5 if dtype == torch.float32 else 1e-3, atol=1e-6)


@pytest.mark.parametrize("device,impl", OP_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sign", [False, True], ids=["p2", "pinf"])
@pytest.mark.parametrize("ema_kind", ["none", "copy", "blend"])
@pytest.mark.parametrize("found", FOUND, ids=["finite", "found_inf"])
def test_perturb_scaled(device, impl, dtype, case, mode, sign, ema_kind, found):
    skip_row_on_scalars(case, mode)
    shapes = CASES[case]
    params = make(shapes, dtype, device, 0, positive=mode != O.MODE_IDENTITY)
    grads = poison(make(shapes, dtype, device, 1), found)
    ema0 = [] if ema_kind == "none" else make(shapes, dtype, device, 2)
    sigma, lmbda = (0.0, 0.0) if ema_kind != "blend" else (0.3, 0.9)
    rows = row_scales_for(params, mode)
    norm_sq = torch.tensor([2.5], device=device)
    got, want = [clone(params), [torch.empty_like(p) for p in params], clone(ema0)], \
        [clone(params), [torch.empty_like(p) for p in params], clone(ema0)]
    args = (rows, norm_sq, 0.05, 1e-12, mode, 0.01, sign)
    R.perturb_(want[0], grads, want[1], *args, want[2], sigma, lmbda, _inv(device), scalar(found, device))
    O.perturb_(got[0], grads, got[1], *args, got[2], sigma, lmbda, amp=O.AmpArgs(_inv(device), scalar(found, device)),
               impl=impl)
    for a, b in zip(sum(got, []), sum(want, [])):
        assert_close(a, b)
        if found:
            assert torch.equal(a, b)  # a skipped step copies: bit for bit


@pytest.mark.parametrize("device,impl", OP_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("found", FOUND, ids=["finite", "found_inf"])
def test_reflect_scaled(device, impl, dtype, case, found):
    shapes = CASES[case]
    backups, dirs = make(shapes, dtype, device, 0), make(shapes, dtype, device, 1)
    grads = poison(make(shapes, dtype, device, 2), found)
    norm_sq = torch.tensor([2.5], device=device)
    got, want = [make(shapes, dtype, device, 3), [torch.empty_like(p) for p in backups]], \
        [make(shapes, dtype, device, 3), [torch.empty_like(p) for p in backups]]
    R.reflect_(want[0], backups, dirs, norm_sq, 0.05, 1e-12, grads, want[1], _inv(device), scalar(found, device))
    O.reflect_(got[0], backups, dirs, norm_sq, 0.05, 1e-12, grads, got[1],
               amp=O.AmpArgs(_inv(device), scalar(found, device)), impl=impl)
    for a, b in zip(sum(got, []), sum(want, [])):
        torch.testing.assert_close(a.float(), b.float(), equal_nan=True, **TOL[dtype])


def _combination(shapes, dtype, device, combo):
    if combo == "plain":
        return [], [], None
    gb, gc = make(shapes, dtype, device, 7), make(shapes, dtype, device, 8)
    return gb, gc, torch.tensor([0.7, -0.2, 0.4], device=device)


def _group(gb, gc, coef):
    """The entries' ``grad`` argument of a combination (None without coef)."""
    return None if coef is None else O.GradArgs(coef, gb, gc)


@pytest.mark.parametrize("device,impl", OP_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("momentum,init,backups", [(0.0, False, True), (0.9, True, True), (0.9, False, False)],
                         ids=["plain", "init", "nobackup"])
@pytest.mark.parametrize("combo", ["plain", "combined"])
@pytest.mark.parametrize("found", FOUND, ids=["finite", "found_inf"])
def test_restore_sgd_scaled(device, impl, dtype, case, momentum, init, backups, combo, found):
    shapes = CASES[case]
    start, saved = make(shapes, dtype, device, 0), make(shapes, dtype, device, 1)
    grads = poison(make(shapes, dtype, device, 2), found)
    bufs = make(shapes, dtype, device, 3) if momentum else []
    gb, gc, coef = _combination(shapes, dtype, device, combo)
    b = saved if backups else []
    states = [[clone(start), clone(bufs)] for _ in range(2)]
    hyper = (0.1, 0.01, momentum, 0.1, momentum != 0, False, init)
    amp = O.AmpArgs(_inv(device), scalar(found, device))
    R.restore_sgd_(states[0][0], grads, b, states[0][1], *hyper, gb, gc, coef, *amp)
    O.restore_sgd_(states[1][0], grads, b, states[1][1], *hyper, grad=_group(gb, gc, coef), amp=amp, impl=impl)
    for a, e in zip(sum(states[1], []), sum(states[0], [])):
        assert_close(a, e)
        if found:
            assert torch.equal(a, e)


@pytest.mark.parametrize("device,impl", OP_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
@pytest.mark.parametrize("combo", ["plain", "combined"])
@pytest.mark.parametrize("found", FOUND, ids=["finite", "found_inf"])
@pytest.mark.parametrize("device_steps", [False, True], ids=["float_step", "device_steps"])
def test_restore_adam_scaled(device, impl, dtype, case, decoupled, combo, found, device_steps):
    shapes = CASES[case]
    start, saved = make(shapes, dtype, device, 0), make(shapes, dtype, device, 1)
    grads = poison(make(shapes, dtype, device, 2), found)
    m, v = make(shapes, dtype, device, 3), [t.abs() for t in make(shapes, dtype, device, 4)]
    gb, gc, coef = _combination(shapes, dtype, device, combo)
    # Device step counts differ per tensor (parameters that joined later); the float step is then ignored.
    steps = [torch.tensor(float(1 + (j * 5) % 9), device=device) for j in range(len(shapes))] if device_steps else None
    states = [[clone(start), clone(m), clone(v)] for _ in range(2)]
    hyper = (1e-2, 0.9, 0.999, 0.01, 1e-8, decoupled, False, 4.0)
    amp = O.AmpArgs(_inv(device), scalar(found, device))
    R.restore_adam_(states[0][0], grads, saved, *states[0][1:], *hyper, gb, gc, coef, *amp, steps)
    O.restore_adam_(states[1][0], grads, saved, *states[1][1:], *hyper, steps, grad=_group(gb, gc, coef), amp=amp,
                    impl=impl)
    for a, e in zip(sum(states[1], []), sum(states[0], [])):
        assert_close(a, e)
        if found:
            assert torch.equal(a, e)
    if steps:
        assert [float(s) for s in steps] == [float(1 + (j * 5) % 9) for j in range(len(shapes))]  # not changed


@pytest.mark.parametrize("device,impl", OP_IMPLS)
@pytest.mark.parametrize("name", ["inv_scale", "found_inf"])
def test_loss_scale_arguments_are_checked(device, impl, name):
    params = make([(5,)], torch.float32, device, 0)
    bad = {"inv_scale": None, "found_inf": None, name: torch.ones(2, device=device)}
    with pytest.raises((ValueError, RuntimeError), match=name):
        O.restore_sgd_(params, clone(params), clone(params), [], 0.1, 0.0, 0.0, 0.0, False, False, False,
                       amp=O.AmpArgs(**bad), impl=impl)
    bad[name] = torch.ones(1, dtype=torch.float64, device=device)
    with pytest.raises((TypeError, RuntimeError), match=name):
        O.restore_sgd_(params, clone(params), clone(params), [], 0.1, 0.0, 0.0, 0.0, False, False, False,
                       amp=O.AmpArgs(**bad), impl=impl)
