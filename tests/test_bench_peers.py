"""The benchmark's peers compute davda54/sam's step (and fastsam's math for the other methods), so the rows of
the table do the same work."""
import pytest
import torch

import fastsam
from fastsam.bench.methods import METHODS
from fastsam.bench.peers import PEERS, rows
from fastsam.bench.shapes import make_params

from _bench_trajectory import trajectory

SHAPES = [("w", (5, 3)), ("b", (5,)), ("c", (2, 3, 2, 2))]


def _two_steps(row, adaptive=False):
    params = make_params(SHAPES)
    opt = METHODS["sam"].make(row, params, rho=0.5)
    for group in opt.param_groups:
        group["adaptive"] = adaptive
    for _ in range(2):
        opt.first_step()
        opt.second_step()
    return params


def _plain_sgd():
    params = [p.detach().clone() for p in make_params(SHAPES)]
    grads = [p.grad for p in make_params(SHAPES)]
    bufs = [g.clone() for g in grads]
    for step in range(2):  # the grads stay fixed, as in the benchmark
        bufs = bufs if step == 0 else [b * 0.9 + g for b, g in zip(bufs, grads)]
        params = [p - 0.1 * b for p, b in zip(params, bufs)]
    return params


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("row", PEERS)
def test_peers_restore_exactly_then_step_sgd(row, adaptive):
    for got, want in zip(_two_steps(row, adaptive), _plain_sgd()):
        torch.testing.assert_close(got.detach(), want)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("row", PEERS)
def test_peer_first_step_moves_to_w_plus_e(row, adaptive):
    params = make_params(SHAPES)
    opt = METHODS["sam"].make(row, params, rho=0.5)
    for group in opt.param_groups:
        group["adaptive"] = adaptive
    w = torch.cat([p.detach().flatten() for p in params])
    g = torch.cat([p.grad.flatten() for p in params])
    t = w.abs() if adaptive else torch.ones_like(w)
    opt.first_step()
    e = torch.cat([p.detach().flatten() for p in params]) - w
    torch.testing.assert_close(e, 0.5 * t * t * g / (t * g).norm())


def test_rows_are_the_peers_then_the_available_impls():
    expected = [i for i in fastsam.available_impls("cpu") if i != "triton"]  # triton on CPU: interpreter only
    assert rows("cpu") == ["loop", "foreach", *expected]
    assert rows("cpu", ["torch"]) == ["loop", "foreach", "torch"]


@pytest.mark.skipif(not hasattr(fastsam, "SAM"), reason="fastsam.SAM is not there yet")
@pytest.mark.parametrize("impl", rows("cpu")[len(PEERS):])
def test_fastsam_rows_do_the_loop_peers_work(impl):
    for got, want in zip(_two_steps(impl), _two_steps("loop")):
        torch.testing.assert_close(got.detach(), want.detach())


# ---- the other methods: Friendly SAM, CR-SAM, LastSAM's sharpness phase ---------------------------------------
FAMILY = [m for m in METHODS if m != "sam"]
# (method, option overrides): the benchmarked configurations, and a few more the peers support
VARIANTS = [(m, {}) for m in FAMILY] + [
    ("friendly_sam", dict(adaptive=True, sigma=0.5, lmbda=0.8)),
    ("crsam", dict(gamma=0.3, beta=0.05)),
    ("lastsam", dict(sharpness="sam", rho=0.05, eta=None)),
    ("lastsam_orthogonal", dict(sharpness="sam", rho=0.05, eta=None)),
    ("looksam", dict(adaptive=True, rho=0.5, alpha=0.5)),  # k is the calls' (METHODS["looksam"].steps)
]
FAMILY_SHAPES = SHAPES + [("scalar", ())]


def _family_trajectory(method, row, options, steps=3):
    """Row ``row``'s trajectory (tests/_bench_trajectory.py) over FAMILY_SHAPES."""
    params = make_params(FAMILY_SHAPES)
    return trajectory(method, METHODS[method].make(row, params, **options), params, FAMILY_SHAPES, steps, row)


def _variant_id(v):
    method, options = v
    return method + "".join(f"-{k}={o}" for k, o in options.items())


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_family_rows_compute_the_fastsam_math(variant):
    """Each loop and foreach peer, and every available fastsam impl, passes through the same points (w + e,
    CR-SAM's w - e, the updated w) and steps with the same grads as fastsam's impl="torch" over three steps.
    Relative tolerance 1e-5, absolute 1e-5 of the typical magnitude (w: 0.02, grads: 1e-3)."""
    method, options = variant
    want_points, want_momenta = _family_trajectory(method, "torch", options)
    for row in rows("cpu"):
        if row == "torch":
            continue
        points, momenta = _family_trajectory(method, row, options)
        for i, (got, want) in enumerate(zip(points, want_points)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-7, msg=lambda m: f"{row}, call {i}: {m}")
        for i, (got, want) in enumerate(zip(momenta, want_momenta)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8, msg=lambda m: f"{row}, step {i}: {m}")


@pytest.mark.parametrize("method,off", [
    ("friendly_sam", dict(sigma=0.0)),  # d = g: SAM
    ("crsam", dict(gamma=0.0, beta=0.0)),  # the base step with g+ alone
    ("lastsam_orthogonal", dict(orthogonal=False)),
    ("lastsam", dict(eta=1.0)),
    ("looksam", dict(alpha=0.0)),  # the steps between with g alone
])
def test_family_trajectories_use_what_the_method_keeps(method, off):
    """The trajectories compared above change when the method's own part is switched off: the comparison
    covers the EMA, the kept grads and the operator T."""
    for row in ("torch", "loop"):
        differ = [float((a - b).abs().max()) for a, b in zip(_family_trajectory(method, row, {})[0],
                                                             _family_trajectory(method, row, off)[0])]
        assert max(differ) > 1e-4, (row, differ)


def test_friendly_sam_peers_follow_the_ema_of_the_raw_grad():
    params = make_params(SHAPES)
    opt = METHODS["friendly_sam"].make("loop", params, rho=0.5, sigma=1.0, lmbda=0.9)
    w = torch.cat([p.detach().flatten() for p in params])
    grads = [torch.cat([p.grad.flatten() for p in make_params(SHAPES, seed=s)]) for s in (1, 2)]
    e = []
    for g in grads:
        offset = 0
        for p in params:
            p.grad = g[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        opt.first_step()
        e.append(torch.cat([p.detach().flatten() for p in params]) - w)
        opt.second_step()
        w = torch.cat([p.detach().flatten() for p in params])
    torch.testing.assert_close(e[0], 0.5 * grads[0] / grads[0].norm())
    d = grads[1] - grads[0]  # m_1 = g_1, sigma = 1
    torch.testing.assert_close(e[1], 0.5 * d / d.norm())


def test_crsam_peers_step_with_the_combined_grad():
    for row in PEERS:
        params = make_params(SHAPES)
        opt = METHODS["crsam"].make(row, params, rho=0.5, gamma=0.2, beta=0.1, momentum=0.0)
        w = torch.cat([p.detach().flatten() for p in params])
        gs = []
        for k, call in enumerate(("first_step", "second_step", "third_step")):
            for p, q in zip(params, make_params(SHAPES, seed=1 + k)):
                p.grad = q.grad
            gs.append(torch.cat([q.grad.flatten() for q in make_params(SHAPES, seed=1 + k)]))
            getattr(opt, call)()
            if call == "second_step":  # at w - e
                moved = torch.cat([p.detach().flatten() for p in params])
                torch.testing.assert_close(moved, w - 0.5 * gs[0] / gs[0].norm())
        g0, gp, gm = gs
        want = w - 0.1 * (gp + 0.2 * (gp + gm - 2 * g0) + 0.1 * (gp - gm))
        torch.testing.assert_close(torch.cat([p.detach().flatten() for p in params]), want)


@pytest.mark.parametrize("row", PEERS)
def test_orthogonal_peers_step_with_a_grad_orthogonal_to_the_first(row):
    params = make_params(SHAPES)
    opt = METHODS["lastsam_orthogonal"].make(row, params, momentum=0.0)
    g = torch.cat([p.grad.flatten() for p in params])
    w = torch.cat([p.detach().flatten() for p in params])
    opt.first_step()
    for p, q in zip(params, make_params(SHAPES, seed=1)):
        p.grad = q.grad
    opt.second_step()
    step = w - torch.cat([p.detach().flatten() for p in params])  # lr * the projected grad
    assert abs(float(step @ g)) < 1e-6 * float(step.norm() * g.norm())
    assert float(step.norm()) > 0


def test_friendly_sam_peers_start_the_ema_of_a_late_parameter():
    """A parameter whose first grad comes at step 2 starts its own EMA then (d = g), as in fastsam."""
    def trajectory(row):
        params = make_params(SHAPES)
        opt = METHODS["friendly_sam"].make(row, params, rho=0.5)
        points = []
        for step in range(3):
            for p, q in zip(params, make_params(SHAPES, seed=10 + step)):
                p.grad = None if (step == 0 and p is params[1]) else q.grad
            opt.first_step()
            points.append(torch.cat([p.detach().flatten() for p in params]))
            opt.second_step()
        return points
    for row in rows("cpu"):
        for got, want in zip(trajectory(row), trajectory("torch")):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-7)


@pytest.mark.parametrize("method", list(METHODS))
def test_compiled_rows_follow_the_foreach_peer(method):
    """The "compiled" row is the foreach peer with each step method under torch.compile: same points and
    momenta as the eager foreach peer over three steps with fresh grads at every pass (inductor may reorder
    fp32 arithmetic: rtol 1e-5)."""
    want_points, want_momenta = _family_trajectory(method, "foreach", {})
    points, momenta = _family_trajectory(method, "compiled", {})
    opt = METHODS[method].make("compiled", make_params(FAMILY_SHAPES))
    assert all(hasattr(getattr(opt, call), "_torchdynamo_orig_callable") for call in METHODS[method].steps)
    for got, want in zip(points + momenta, want_points + want_momenta):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-7)


def test_sam_rows_are_the_peers_then_the_impls():
    """Every method's rows start with loop, foreach and compiled; pytorch_optimizer where the package has the
    method's class; then the fastsam impls."""
    from fastsam.bench import po_peers
    for name, method in METHODS.items():
        peers = ["loop", "foreach", "compiled"]
        if po_peers.available() and name in po_peers.PO_CLASSES:
            peers.append("pytorch_optimizer")
        assert method.rows("cpu") == [*peers, *rows("cpu")[len(PEERS):]]
        assert method.rows("cpu", ["torch"]) == [*peers, "torch"]


def test_grad_reset_puts_the_fixed_grads_back():
    """LookSAM's rows add into .grad on the steps between (the peers): a timed call's prepare puts the pair's fixed
    grads back, values and bindings, so every call starts from the same grads."""
    method = METHODS["looksam"]
    assert method.fresh_grads and all(not m.fresh_grads for name, m in METHODS.items() if name != "looksam")
    params = make_params(SHAPES)
    grads = [p.grad.clone() for p in params]
    bound = [p.grad for p in params]
    reset = method.grad_reset(params)
    opt = method.make("loop", params)
    assert method.step_fn(opt, "loop", reset).prepare is reset
    opt.first_step()
    for p, q in zip(params, make_params(SHAPES, seed=1)):  # another grad at w + e: a g_v of norm > 0
        p.grad = q.grad
    opt.second_step()
    for p, b in zip(params, bound):
        p.grad = b
    opt.step()
    assert all(not torch.equal(p.grad, g) for p, g in zip(params, grads))  # the step between wrote into them
    params[0].grad = torch.zeros_like(grads[0])
    reset()
    assert all(p.grad is b and torch.equal(p.grad, g) for p, b, g in zip(params, bound, grads))


def test_looksam_calls_are_a_cycle_of_k_steps():
    method = METHODS["looksam"]
    k = method.options["k"]
    assert method.cycle == k and method.calls("loop") == ("first_step", "second_step") + ("step",) * (k - 1)
    assert method.calls("pytorch_optimizer") == ("first_step", "second_step") * k
    assert method.passes_per_100_steps() == 100 + 100 // k
    assert method.words_per_param == pytest.approx((15 + 7 * (k - 1)) / k)
