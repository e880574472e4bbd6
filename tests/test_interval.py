"""interval=k (every method): the method's step on every k-th step (steps_done % k == 0, from the first), the base
optimizer's one-pass step in between; step(closure) runs the right number of passes, an explicit loop asks
sharpness_active, and the phase survives a resume (tests/test_resume.py saves at an odd step)."""
import pytest
import torch

import fastsam

from _sam_loops import (CPU_IMPLS, assert_models_close, batches, closure_for, explicit_step, loop_sam, loss_at,
                        operator_fn, small_cnn)

K = 3
METHODS = {
    "sam": lambda p, **o: fastsam.SAM(p, torch.optim.SGD, lr=0.05, momentum=0.9, **o),
    "asam": lambda p, **o: fastsam.ASAM(p, torch.optim.AdamW, lr=1e-3, **o),
    "fsam": lambda p, **o: fastsam.FriendlySAM(p, torch.optim.SGD, lr=0.05, **o),
    "crsam": lambda p, **o: fastsam.CRSAM(p, torch.optim.SGD, lr=0.05, **o),
    "gsam": lambda p, **o: fastsam.GSAM(p, torch.optim.SGD, lr=0.05, **o),
    "wsam": lambda p, **o: fastsam.WSAM(p, torch.optim.AdamW, lr=1e-3, max_norm=1.0, **o),
    "lastsam": lambda p, **o: fastsam.LastSAM(p, torch.optim.SGD, switch_at=2, sharpness="sam", lr=0.05, **o),
}
METHOD_PASSES = {"crsam": 3}


def expected_passes(name, step):
    """Closure calls of step ``step`` (0-based) under interval K."""
    active = step % K == 0 if name != "lastsam" else step >= 2 and (step - 2) % K == 0
    return METHOD_PASSES.get(name, 2) if active else 1


@pytest.mark.parametrize("name", list(METHODS))
def test_step_closure_runs_the_passes_of_each_step(name):
    model = small_cnn()
    opt = METHODS[name](model.parameters(), interval=K)
    data = batches(model, 9)
    for step, batch in enumerate(data):
        assert opt.sharpness_active == (expected_passes(name, step) > 1)
        calls = []
        loss = opt.step(closure_for(model, batch, calls))
        assert len(calls) == expected_passes(name, step), step
        assert loss.ndim == 0
        opt.zero_grad()
    assert opt.steps_done == len(data)


@pytest.mark.parametrize("device,impl", CPU_IMPLS)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_sam_interval_matches_a_loop(device, impl, base):
    """SAM's step (davda54's loop) on steps 0, K, 2K, ...; the base optimizer's own step on the others."""
    cls, kw = {"sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9)), "adamw": (torch.optim.AdamW, dict(lr=1e-3))}[base]
    ref, fast = small_cnn(), small_cnn()
    data = batches(ref, 10)
    ref_opt = cls(ref.parameters(), **kw)
    for step, batch in enumerate(data):
        if step % K == 0:
            loop_sam(ref, ref_opt, [batch], 0.05, 2, operator_fn("none"), 1e-12)
        else:
            loss_at(ref, batch).backward()
            ref_opt.step()
            ref_opt.zero_grad()
    opt = fastsam.SAM(fast.parameters(), cls, rho=0.05, interval=K, impl=impl, **kw)
    for batch in data:
        explicit_step(fast, opt, batch)
    assert_models_close(fast, ref)


def test_interval_1_is_the_method_every_step():
    ref, fast = small_cnn(), small_cnn()
    data = batches(ref, 4)
    for model, o in ((ref, {}), (fast, {"interval": 1})):
        opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.05, **o)
        for batch in data:
            opt.step(closure_for(model, batch, []))
            opt.zero_grad()
    assert_models_close(fast, ref, rtol=0, atol=0)


def test_first_step_on_a_one_pass_step_is_refused():
    model = small_cnn()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.05, interval=2)
    batch = batches(model, 1)[0]
    explicit_step(model, opt, batch)  # step 0: SAM
    loss_at(model, batch).backward()
    with pytest.raises(RuntimeError, match="one-pass step .*interval=2.*sharpness_active is False"):
        opt.first_step(zero_grad=True)
    opt.step()  # the one-pass step, from the grads of the caller's pass
    assert opt.steps_done == 2 and opt.sharpness_active


def test_grad_scaler_skips_a_one_pass_step():
    """A non-finite grad in a one-pass step: GradScaler skips it (w and the base state unchanged), and the phase
    still advances (the host does not read the flag)."""
    model = small_cnn()
    opt = fastsam.SAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, interval=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    batch = batches(model, 1)[0]
    explicit_step(model, opt, batch)
    before = [w.detach().clone() for w in model.parameters()]
    (scaler.scale(loss_at(model, batch)) * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    assert all(torch.equal(a, w) for a, w in zip(before, model.parameters()))
    assert opt.skipped_steps == 1 and opt.steps_done == 2 and scaler.get_scale() == 2.0**7


@pytest.mark.parametrize("interval,exc", [(0, ValueError), (1.5, TypeError), (True, TypeError), ("2", TypeError)])
def test_bad_interval(interval, exc):
    with pytest.raises(exc, match="interval"):
        fastsam.SAM(small_cnn().parameters(), torch.optim.SGD, lr=0.1, interval=interval)


@pytest.mark.parametrize("name", ["crsam", "gsam", "wsam", "lastsam"])
def test_a_gated_one_pass_step_is_the_base_step(name):
    """With nonfinite="skip" every step is gated (its update goes through the fused path with a found flag): a
    one-pass step must still be the base optimizer's plain step, not the method's combination of stale kept
    grads. Finite grads: the gated run equals the ungated one."""
    models = [small_cnn(), small_cnn()]
    data = batches(models[0], 7)
    for model, options in zip(models, ({}, {"nonfinite": "skip"})):
        opt = METHODS[name](model.parameters(), interval=2, **options)
        for batch in data:
            opt.step(closure_for(model, batch, []))
            opt.zero_grad()
        assert opt.skipped_steps == 0
    assert_models_close(models[1], models[0])
