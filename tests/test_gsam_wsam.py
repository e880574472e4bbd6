"""GSAM and WSAM against loops that follow their authors' code (juntang-zhuang/GSAM's gsam.py; atorch's
WeightedSAM in intelligent-machine-learning/dlrover), written per parameter in our own words.

The loops keep the authors' order of operations and constants (perturb_eps 1e-12 in the perturbation's norm, the
cosine and the projection; clip_grad_norm_ for WSAM's max_norm, after the perturbation is formed) and restore w
by subtracting e, as the authors do; fastsam restores from a backup, which agrees to rounding. Bases: SGD with
momentum and AdamW (the fused update), RMSprop (the generic path: restore, the combined grad in .grad, the
base's own step).

The model is small_cnn with tanh for ReLU: WSAM's coupled grad 9 g1 - 8 g0 magnifies the grad at w + e, and
with ReLUs a rounding-level difference in w + e flips a unit's activation at some step of 20 (seen: the weights
1e-3 apart from step 17 on, while the same run in float64 agrees to 1e-9): a kink, not a difference of the
methods. Smooth activations keep the comparison at rounding."""
import pytest
import torch
from torch import nn

import fastsam
from fastsam.utils import frozen_bn_stats

from _sam_loops import (ALL_IMPLS, BASES, CPU_IMPLS, assert_models_close, batches, closure_for, fast_sam, global_norm,
                        loss_at, small_cnn)

EPS = 1e-12


def smooth_cnn():
    return small_cnn(nn.Tanh)


def perturb(named, rho, adaptive):
    """SAM's move to w + e from the grads of the pass at w: e = rho T^2 g / (||T g|| + eps), T = |w| or 1."""
    g = {n: w.grad for n, w in named if w.grad is not None}
    t = {n: (w.detach().abs() if adaptive else 1.0) for n, w in named}
    scale = rho / (global_norm([t[n] * g[n] for n in g]) + EPS)
    e = {n: (w.detach() ** 2 if adaptive else 1.0) * g[n] * scale for n, w in named if n in g}
    for n, w in named:
        if n in e:
            w.add_(e[n])
    return e


def pass_at_perturbed(model, base, batch):
    base.zero_grad()
    with frozen_bn_stats(model):
        loss_at(model, batch).backward()


def loop_gsam(model, base, data, rho, alpha, adaptive, radius=None):
    """gsam.py: perturb at rho_t (``radius(base)`` when given), the grad at w + e, the decomposition, then w - e
    and the base step."""
    named = list(model.named_parameters())
    for batch in data:
        loss_at(model, batch).backward()
        with torch.no_grad():
            g0 = {n: w.grad.detach().clone() for n, w in named if w.grad is not None}
            e = perturb(named, rho if radius is None else radius(base), adaptive)
        pass_at_perturbed(model, base, batch)
        with torch.no_grad():
            g1 = {n: w.grad for n, w in named if w.grad is not None}
            inner = sum((g0[n] * g1[n]).sum() for n in g1)
            n1, n0 = global_norm(list(g1.values())), global_norm([g0[n] for n in g1])
            cos = inner / (n1 * n0 + EPS)
            for n, w in named:
                if n in g1:
                    vertical = g0[n] - cos * n0 * w.grad / (n1 + EPS)
                    w.grad.add_(vertical, alpha=-alpha)
            for n, w in named:
                if n in e:
                    w.sub_(e[n])
        base.step()
        base.zero_grad()


def loop_wsam(model, base, data, rho, gamma, decouple, max_norm, adaptive):
    """wsam.py: perturb with the raw g0, clip g0 and keep it, the grad at w + e, w - e, clip g1, then the coupled
    grad a g1 + (1 - a) g0, or the base step with g0 followed by w -= lr a (g1 - g0)."""
    a = gamma / (1 - gamma)
    named = list(model.named_parameters())
    for batch in data:
        loss_at(model, batch).backward()
        with torch.no_grad():
            e = perturb(named, rho, adaptive)
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        g0 = {n: w.grad.detach().clone() for n, w in named if w.grad is not None}
        pass_at_perturbed(model, base, batch)
        with torch.no_grad():
            for n, w in named:
                if n in e:
                    w.sub_(e[n])
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        sharpness = {}
        with torch.no_grad():
            for n, w in named:
                if w.grad is None:
                    continue
                if decouple:
                    sharpness[n] = w.grad.clone() - g0[n]
                    w.grad.copy_(g0[n])
                else:
                    w.grad.mul_(a).add_(g0[n], alpha=1 - a)
        base.step()
        with torch.no_grad():
            for n, w in named:
                if n in sharpness:
                    w.add_(sharpness[n], alpha=-base.param_groups[0]["lr"] * a)
        base.zero_grad()


# ---- GSAM ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,impl", ALL_IMPLS)
@pytest.mark.parametrize("base", ["sgd", "adamw", "rmsprop"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
def test_gsam_matches_authors_loop(device, impl, base, adaptive):
    cls, kw = BASES[base]
    ref, fast = smooth_cnn().to(device), smooth_cnn().to(device)
    data = batches(ref)
    loop_gsam(ref, cls(ref.parameters(), **kw), data, 0.05, 0.4, adaptive)
    fast_sam(fast, fastsam.GSAM(fast.parameters(), cls, rho=0.05, alpha=0.4, adaptive=adaptive, impl=impl, **kw), data)
    assert_models_close(fast, ref)


@pytest.mark.parametrize("device,impl", CPU_IMPLS)
def test_gsam_radius_follows_the_lr(device, impl):
    """rho_min: rho_t = rho_min + (rho - rho_min) (lr - lr_min) / (lr_0 - lr_min), the lr of the step (the
    authors update rho_t after each scheduler step), here under a cosine schedule to lr_min."""
    cls, kw = BASES["sgd"]
    ref, fast = smooth_cnn(), smooth_cnn()
    data = batches(ref)
    lr0, lr_min, rho, rho_min = kw["lr"], 1e-3, 0.1, 0.02
    base = cls(ref.parameters(), **kw)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=len(data), eta_min=lr_min)
    radii = []

    def radius(b):
        radii.append(rho_min + (rho - rho_min) * (b.param_groups[0]["lr"] - lr_min) / (lr0 - lr_min))
        return radii[-1]

    for batch in data:  # the loop's scheduler steps after each of its steps
        loop_gsam(ref, base, [batch], rho, 0.4, False, radius)
        sched.step()
    opt = fastsam.GSAM(fast.parameters(), cls, rho=rho, alpha=0.4, rho_min=rho_min, lr_min=lr_min, impl=impl, **kw)
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=len(data), eta_min=lr_min)
    for batch in data:
        fast_sam(fast, opt, [batch])
        sched2.step()
    assert_models_close(fast, ref)
    assert radii[0] == pytest.approx(rho) and radii[-1] < 0.3 * rho  # the radius did follow the lr
    assert opt.param_groups[0]["initial_lr"] == lr0


def test_gsam_decomposition_is_orthogonal_and_weighted():
    """With lr 1 and plain SGD the step is exactly the combined grad: g1 - alpha (g0 - proj of g0 on g1)."""
    gen = torch.Generator().manual_seed(0)
    g0, g1 = ([torch.randn(s, generator=gen) for s in [(32, 3), (5,)]] for _ in range(2))
    params = [torch.nn.Parameter(torch.zeros_like(t)) for t in g0]
    opt = fastsam.GSAM(params, torch.optim.SGD, rho=0.0, alpha=0.4, lr=1.0)
    for grads, step in ((g0, opt.first_step), (g1, opt.second_step)):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        step()
    flat0, flat1 = torch.cat([t.flatten() for t in g0]), torch.cat([t.flatten() for t in g1])
    vertical = flat0 - flat0.dot(flat1) / flat1.dot(flat1) * flat1
    expected = -(flat1 - 0.4 * vertical)
    got = torch.cat([p.detach().flatten() for p in params])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert abs(float(vertical.dot(flat1))) < 1e-4


# ---- WSAM ------------------------------------------------------------------------------------------------
WSAM_CASES = {  # decouple, max_norm, adaptive
    "decoupled": (True, None, False),
    "decoupled_clipped_adaptive": (True, 0.5, True),
    "coupled_adaptive": (False, None, True),
    "coupled_clipped": (False, 0.5, False),
}


@pytest.mark.parametrize("device,impl", ALL_IMPLS)
@pytest.mark.parametrize("base", ["sgd", "adamw", "rmsprop"])
@pytest.mark.parametrize("case", list(WSAM_CASES))
def test_wsam_matches_authors_loop(device, impl, base, case):
    decouple, max_norm, adaptive = WSAM_CASES[case]
    cls, kw = BASES[base]
    ref, fast = smooth_cnn().to(device), smooth_cnn().to(device)
    data = batches(ref)
    loop_wsam(ref, cls(ref.parameters(), **kw), data, 0.05, 0.9, decouple, max_norm, adaptive)
    opt = fastsam.WSAM(fast.parameters(), cls, rho=0.05, gamma=0.9, decouple=decouple, max_norm=max_norm,
                       adaptive=adaptive, impl=impl, **kw)
    fast_sam(fast, opt, data)
    assert_models_close(fast, ref)


def test_wsam_clipping_is_active_in_the_clipped_cases():
    """max_norm 0.5 clips these grads (else the clipped cases would not test clipping)."""
    model = smooth_cnn()
    loss_at(model, batches(model, 1)[0]).backward()
    assert float(global_norm([w.grad for w in model.parameters()])) > 0.5


def test_step_closure_runs_two_passes():
    for make in (lambda p: fastsam.GSAM(p, torch.optim.SGD, lr=0.05),
                 lambda p: fastsam.WSAM(p, torch.optim.SGD, lr=0.05)):
        ref, fast = smooth_cnn(), smooth_cnn()
        data = batches(ref, 4)
        fast_sam(ref, make(ref.parameters()), data)
        opt = make(fast.parameters())
        for batch in data:
            calls = []
            opt.step(closure_for(fast, batch, calls))
            assert len(calls) == 2
            opt.zero_grad()
        assert_models_close(fast, ref)


@pytest.mark.parametrize("make,exc,word", [
    (lambda p: fastsam.GSAM(p, torch.optim.SGD, lr=0.1, alpha="x"), TypeError, "alpha"),
    (lambda p: fastsam.GSAM(p, torch.optim.SGD, lr=0.1, rho_min=0.1, rho=0.05), ValueError, "rho_min"),
    (lambda p: fastsam.GSAM(p, torch.optim.SGD, lr=0.1, rho_min=-1.0), ValueError, "rho_min"),
    (lambda p: fastsam.GSAM(p, torch.optim.SGD, lr=0.1, rho_min=0.01, lr_min=0.1), ValueError, "lr_min"),
    (lambda p: fastsam.GSAM(p, torch.optim.SGD, lr=torch.tensor(0.1), rho_min=0.01), TypeError, "lr"),
    (lambda p: fastsam.WSAM(p, torch.optim.SGD, lr=0.1, gamma=1.0), ValueError, "gamma"),
    (lambda p: fastsam.WSAM(p, torch.optim.SGD, lr=0.1, max_norm=0.0), ValueError, "max_norm"),
    (lambda p: fastsam.WSAM(p, torch.optim.SGD, lr=0.1, decouple="yes"), TypeError, "decouple"),
    (lambda p: fastsam.LookSAM(p, torch.optim.SGD, lr=0.1, k=0), ValueError, "k"),
    (lambda p: fastsam.LookSAM(p, torch.optim.SGD, lr=0.1, k=2.0), TypeError, "k"),
    (lambda p: fastsam.LookSAM(p, torch.optim.SGD, lr=0.1, interval=2), TypeError, "interval"),
    (lambda p: fastsam.LookSAM(p, torch.optim.SGD, lr=0.1, alpha="x"), TypeError, "alpha"),
    (lambda p: fastsam.GSAM([{"params": list(p), "p": float("inf")}], torch.optim.SGD, lr=0.1), ValueError,
     "GSAM supports p=2 only"),
])
def test_bad_arguments(make, exc, word):
    with pytest.raises(exc, match=word):
        make(small_cnn().parameters())
