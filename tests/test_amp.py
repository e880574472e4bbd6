"""torch.amp.GradScaler through every SAM method, and the nonfinite policy: unscaled inside the kernels,
one found flag per step that skips it on the device (no host read), and a skipped step that leaves
parameters and every optimizer state as they were."""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import fastsam
from _impls import TOL, impl_params

IMPLS = impl_params()  # CUDA ones run where there is a GPU
FUSED_IMPLS = [p for p in IMPLS if p.values[1] != "torch"]
BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adam": (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2)),
}
METHODS = {
    "sam": lambda params, base, kw, impl, **o: fastsam.SAM(params, base, rho=0.05, impl=impl, **kw, **o),
    "asam": lambda params, base, kw, impl, **o: fastsam.ASAM(params, base, rho=0.5, impl=impl, **kw, **o),
    "friendly": lambda params, base, kw, impl, **o: fastsam.FriendlySAM(params, base, rho=0.05, impl=impl, **kw, **o),
    "lastsam_ortho": lambda params, base, kw, impl, **o: fastsam.LastSAM(
        params, base, switch_at=1, sharpness="sam", orthogonal=True, impl=impl, **kw, **o),
    "crsam": lambda params, base, kw, impl, **o: fastsam.CRSAM(params, base, rho=0.1, impl=impl, **kw, **o),
    "sam_interval": lambda params, base, kw, impl, **o: fastsam.SAM(params, base, interval=2, impl=impl, **kw, **o),
    "looksam": lambda params, base, kw, impl, **o: fastsam.LookSAM(params, base, k=2, impl=impl, **kw, **o),
    "gsam": lambda params, base, kw, impl, **o: fastsam.GSAM(params, base, rho=0.05, impl=impl, **kw, **o),
    "wsam": lambda params, base, kw, impl, **o: fastsam.WSAM(params, base, rho=0.05, max_norm=1.0, impl=impl, **kw,
                                                             **o),
}
SCALE = 2.0**10
# (method, the pass whose grad is made non-finite): every pass of every method.
POISONED = [(m, k) for m in METHODS for k in (1, 2, 3) if k < 3 or m == "crsam"]


def make_model(dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 4)).to(device, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 6, generator=g).to(device, dtype)
    y = torch.randint(0, 4, (24,), generator=g).to(device)
    return model, x, y


def passes(opt) -> int:
    if not opt.sharpness_active:
        return 1
    return 3 if isinstance(opt, fastsam.CRSAM) else 2


def train_step(opt, model, x, y, scaler=None, poison=None, clip=None):
    """One step of the documented loop; ``poison``: the pass (1-based) whose loss is multiplied by inf."""
    n = passes(opt)
    for k in range(1, n + 1):
        loss = F.cross_entropy(model(x).float(), y)
        if poison == k:
            loss = loss * math.inf
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if k == n:
            break
        if k == 1:
            opt.first_step(zero_grad=True, grad_scaler=scaler)
        else:
            opt.second_step(zero_grad=True)
    if clip is not None:  # clip the grad of the last pass only, unscaled
        if scaler is not None:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad()


SCRATCH = ("backup", "grad0", "grad_plus", "row_scale")


def snapshot(model, opt, poison=1):
    """Parameters, base optimizer state and the method's own state, copied. Friendly SAM's EMA has taken
    the grad of the pass at w when a later pass is the non-finite one (documented): left out then."""
    out = [p.detach().clone() for p in model.parameters()]
    left_out = SCRATCH + (("ema",) if poison > 1 else ())
    for st in list(opt.base_optimizer.state.values()) + list(opt.state.values()):
        for k, v in sorted(st.items()):
            if torch.is_tensor(v) and k not in left_out:
                out.append(v.detach().clone())
    return out


def goes_on_as_if_absent(method, poison):
    # interval's phase counts the skipped step too (the flag stays on the device): the next step is a one-pass one.
    return not (method == "friendly" and poison > 1) and method not in ("sam_interval", "looksam")


def assert_same(a, b, exact=False):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if exact:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x.float(), y.float(), **TOL[y.dtype])


def run(method, base, impl, steps, scaler=None, poison_at=None, poison=None, clip=None, dtype=torch.float32,
        device="cpu", **opts):
    model, x, y = make_model(dtype, device)
    base_cls, kw = BASES[base]
    opt = METHODS[method](model.named_parameters(), base_cls, kw, impl, **opts)
    for i in range(steps):
        train_step(opt, model, x, y, scaler, poison if i == poison_at else None, clip)
    return model, opt


def scaler(device="cpu"):
    return torch.amp.GradScaler(device, init_scale=SCALE, growth_interval=1000)


@pytest.mark.parametrize("device,impl", IMPLS)
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("method", list(METHODS))
def test_amp_matches_the_unscaled_loop(device, impl, base, method):
    """Grads scaled by a power of two and unscaled in the kernels: the same steps as without a scaler."""
    plain, _ = run(method, base, impl, 4, device=device)
    amp, opt = run(method, base, impl, 4, scaler(device), device=device)
    assert_same([p.detach() for p in amp.parameters()], [p.detach() for p in plain.parameters()])
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("device,impl", IMPLS)
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("method,poison", POISONED)
def test_amp_skips_a_nonfinite_step(device, impl, base, method, poison):
    """An inf/NaN grad in any pass skips the whole step: nothing changes (bit for bit), the scaler backs off,
    and the run goes on as if the step had not been there (Adam's counts, momentum, EMA included)."""
    sc = scaler(device)
    model, opt = run(method, base, impl, 2, sc, device=device)
    before = snapshot(model, opt, poison)
    model_x = make_model(device=device)[1:]
    train_step(opt, model, *model_x, sc, poison)
    assert_same(snapshot(model, opt, poison), before, exact=True)
    assert sc.get_scale() == SCALE / 2
    assert opt.skipped_steps == 1
    if not goes_on_as_if_absent(method, poison):
        return
    train_step(opt, model, *model_x, sc)  # at half the scale: unscaling stays exact
    reference, _ = run(method, base, impl, 3, scaler(device), device=device)
    assert_same([p.detach() for p in model.parameters()], [p.detach() for p in reference.parameters()])


@contextlib.contextmanager
def no_host_reads():
    """Fails any read of a floating-point tensor's value on the host: on a GPU those (grads, norms, scales,
    found flags, step counts) live on the device, where a read is a sync. Integer tensors are host-side
    launch metadata (Triton's pointer tables), built on the CPU on every device."""
    names = ("item", "__bool__", "__float__", "__int__", "tolist")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refusing(name):
        def read(t, *args, **kwargs):
            if t.is_floating_point():
                raise AssertionError(f"a {t.dtype} tensor was read on the host ({name}) during the step")
            return saved[name](t, *args, **kwargs)
        return read

    try:
        for n in names:
            setattr(torch.Tensor, n, refusing(n))
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("device,impl", FUSED_IMPLS)
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("method", ["sam", "friendly", "lastsam_ortho", "crsam"])
@pytest.mark.parametrize("poison", [None, 1, 2])
def test_amp_step_reads_nothing_on_the_host(device, impl, base, method, poison):
    sc = scaler(device)
    model, opt = run(method, base, impl, 2, sc, device=device)  # past LastSAM's switch, buffers made
    model_x = make_model(device=device)[1:]
    n = passes(opt)
    for k in range(1, n + 1):
        loss = F.cross_entropy(model(model_x[0]), model_x[1])
        sc.scale(loss * (math.inf if poison == k else 1.0)).backward()
        with no_host_reads():
            if k == 1 and n > 1:
                opt.first_step(zero_grad=True, grad_scaler=sc)
            elif k < n:
                opt.second_step(zero_grad=True)
            else:
                sc.step(opt)
                sc.update()
    assert opt.skipped_steps == (poison is not None)


@pytest.mark.parametrize("device,impl", IMPLS)
@pytest.mark.parametrize("method", ["sam", "crsam"])
def test_amp_clipping_the_last_grad(device, impl, method):
    """scaler.unscale_ before scaler.step (to clip): the optimizer then gets no grad_scale."""
    plain, _ = run(method, "sgd", impl, 3, clip=0.05, device=device)
    amp, _ = run(method, "sgd", impl, 3, scaler(device), clip=0.05, device=device)
    assert_same([p.detach() for p in amp.parameters()], [p.detach() for p in plain.parameters()])


@pytest.mark.parametrize("device,impl", IMPLS)
# Not fp16 Adam: the reference impl takes torch's own Adam step, whose fp16 arithmetic turns eps = 1e-8 into
# 0 and divides by it (the fused kernels do that math in fp32).
@pytest.mark.parametrize("dtype,base", [(torch.bfloat16, "sgd"), (torch.bfloat16, "adam"), (torch.float16, "sgd")],
                         ids=["bf16-sgd", "bf16-adam", "fp16-sgd"])
def test_amp_low_precision_params(device, impl, dtype, base):
    """fp16/bf16 parameters and grads under a scaler: one step of every impl agrees with the reference impl
    to two ulps of the dtype (w + e may round one ulp apart, which moves the second pass's grads too; over
    more steps the runs drift apart as any two low-precision runs do)."""
    expected, _ = run("sam", base, "torch", 1, scaler(device), dtype=dtype, device=device)
    got, _ = run("sam", base, impl, 1, scaler(device), dtype=dtype, device=device)
    two_ulps = dict(rtol=2 * TOL[dtype]["rtol"], atol=2 * TOL[dtype]["atol"])
    for a, b in zip(got.parameters(), expected.parameters()):
        torch.testing.assert_close(a.detach().float(), b.detach().float(), **two_ulps)


def test_mismatched_scaler_use_restores_and_raises():
    sc = scaler()
    model, x, y = make_model()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    start = [p.detach().clone() for p in model.parameters()]
    sc.scale(F.cross_entropy(model(x), y)).backward()
    opt.first_step(zero_grad=True, grad_scaler=sc)
    sc.scale(F.cross_entropy(model(x), y)).backward()
    with pytest.raises(RuntimeError, match="scaler.step"):
        opt.second_step()
    assert_same([p.detach() for p in model.parameters()], start, exact=True)
    opt.zero_grad()
    sc.scale(F.cross_entropy(model(x), y)).backward()
    opt.first_step(zero_grad=True)  # no grad_scaler: the grads of the pass at w were not unscaled
    sc.scale(F.cross_entropy(model(x), y)).backward()
    with pytest.raises(RuntimeError, match="grad_scaler=scaler"):
        sc.step(opt)
    assert_same([p.detach() for p in model.parameters()], start, exact=True)


def test_bad_arguments_name_themselves():
    model, _, _ = make_model()
    with pytest.raises(ValueError, match="nonfinite"):
        fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, nonfinite="ignore")
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(TypeError, match="grad_scaler"):
        opt.first_step(grad_scaler=object())


def test_a_disabled_scaler_is_no_scaler():
    plain, _ = run("sam", "sgd", "torch", 2)
    off, opt = run("sam", "sgd", "torch", 2, torch.amp.GradScaler("cpu", enabled=False))
    assert_same([p.detach() for p in off.parameters()], [p.detach() for p in plain.parameters()], exact=True)


# ---- the nonfinite policy, without a scaler -------------------------------------------------------------
@pytest.mark.parametrize("device,impl", IMPLS)
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("method,poison", POISONED)
def test_nonfinite_skip(device, impl, base, method, poison):
    model, opt = run(method, base, impl, 2, nonfinite="skip", device=device)
    before = snapshot(model, opt, poison)
    model_x = make_model(device=device)[1:]
    train_step(opt, model, *model_x, poison=poison)
    assert_same(snapshot(model, opt, poison), before, exact=True)
    assert opt.skipped_steps == 1
    if not goes_on_as_if_absent(method, poison):
        return
    train_step(opt, model, *model_x)
    reference, _ = run(method, base, impl, 3, device=device)
    assert_same([p.detach() for p in model.parameters()], [p.detach() for p in reference.parameters()])


@pytest.mark.parametrize("device,impl", IMPLS)
@pytest.mark.parametrize("method", ["sam", "friendly", "crsam"])
@pytest.mark.parametrize("poison", [1, 2])
def test_nonfinite_raise(device, impl, method, poison):
    model, opt = run(method, "adam", impl, 2, nonfinite="raise", device=device)
    before = snapshot(model, opt, poison)
    with pytest.raises(FloatingPointError, match="inf or NaN"):
        train_step(opt, model, *make_model(device=device)[1:], poison=poison)
    opt.zero_grad()
    assert_same(snapshot(model, opt, poison), before, exact=True)
    assert opt.next_pass_at_w
    train_step(opt, model, *make_model(device=device)[1:])  # training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skipped_steps_resume():
    model, opt = run("sam", "sgd", "torch", 1, nonfinite="skip")
    train_step(opt, model, *make_model()[1:], poison=1)
    saved = opt.state_dict()
    assert all(g["fastsam"]["skipped_steps"] == 1 for g in saved["param_groups"])
    fresh = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, impl="torch", nonfinite="skip")
    fresh.load_state_dict(saved)
    assert fresh.skipped_steps == 1
    train_step(fresh, model, *make_model()[1:], poison=2)
    assert fresh.skipped_steps == 2


def test_nonfinite_none_is_torchs_behaviour():
    """The default checks nothing (no extra pass over the grads): a NaN spreads, as with torch's optimizers."""
    model, opt = run("sam", "sgd", "torch", 1)
    train_step(opt, model, *make_model()[1:], poison=2)
    assert not all(torch.isfinite(p).all() for p in model.parameters())


# ---- Adam's device step counts (torch's capturable layout) ------------------------------------------------
@pytest.mark.parametrize("device,impl", FUSED_IMPLS)
def test_capturable_adam_is_fused(device, impl, monkeypatch):
    """A capturable Adam group runs in the fused kernel, reading its counts on the device (torch's own
    capturable Adam does not run on the CPU at all)."""
    plain, _ = run("sam", "adam", impl, 3, device=device)
    monkeypatch.setattr(torch.optim.Adam, "step", lambda *a, **k: pytest.fail("torch's step was called"))
    model, x, y = make_model(device=device)
    opt = fastsam.SAM(model.named_parameters(), torch.optim.Adam, impl=impl, lr=1e-2, weight_decay=1e-3,
                      capturable=True)
    for _ in range(3):
        train_step(opt, model, x, y)
    assert_same([p.detach() for p in model.parameters()], [p.detach() for p in plain.parameters()])
    assert all(float(s["step"]) == 3 for s in opt.base_optimizer.state.values())
