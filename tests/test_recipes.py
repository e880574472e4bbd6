"""Training-loop recipes against references on the same inputs: degenerate (all-zero, missing) grads for
every method, gradient clipping between the passes, and gradient accumulation over micro-batches."""
import copy
import math

import pytest
import torch
import torch.nn as nn

import fastsam
from fastsam.utils import frozen_bn_stats

from _impls import assert_close
from _sam_loops import CPU_IMPLS, assert_models_close, batches, loop_sam, loss_at, operator_fn, small_mlp

SGD_KW = dict(lr=0.1, momentum=0.9)
CRSAM_GAMMA, CRSAM_BETA = 0.1, 0.05

# Every method and variant: (class, options). Built on (name, tensor) pairs, ASAM normalizes only "*weight*".
METHODS = {
    "sam_p2": (fastsam.SAM, dict()),
    "sam_pinf": (fastsam.SAM, dict(rho=1e-3, p=math.inf)),
    "sam_adaptive": (fastsam.SAM, dict(adaptive=True)),
    "asam_elementwise": (fastsam.ASAM, dict()),
    "asam_filterwise": (fastsam.ASAM, dict(normalization="filterwise")),
    "friendly_sam": (fastsam.FriendlySAM, dict()),
    "crsam": (fastsam.CRSAM, dict(gamma=CRSAM_GAMMA, beta=CRSAM_BETA)),
    "lastsam": (fastsam.LastSAM, dict(switch_at=0)),
    "lastsam_orthogonal": (fastsam.LastSAM, dict(switch_at=0, orthogonal=True, sharpness="sam")),
}


def build(method, params, impl, base_kw=SGD_KW):
    """``method`` over torch.optim.SGD(**base_kw)."""
    cls, options = METHODS[method]
    return cls(params, torch.optim.SGD, impl=impl, **options, **base_kw)


SHAPES = {"conv.weight": (4, 3, 3, 3), "fc.weight": (5, 6), "fc.bias": (5,)}


def make_params(dtype, seed=0):
    """Leaf tensors of SHAPES in ``dtype`` (conv-shaped for ASAM filter-wise, a bias for its name rule)."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g).to(dtype).requires_grad_() for n, s in SHAPES.items()}


def make_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(w.shape, generator=g).to(w.dtype) for n, w in params.items()}


def n_passes(opt):
    return 3 if isinstance(opt, fastsam.CRSAM) else 2


def run_step(opt, params, pass_grads):
    """One step of ``opt`` with given grads per pass (dict name -> tensor; a missing name has no grad).
    Returns the params (clones) after every step call but the last."""
    steps = [opt.first_step, opt.second_step] + ([opt.third_step] if isinstance(opt, fastsam.CRSAM) else [])
    points = []
    for i, (grads, step) in enumerate(zip(pass_grads, steps)):
        for n, w in params.items():
            w.grad = grads[n].clone() if n in grads else None
        step(zero_grad=True)
        if i < len(steps) - 1:
            points.append({n: w.detach().clone() for n, w in params.items()})
    return points


def step_grad(opt, pass_grads, name):
    """The grad the base optimizer steps with when every pass ran at w: CR-SAM's combination, else the last."""
    if not isinstance(opt, fastsam.CRSAM):
        return pass_grads[-1][name]
    g0, gp, gm = (g[name] for g in pass_grads)
    return gp + CRSAM_GAMMA * (gp + gm - 2 * g0) + CRSAM_BETA * (gp - gm)


# ---- degenerate grads ------------------------------------------------------------------------------
@pytest.mark.parametrize("device,impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("method", list(METHODS))
def test_zero_grad_gives_no_perturbation(device, impl, dtype, method):
    """g = 0 at w: e = 0 (rho / (0 + 1e-12) stays finite: the scale is fp32, where 1e-12 does not
    underflow as it does in fp16), so every point is w bit for bit, and two steps equal plain SGD steps
    (fp32 math on the same values, one rounding) with the grads of the later passes (CR-SAM: their
    combination). No momentum (torch's SGD rounds its buffer before using it, the fused kernel after) and
    an lr that is a power of 2 (impl "torch" takes torch's SGD step, which rounds lr to the param dtype)."""
    params = make_params(dtype)
    opt = build(method, list(params.items()), impl, dict(lr=0.125))
    for step in range(2):  # the second step: Friendly SAM's d = g - sigma m with m = 0
        zero = {n: torch.zeros_like(w) for n, w in params.items()}
        pass_grads = [zero] + [make_grads(params, 10 * step + k) for k in range(1, n_passes(opt))]
        before = {n: w.detach().clone() for n, w in params.items()}
        for point in run_step(opt, params, pass_grads):
            for n, w in point.items():
                assert torch.equal(w, before[n]), f"{n} moved with a zero grad"
        fp32_grads = [{n: g.float() for n, g in grads.items()} for grads in pass_grads]
        for n, w in params.items():
            assert torch.isfinite(w).all(), n
            assert_close(w, (before[n].float() - 0.125 * step_grad(opt, fp32_grads, n)).to(dtype), dtype)


@pytest.mark.parametrize("device,impl", CPU_IMPLS)
@pytest.mark.parametrize("method", list(METHODS))
def test_zero_grads_in_one_group(device, impl, method):
    """A group whose grads are all zero adds nothing to the global norm (or the orthogonal projection):
    it stays at w, then takes the plain step; the other group moves as if it were alone."""
    params, alone = make_params(torch.float32), make_params(torch.float32)
    zero_names = ["fc.weight", "fc.bias"]
    groups = [{"params": [params[n] for n in zero_names], "param_names": zero_names},
              {"params": [params["conv.weight"]], "param_names": ["conv.weight"]}]
    opt = build(method, groups, impl)
    opt_alone = build(method, [("conv.weight", alone["conv.weight"])], impl)
    pass_grads = [make_grads(params, k) for k in range(n_passes(opt))]
    for n in zero_names:
        pass_grads[0][n].zero_()
    before = {n: params[n].detach().clone() for n in zero_names}
    expected = {n: params[n].detach().clone().requires_grad_() for n in zero_names}
    for n, w in expected.items():
        w.grad = step_grad(opt, pass_grads, n)
    torch.optim.SGD(list(expected.values()), **SGD_KW).step()
    points = run_step(opt, params, pass_grads)
    points_alone = run_step(opt_alone, {"conv.weight": alone["conv.weight"]},
                            [{"conv.weight": g["conv.weight"]} for g in pass_grads])
    for point, point_alone in zip(points, points_alone):
        assert not torch.equal(point["conv.weight"], params["conv.weight"].detach())  # the other group moved
        torch.testing.assert_close(point["conv.weight"], point_alone["conv.weight"])
        for n in zero_names:
            assert torch.equal(point[n], before[n]), n
    torch.testing.assert_close(params["conv.weight"], alone["conv.weight"])
    for n in zero_names:
        torch.testing.assert_close(params[n], expected[n])


@pytest.mark.parametrize("device,impl", CPU_IMPLS)
@pytest.mark.parametrize("method", list(METHODS))
def test_param_without_grad_in_the_last_pass_is_restored(device, impl, method):
    """davda54 leaves such a parameter at w + e; every fastsam method restores it bit for bit (and the
    base optimizer, seeing no grad, does not move it)."""
    params = make_params(torch.float32)
    opt = build(method, list(params.items()), impl)
    pass_grads = [make_grads(params, k) for k in range(n_passes(opt))]
    del pass_grads[-1]["fc.bias"]
    before = params["fc.bias"].detach().clone()
    points = run_step(opt, params, pass_grads)
    assert not torch.equal(points[0]["fc.bias"], before)
    assert torch.equal(params["fc.bias"], before)


@pytest.mark.parametrize("device,impl", CPU_IMPLS)
def test_crsam_param_without_grad_at_w_plus_e_is_restored(device, impl):
    """CR-SAM needs g+ for every parameter it moved: it restores w, then raises."""
    params = make_params(torch.float32)
    opt = build("crsam", list(params.items()), impl)
    before = {n: w.detach().clone() for n, w in params.items()}
    pass_grads = [make_grads(params, k) for k in range(2)]
    del pass_grads[1]["fc.bias"]
    with pytest.raises(RuntimeError, match="w \\+ e"):
        run_step(opt, params, pass_grads)
    assert all(torch.equal(w, before[n]) for n, w in params.items())


# ---- clipping between the passes ---------------------------------------------------------------------
MAX_NORM = 0.05


class ClippingSGD(torch.optim.SGD):
    """SGD that clips the grads to MAX_NORM first: in loop_sam it steps with the second-pass grads."""

    def step(self, closure=None):
        torch.nn.utils.clip_grad_norm_([p for g in self.param_groups for p in g["params"]], MAX_NORM)
        return super().step(closure)


@pytest.mark.parametrize("device,impl", CPU_IMPLS)
def test_clipping_the_second_pass_grad(device, impl):
    ref, fast = small_mlp(), small_mlp()
    data = batches(ref, 6)
    loop_sam(ref, ClippingSGD(ref.parameters(), **SGD_KW), data, 0.05, 2, operator_fn("none"), 1e-12)
    opt = fastsam.SAM(fast.parameters(), torch.optim.SGD, impl=impl, **SGD_KW)
    for batch in data:
        loss_at(fast, batch).backward()
        opt.first_step(zero_grad=True)
        with frozen_bn_stats(fast):
            loss_at(fast, batch).backward()
        norm = nn.utils.clip_grad_norm_(fast.parameters(), MAX_NORM)
        assert norm > MAX_NORM  # the clipping did scale the grads
        opt.second_step(zero_grad=True)
    assert_models_close(fast, ref)


@pytest.mark.parametrize("device,impl", CPU_IMPLS)
@pytest.mark.parametrize("kw", [dict(), dict(p=math.inf), dict(adaptive=True)], ids=["p2", "pinf", "adaptive"])
def test_clipping_the_first_pass_grad_changes_nothing(device, impl, kw):
    """e depends on g only through its direction (g / ||T g||, or sign g): scaling g by a clip factor
    c > 0 gives the same point to rounding, and the step uses the second-pass grad."""
    models = [small_mlp(), small_mlp()]
    opts = [fastsam.SAM(m.parameters(), torch.optim.SGD, impl=impl, **kw, **SGD_KW) for m in models]
    for batch in batches(models[0], 3):
        points = []
        for clip, model, opt in zip((False, True), models, opts):
            loss_at(model, batch).backward()
            if clip:
                assert nn.utils.clip_grad_norm_(model.parameters(), 1e-3) > 1e-2
            opt.first_step(zero_grad=True)
            points.append(copy.deepcopy(model.state_dict()))
            with frozen_bn_stats(model):
                loss_at(model, batch).backward()
            opt.second_step(zero_grad=True)
        for n, w in points[0].items():
            torch.testing.assert_close(points[1][n], w, rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")
    assert_models_close(models[1], models[0])


# ---- gradient accumulation -----------------------------------------------------------------------------
def mlp_without_bn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))


def accumulate(model, batch, k):
    """Backward of loss / k over k equal micro-batches: the grad of the batch's mean loss, which it returns."""
    total = 0.0
    for x, y in zip(batch[0].chunk(k), batch[1].chunk(k)):
        loss = loss_at(model, (x, y)) / k
        loss.backward()
        total += loss.detach()
    return total


@pytest.mark.parametrize("device,impl", CPU_IMPLS)
@pytest.mark.parametrize("use_closure", [False, True], ids=["explicit", "closure"])
def test_accumulated_micro_batches_equal_one_big_batch(device, impl, use_closure):
    ref, fast = mlp_without_bn(), mlp_without_bn()
    data = batches(ref, 5)  # 8 samples each, 4 micro-batches of 2
    loop_sam(ref, torch.optim.SGD(ref.parameters(), **SGD_KW), data, 0.05, 2, operator_fn("none"), 1e-12)
    opt = fastsam.SAM(fast.parameters(), torch.optim.SGD, impl=impl, **SGD_KW)
    for batch in data:
        if use_closure:
            opt.step(lambda: accumulate(fast, batch, 4))
            opt.zero_grad()
        else:
            accumulate(fast, batch, 4)
            opt.first_step(zero_grad=True)
            with frozen_bn_stats(fast):
                accumulate(fast, batch, 4)
            opt.second_step(zero_grad=True)
    assert_models_close(fast, ref)
