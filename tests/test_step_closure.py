"""The step(closure) contract: every method, in every closure style users write, equals the explicit loop.

The explicit loop is the documented one (README "Use it"): the backward at w, ``first_step``, the later passes
inside ``frozen_bn_stats``, ``second_step`` (CR-SAM: ``second_step``, pass 3, ``third_step``; LastSAM before its
switch: one pass and ``step()``). The closures here never freeze BatchNorm themselves: ``step`` does.
"""
import math

import pytest
import torch

import fastsam

from _sam_loops import CPU_IMPLS, assert_models_close, batches, explicit_step, loss_at, small_cnn

STEPS = 20
SWITCH = 10  # LastSAM's switch: 10 one-pass steps, then 10 two-pass steps

METHODS = {
    "sam": lambda m, impl: fastsam.SAM(m.parameters(), torch.optim.SGD, rho=0.05, impl=impl, lr=0.05, momentum=0.9),
    "sam_inf": lambda m, impl: fastsam.SAM(m.parameters(), torch.optim.SGD, rho=0.01, p=math.inf, impl=impl, lr=0.05),
    "sam_adaptive": lambda m, impl: fastsam.SAM(m.parameters(), torch.optim.Adam, rho=0.5, adaptive=True, impl=impl,
                                                lr=1e-3),
    "asam": lambda m, impl: fastsam.ASAM(m.named_parameters(), torch.optim.SGD, impl=impl, lr=0.05, momentum=0.9),
    "asam_filter": lambda m, impl: fastsam.ASAM(m.named_parameters(), torch.optim.AdamW, normalization="filterwise",
                                                impl=impl, lr=1e-3),
    "fsam": lambda m, impl: fastsam.FriendlySAM(m.parameters(), torch.optim.SGD, impl=impl, lr=0.05, momentum=0.9),
    "crsam": lambda m, impl: fastsam.CRSAM(m.parameters(), torch.optim.SGD, impl=impl, lr=0.05, momentum=0.9),
    "crsam_paper": lambda m, impl: fastsam.CRSAM(m.parameters(), torch.optim.SGD, mode="paper", gamma=1e-3, beta=1e-3,
                                                 impl=impl, lr=0.05),
    "lastsam": lambda m, impl: fastsam.LastSAM(m.named_parameters(), torch.optim.SGD, switch_at=SWITCH, impl=impl,
                                               lr=0.05, momentum=0.9),
    "lastsam_orthogonal": lambda m, impl: fastsam.LastSAM(m.named_parameters(), torch.optim.Adam, switch_at=SWITCH,
                                                          sharpness="sam", orthogonal=True, impl=impl, lr=1e-3),
    "sam_interval": lambda m, impl: fastsam.SAM(m.parameters(), torch.optim.SGD, interval=3, impl=impl, lr=0.05),
    "looksam": lambda m, impl: fastsam.LookSAM(m.parameters(), torch.optim.SGD, k=3, impl=impl, lr=0.05),
    "gsam": lambda m, impl: fastsam.GSAM(m.parameters(), torch.optim.SGD, impl=impl, lr=0.05, momentum=0.9),
    "wsam": lambda m, impl: fastsam.WSAM(m.parameters(), torch.optim.AdamW, max_norm=1.0, impl=impl, lr=1e-3),
}


def passes_needed(opt, style):
    """Closure calls one step needs (the caller's own pass at w excluded)."""
    if not opt.sharpness_active:
        n = 1
    elif isinstance(opt, fastsam.CRSAM):
        n = 3
    else:
        n = 2
    paper = isinstance(opt, fastsam.CRSAM) and opt.mode == "paper"  # needs the loss at w: runs it again
    return n - 1 if style == "davda54" and not paper else n


# How users write the loop around step(closure).
STYLES = ["zero_inside", "zero_inside_in_place", "caller_zeroes_after", "caller_zeroes_in_place_after", "davda54"]


def closure_step(model, opt, batch, style):
    """One step(closure) in ``style``; returns the number of closure calls."""
    calls = []

    def closure():
        calls.append(1)
        if style == "zero_inside":
            opt.zero_grad()  # torch's docs: set_to_none=True
        elif style == "zero_inside_in_place":
            model.zero_grad(set_to_none=False)  # in place, outside the optimizer
        loss = loss_at(model, batch)
        loss.backward()
        return loss

    if style == "davda54":
        loss_at(model, batch).backward()
    loss = opt.step(closure)
    assert loss is None or loss.ndim == 0
    if style in ("caller_zeroes_after", "davda54"):
        opt.zero_grad()
    elif style == "caller_zeroes_in_place_after":
        model.zero_grad(set_to_none=False)
    return len(calls)


_EXPLICIT = {}


def explicit_run(method, impl):
    key = (method, impl)
    if key not in _EXPLICIT:
        model = small_cnn()
        opt = METHODS[method](model, impl)
        for batch in batches(model, STEPS):
            explicit_step(model, opt, batch)
        _EXPLICIT[key] = model
    return _EXPLICIT[key]


def _impl_styles():
    """(device, impl, style) params: every style on each impl but Triton, and one on Triton. What the styles
    test is the optimizer's own Python (which passes run, how the grads are read), the same over every impl;
    Triton's kernels run under its CPU interpreter at ~1.5 s a case here, and the trajectory tests of
    test_sam.py and test_sam_family.py hold them to the authors' loops."""
    return [pytest.param(*p.values, style, id=f"{style}-{p.id}", marks=p.marks)
            for p in CPU_IMPLS for style in STYLES if p.values[1] != "triton" or style == "zero_inside"]


@pytest.mark.parametrize("device,impl,style", _impl_styles())
@pytest.mark.parametrize("method", list(METHODS))
def test_step_closure_equals_explicit_loop(device, impl, style, method):
    model = small_cnn()
    opt = METHODS[method](model, impl)
    for i, batch in enumerate(batches(model, STEPS)):
        needed = passes_needed(opt, style)
        assert closure_step(model, opt, batch, style) == needed, f"step {i}"
    assert_models_close(model, explicit_run(method, impl), rtol=1e-6, atol=1e-7)


# ---- misuse and the cases that cannot be told apart -------------------------------------------------------
def _closure(model, batch):
    def closure():
        loss = loss_at(model, batch)
        loss.backward()
        return loss
    return closure


def test_first_step_twice_raises_and_the_step_can_still_finish():
    model = small_cnn()
    w0 = [p.detach().clone() for p in model.parameters()]
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.0)
    batch = batches(model, 1)[0]
    loss_at(model, batch).backward()
    opt.first_step(zero_grad=True)
    loss_at(model, batch).backward()
    with pytest.raises(RuntimeError, match=r"first_step\(\) was called again .*second_step\(\)"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="under way"):
        opt.step(_closure(model, batch))
    opt.second_step()  # lr 0: back at w exactly
    assert all(torch.equal(a, p) for a, p in zip(w0, model.parameters()))


def test_crsam_first_step_between_second_and_third_raises():
    model = small_cnn()
    opt = fastsam.CRSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    batch = batches(model, 1)[0]
    loss_at(model, batch).backward()
    opt.first_step(zero_grad=True)
    loss_at(model, batch).backward()
    opt.second_step(zero_grad=True)
    with pytest.raises(RuntimeError, match=r"third_step\(\)"):
        opt.first_step()


@pytest.mark.parametrize("method", ["sam", "crsam"])
def test_a_closure_that_raises_in_a_later_pass_leaves_w_restored(method):
    model = small_cnn()
    opt = METHODS[method](model, "auto")
    w0 = [p.detach().clone() for p in model.parameters()]
    batch, calls = batches(model, 1)[0], []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("data loader died")
        return _closure(model, batch)()

    with pytest.raises(KeyError):
        opt.step(closure)
    assert all(torch.equal(a, p) for a, p in zip(w0, model.parameters()))
    assert opt.next_pass_at_w
    opt.step(_closure(model, batch))  # and it goes on


def test_new_grads_beside_the_last_steps_grads_raise():
    model = small_cnn()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    data = batches(model, 2)
    opt.step(_closure(model, data[0]))  # leaves the grads of w + e in .grad
    head = model[-1]
    head.weight.grad = head.bias.grad = None  # the caller zeroes the head only, and runs a backward into it
    head(torch.randn(2, 8)).sum().backward()
    with pytest.raises(RuntimeError, match="still hold those the last step left"):
        opt.step(_closure(model, data[1]))


def test_a_backward_onto_the_last_steps_grads_raises():
    model = small_cnn()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    data = batches(model, 2)
    opt.step(_closure(model, data[0]))
    loss_at(model, data[1]).backward()  # davda54's style, but no zero_grad after the last step
    with pytest.raises(RuntimeError, match="added its gradients onto"):
        opt.step(_closure(model, data[1]))


def test_caller_zeroing_in_place_then_backward_is_the_davda54_style():
    """model.zero_grad(set_to_none=False) outside the optimizer, then the backward at w: two in-place changes."""
    ref, model = small_cnn(), small_cnn()
    opt_ref, opt = METHODS["sam"](ref, "auto"), METHODS["sam"](model, "auto")
    for batch in batches(model, 4):
        explicit_step(ref, opt_ref, batch)
        model.zero_grad(set_to_none=False)
        loss_at(model, batch).backward()
        calls = []
        opt.step(lambda: calls.append(1) or _closure(model, batch)())
        assert len(calls) == 1
    assert_models_close(model, ref, rtol=1e-6, atol=1e-7)


def test_bn_stats_update_in_the_pass_at_w_only_unless_freeze_bn_is_off():
    model = small_cnn()
    opt = fastsam.CRSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    for batch in batches(model, 3):
        opt.step(_closure(model, batch))
    assert int(model[1].num_batches_tracked) == 3 and model[1].track_running_stats
    opt.freeze_bn = False
    opt.step(_closure(model, batch))
    assert int(model[1].num_batches_tracked) == 6


def test_grad_scaler_step_without_first_step_names_the_fix():
    """What Lightning's precision="16-mixed" does: the closure outside the optimizer, then scaler.step(opt)."""
    model = small_cnn()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(loss_at(model, batches(model, 1)[0])).backward()
    with pytest.raises(RuntimeError, match='bf16-mixed.*manual optimization'):
        scaler.step(opt)


def test_step_closure_must_be_callable():
    model = small_cnn()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="closure must be callable"):
        opt.step(1.0)


# ---- parameters the compiled kernels do not take -------------------------------------------------------
def _linear_model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)


@pytest.mark.parametrize("method", ["sam", "asam", "fsam", "crsam", "lastsam_orthogonal"])
def test_fp64_auto_takes_the_reference_in_fp64(method):
    """impl="auto" steps fp64 parameters with the reference ops, in fp64: equal to impl="torch" bit for bit,
    and to an fp32 run only to fp32 rounding (so nothing was computed in fp32)."""
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g))
            for _ in range(STEPS)]

    def run(impl, dtype):
        model = _linear_model(dtype)
        opt = METHODS[method](model, impl)
        for x, y in data:
            opt.step(lambda: _backward(model, x.to(dtype), y))
            opt.zero_grad()
        return model

    auto, ref = run("auto", torch.float64), run("torch", torch.float64)
    for a, r in zip(auto.parameters(), ref.parameters()):
        assert a.dtype == torch.float64 and torch.equal(a, r)
    single = run("auto", torch.float32)
    diffs = [(a - s.double()).abs().max().item() for a, s in zip(auto.parameters(), single.parameters())]
    assert 0 < max(diffs) < 1e-4


def _backward(model, x, y):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss


def test_complex_parameters_are_stepped_as_real_vectors():
    """A complex parameter is the real vector of its parts: SAM on it equals SAM on that real view."""
    torch.manual_seed(0)
    wc = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    wr = torch.nn.Parameter(torch.view_as_real(wc.detach()).clone())
    x = torch.randn(5, 3, dtype=torch.complex64)
    opt_c = fastsam.SAM([wc], torch.optim.SGD, lr=0.1, momentum=0.9)  # impl="auto"
    opt_r = fastsam.SAM([wr], torch.optim.SGD, lr=0.1, momentum=0.9, impl="torch")

    def loss_c():
        loss = (x @ wc.T).abs().square().sum()
        loss.backward()
        return loss

    def loss_r():
        loss = (x @ torch.view_as_complex(wr).T).abs().square().sum()
        loss.backward()
        return loss

    for _ in range(5):
        opt_c.step(loss_c)
        opt_r.step(loss_r)
        opt_c.zero_grad()
        opt_r.zero_grad()
    torch.testing.assert_close(torch.view_as_real(wc.detach()), wr.detach(), rtol=1e-5, atol=1e-6)
    assert wc.dtype == torch.complex64


@pytest.mark.parametrize("device,impl", [p for p in CPU_IMPLS if p.values[1] != "torch"])
def test_an_explicit_compiled_impl_names_the_dtype(device, impl):
    model = _linear_model(torch.float64)
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, impl=impl)
    _backward(model, torch.randn(2, 6, dtype=torch.float64), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match=r"impl='%s' takes float32, float16 and bfloat16.*torch.float64" % impl):
        opt.first_step()


@pytest.mark.parametrize("method", ["sam", "crsam"])
def test_a_step_inside_one_autocast_block_sees_the_moved_weights(method):
    """autocast caches its bf16 copies of the weights until its outermost block ends: a step run inside one
    block must not evaluate w + e (or w - e) with the copies made at w."""
    def run(whole_step):
        model = small_cnn()
        opt = METHODS[method](model, "auto")
        for batch in batches(model, 4):
            def closure():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = loss_at(model, batch)
                loss.backward()
                return loss
            if whole_step:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    opt.step(closure)
            else:
                opt.step(closure)
            opt.zero_grad()
        return model

    assert_models_close(run(True), run(False), rtol=0, atol=0)


def test_bn_stats_freeze_reaches_a_compiled_model():
    """torch.compile runs no hooks of the inner modules; the freeze must still reach their BatchNorm layers."""
    def run(closure_style):
        torch._dynamo.reset()
        model = small_cnn()
        forward = torch.compile(model)
        opt = METHODS["sam"](model, "auto")
        for batch in batches(model, 3):
            if closure_style:
                opt.step(lambda: _closure(forward, batch)())
                opt.zero_grad()
            else:
                explicit_step(forward, opt, batch)
        return model

    closure, explicit = run(True), run(False)
    assert int(closure[1].num_batches_tracked) == 3
    assert_models_close(closure, explicit, rtol=1e-6, atol=1e-7)
