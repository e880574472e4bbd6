"""FriendlySAM, CRSAM, LastSAM and per-group perturbation against straightforward loops of docs/design.md's math."""
import copy

import pytest
import torch

import fastsam
from fastsam.utils import frozen_bn_stats

from _sam_loops import (ALL_IMPLS, BASES, CPU_IMPLS, assert_models_close, batches, closure_for, explicit_step, fast_sam,
                        global_norm, loop_sam, loss_at, operator_fn, second_pass_and_restore, small_cnn, small_mlp)

MODELS = [small_cnn, small_mlp]
MODEL_IDS = ["cnn", "mlp"]


def grads_of(named):
    return {n: w.grad.detach().clone() for n, w in named if w.grad is not None}


def loop_fsam(model, base, data, rho, sigma, lmbda, adaptive):
    """The authors' Friendly SAM: step 1 m = g and plain SAM; then d = g - sigma m, m = EMA of the raw grad."""
    named, m = list(model.named_parameters()), {}
    for batch in data:
        loss_at(model, batch).backward()
        with torch.no_grad():
            d = {}
            for n, g in grads_of(named).items():
                if n not in m:
                    m[n], d[n] = g, g
                else:
                    d[n] = g - sigma * m[n]
                    m[n] = m[n] * lmbda + g * (1 - lmbda)
            t = {n: w.detach().abs() if adaptive else 1.0 for n, w in named}
            norm = global_norm([t[n] * d[n] for n in d])
            old = {n: w.detach().clone() for n, w in named if n in d}
            for n, w in named:
                if n in d:
                    w.add_(rho / (norm + 1e-12) * t[n] * t[n] * d[n])
        second_pass_and_restore(model, base, batch, old)
        base.step()
        base.zero_grad()


def loop_crsam(model, base, data, rho, gamma, beta, mode):
    """The authors' CR-SAM, moving between the three points from a copy of w."""
    named = list(model.named_parameters())
    for batch in data:
        loss0 = loss_at(model, batch)
        loss0.backward()
        g0 = grads_of(named)
        norm = global_norm(list(g0.values()))
        e = {n: g * (rho / (norm + 1e-12)) for n, g in g0.items()}
        old = {n: w.detach().clone() for n, w in named}
        losses, grads = [], []
        for sign in (1, -1):
            with torch.no_grad():
                for n, w in named:
                    w.copy_(old[n] + sign * e[n])
            base.zero_grad()
            with frozen_bn_stats(model):
                loss = loss_at(model, batch)
                loss.backward()
            losses.append(loss.detach())
            grads.append(grads_of(named))
        (lp, lm), (gp, gm) = losses, grads
        a, b = (gamma, beta) if mode == "authors" else (gamma / (lp + lm - 2 * loss0.detach()), beta / (lp - lm))
        with torch.no_grad():
            for n, w in named:
                w.copy_(old[n])
                w.grad = gp[n] + a * (gp[n] + gm[n] - 2 * g0[n]) + b * (gp[n] - gm[n])
        base.step()
        base.zero_grad()


def fast_crsam(model, opt, data):
    for batch in data:
        explicit_step(model, opt, batch)


# ---- Friendly SAM ----------------------------------------------------------------------------------
@pytest.mark.parametrize("device,impl", ALL_IMPLS)
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "adaptive"])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("make_model", MODELS, ids=MODEL_IDS)
def test_friendly_sam_matches_authors_loop(device, impl, adaptive, base, make_model):
    cls, kw = BASES[base]
    ref, fast = make_model().to(device), make_model().to(device)
    data = batches(ref)
    loop_fsam(ref, cls(ref.parameters(), **kw), data, 0.05, 1.0, 0.9, adaptive)
    fast_sam(fast, fastsam.FriendlySAM(fast.parameters(), cls, adaptive=adaptive, impl=impl, **kw), data)
    assert_models_close(fast, ref)


@pytest.mark.parametrize("device,impl", CPU_IMPLS)
def test_friendly_sam_step_one_is_sam(device, impl):
    models = [small_cnn() for _ in range(2)]
    data = batches(models[0], 1)
    opts = [fastsam.FriendlySAM(models[0].parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, impl=impl),
            fastsam.SAM(models[1].parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, impl=impl)]
    points = []
    for model, opt in zip(models, opts):
        loss_at(model, data[0]).backward()
        opt.first_step(zero_grad=True)
        points.append([w.detach().clone() for w in model.parameters()])
        with frozen_bn_stats(model):
            loss_at(model, data[0]).backward()
        opt.second_step(zero_grad=True)
    assert all(torch.equal(a, b) for a, b in zip(*points)), "the first perturbation must be SAM's"
    assert all(torch.equal(a, b) for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()))


def test_friendly_sam_state_dict_keeps_the_ema():
    data = batches(small_mlp(), 8)
    straight = small_mlp()
    fast_sam(straight, fastsam.FriendlySAM(straight.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9), data)
    first = small_mlp()
    opt = fastsam.FriendlySAM(first.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9)
    fast_sam(first, opt, data[:4])
    saved = copy.deepcopy(opt.state_dict())
    assert len(saved["state"]) == len(list(first.parameters()))
    assert all(s["fastsam_ema"].shape == p.shape for s, p in zip(saved["state"].values(), first.parameters()))
    assert all(g["fastsam"] == {"method": "FriendlySAM", "steps_done": 4} for g in saved["param_groups"])
    resumed = copy.deepcopy(first)
    opt2 = fastsam.FriendlySAM(resumed.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9)
    opt2.load_state_dict(saved)
    fast_sam(resumed, opt2, data[4:])
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))


def test_state_dict_of_earlier_versions_loads():
    """Earlier fastsam kept the method's state under a top-level "fastsam" key, by parameter index: such a
    checkpoint resumes as the current layout does."""
    data = batches(small_mlp(), 8)
    first = small_mlp()
    opt = fastsam.FriendlySAM(first.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9)
    fast_sam(first, opt, data[:4])
    current = copy.deepcopy(opt.state_dict())
    legacy = {"state": {i: {k: v for k, v in s.items() if not k.startswith("fastsam_")}
                        for i, s in current["state"].items()},
              "param_groups": [{k: v for k, v in g.items() if k != "fastsam"} for g in current["param_groups"]],
              "fastsam": {"method": "FriendlySAM",
                          "state": {i: {"ema": s["fastsam_ema"]} for i, s in current["state"].items()}}}
    resumed = []
    for saved in (current, legacy):
        model = copy.deepcopy(first)
        opt2 = fastsam.FriendlySAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9)
        opt2.load_state_dict(copy.deepcopy(saved))
        fast_sam(model, opt2, data[4:])
        resumed.append(model.state_dict())
    assert all(torch.equal(resumed[0][k], resumed[1][k]) for k in resumed[0])
    with pytest.raises(ValueError, match="saved by 'SAM'"):
        opt.load_state_dict(dict(legacy, fastsam={"method": "SAM"}))


# ---- CR-SAM ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,impl", ALL_IMPLS)
@pytest.mark.parametrize("base", ["sgd", "adam", "rmsprop"])
@pytest.mark.parametrize("make_model", MODELS, ids=MODEL_IDS)
def test_crsam_matches_authors_loop(device, impl, base, make_model):
    cls, kw = BASES[base]
    ref, fast = make_model().to(device), make_model().to(device)
    data = batches(ref)
    loop_crsam(ref, cls(ref.parameters(), **kw), data, 0.1, 0.1, 0.01, "authors")
    fast_crsam(fast, fastsam.CRSAM(fast.parameters(), cls, rho=0.1, gamma=0.1, beta=0.01, impl=impl, **kw), data)
    assert_models_close(fast, ref)


@pytest.mark.parametrize("device,impl", CPU_IMPLS)
@pytest.mark.parametrize("losses", [(1.0, 1.3, 0.8), (2.0, 2.5, 2.5)], ids=["curved", "flat_difference"])
def test_crsam_paper_mode_combination(device, impl, losses):
    """Paper mode's grad from given grads and losses (a trajectory test would measure fp32 cancellation in
    L+ + L- - 2 L0, not the optimizer). A difference of 0 is taken as 1e-12."""
    gen = torch.Generator().manual_seed(0)
    w0, g0, gp, gm = ([torch.randn(s, generator=gen) for s in [(64, 3), (7,), ()]] for _ in range(4))
    params = [torch.nn.Parameter(w.clone()) for w in w0]
    gamma, beta = 0.3, 0.2
    opt = fastsam.CRSAM(params, torch.optim.SGD, gamma=gamma, beta=beta, mode="paper", lr=1.0, impl=impl)
    for grads, step in ((g0, opt.first_step), (gp, opt.second_step)):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        step()
    for p, g in zip(params, gm):
        p.grad = g.clone()
    l0, lp, lm = (torch.tensor(x) for x in losses)
    opt.third_step(losses=(l0, lp, lm))
    d2 = lp - lm if lp != lm else torch.tensor(1e-12)
    a, b = gamma / (lp + lm - 2 * l0), beta / d2
    for p, w, x0, xp, xm in zip(params, w0, g0, gp, gm):
        expected = w - (xp + a * (xp + xm - 2 * x0) + b * (xp - xm))
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,impl", CPU_IMPLS)
def test_crsam_points_are_exact(device, impl):
    """w + e and w - e are the same e either side of w, and w comes back bit for bit."""
    model = small_cnn()
    w0 = [w.detach().clone() for w in model.parameters()]
    opt = fastsam.CRSAM(model.parameters(), torch.optim.SGD, lr=0.0, impl=impl)  # lr 0: the step keeps w
    batch = batches(model, 1)[0]
    loss_at(model, batch).backward()
    opt.first_step(zero_grad=True)
    plus = [w.detach().clone() for w in model.parameters()]
    loss_at(model, batch).backward()
    opt.second_step(zero_grad=True)
    minus = [w.detach().clone() for w in model.parameters()]
    loss_at(model, batch).backward()
    opt.third_step(zero_grad=True)
    for a, p, m in zip(w0, plus, minus):
        assert not torch.equal(p, a)
        torch.testing.assert_close(p - a, a - m, rtol=1e-5, atol=1e-7)
    assert all(torch.equal(a, w) for a, w in zip(w0, model.parameters())), "w must be restored exactly"


def test_crsam_step_closure_runs_three_passes():
    ref, fast = small_mlp(), small_mlp()
    data = batches(ref, 4)
    loop_crsam(ref, torch.optim.SGD(ref.parameters(), lr=0.1), data, 0.1, 0.1, 0.1, "authors")
    opt = fastsam.CRSAM(fast.parameters(), torch.optim.SGD, lr=0.1)
    for batch in data:
        calls = []
        loss = opt.step(closure_for(fast, batch, calls))
        assert len(calls) == 3 and loss.ndim == 0
        opt.zero_grad()
    assert_models_close(fast, ref)


# ---- LastSAM ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,impl", ALL_IMPLS)
@pytest.mark.parametrize("sharpness", ["asam", "sam"])
@pytest.mark.parametrize("orthogonal", [False, True], ids=["plain", "orthogonal"])
@pytest.mark.parametrize("base", ["sgd", "adam"])
@pytest.mark.parametrize("make_model", MODELS, ids=MODEL_IDS)
def test_lastsam_matches_loop(device, impl, sharpness, orthogonal, base, make_model):
    cls, kw = BASES[base]
    ref, fast = make_model().to(device), make_model().to(device)
    data = batches(ref)
    rho, t_fn, eps = (0.5, operator_fn("elementwise", 0.01), 1e-16) if sharpness == "asam" else (
        0.05, operator_fn("none"), 1e-12)
    base_ref = cls(ref.parameters(), **kw)
    for batch in data[:8]:
        loss_at(ref, batch).backward()
        base_ref.step()
        base_ref.zero_grad()
    loop_sam(ref, base_ref, data[8:], rho, 2, t_fn, eps, orthogonal=orthogonal)
    opt = fastsam.LastSAM(fast.named_parameters(), cls, switch_at=0.4, total_steps=len(data), sharpness=sharpness,
                          orthogonal=orthogonal, impl=impl, **kw)
    assert opt.switch_step == 8
    for i, batch in enumerate(data):
        calls = []
        opt.step(closure_for(fast, batch, calls))
        opt.zero_grad()
        assert len(calls) == (1 if i < 8 else 2)
        assert opt.sharpness_active == (i + 1 >= 8)
    assert_models_close(fast, ref)


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps the grads it stepped with (and, not being torch's SGD, takes the generic path)."""

    def step(self, closure=None):
        self.seen = [p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None]
        return super().step(closure)


def test_lastsam_orthogonal_grad_is_orthogonal():
    model = small_cnn()
    opt = fastsam.LastSAM(model.parameters(), RecordingSGD, switch_at=0, orthogonal=True, sharpness="sam", lr=0.1)
    batch = batches(model, 1)[0]
    loss_at(model, batch).backward()
    plain = [w.grad.clone() for w in model.parameters()]
    opt.first_step(zero_grad=True)
    loss_at(model, batch).backward()
    sam_grad = [w.grad.clone() for w in model.parameters()]
    opt.second_step(zero_grad=True)
    ortho = opt.base_optimizer.seen
    flat = [torch.cat([t.flatten() for t in ts]) for ts in (plain, sam_grad, ortho)]
    assert (flat[1] @ flat[0]).abs() > 1e-3 * flat[1].norm() * flat[0].norm()  # there was something to remove
    assert (flat[2] @ flat[0]).abs() < 1e-6 * flat[2].norm() * flat[0].norm()


def test_lastsam_resume_keeps_the_phase():
    data = batches(small_mlp(), 6)
    straight = small_mlp()
    opt = fastsam.LastSAM(straight.parameters(), torch.optim.SGD, switch_at=3, sharpness="sam", lr=0.05)
    for batch in data:
        opt.step(closure_for(straight, batch, []))
        opt.zero_grad()
    first = small_mlp()
    opt = fastsam.LastSAM(first.parameters(), torch.optim.SGD, switch_at=3, sharpness="sam", lr=0.05)
    for batch in data[:2]:
        opt.step(closure_for(first, batch, []))
        opt.zero_grad()
    saved = copy.deepcopy(opt.state_dict())
    resumed = copy.deepcopy(first)
    opt2 = fastsam.LastSAM(resumed.parameters(), torch.optim.SGD, switch_at=3, sharpness="sam", lr=0.05)
    opt2.load_state_dict(saved)
    assert opt2.steps_done == 2 and not opt2.sharpness_active
    for batch in data[2:]:
        opt2.step(closure_for(resumed, batch, []))
        opt2.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))


# ---- per-group perturbation ---------------------------------------------------------------------------
@pytest.mark.parametrize("device,impl", CPU_IMPLS)
@pytest.mark.parametrize("off", [dict(rho=0.0), dict(perturb=False)], ids=["rho0", "perturb_false"])
@pytest.mark.parametrize("method", ["sam", "asam"])
def test_unperturbed_group(device, impl, off, method):
    """Only the BatchNorm parameters are perturbed: the other group stays at w in the second pass, has no
    backup, and the norm is taken over the perturbed group alone."""
    ref, fast = small_cnn(), small_cnn()
    data = batches(ref, 10)
    bn = {n for n, _ in ref.named_parameters() if n.startswith(("1.", "4."))}
    rho, eps, eta = (0.05, 1e-12, 0.0) if method == "sam" else (0.5, 1e-16, 0.01)
    t_all = operator_fn("none") if method == "sam" else operator_fn("elementwise", eta)
    loop_sam(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9), data, rho, 2,
             lambda w, n: t_all(w, n) if n in bn else torch.zeros_like(w), eps)
    named = list(fast.named_parameters())
    groups = [{"params": [w for n, w in named if n in bn], "param_names": [n for n, _ in named if n in bn]},
              {"params": [w for n, w in named if n not in bn], "param_names": [n for n, _ in named if n not in bn],
               **off}]
    cls = fastsam.SAM if method == "sam" else fastsam.ASAM
    opt = cls(groups, torch.optim.SGD, rho=rho, impl=impl, lr=0.05, momentum=0.9)
    others = groups[1]["params"]
    for batch in data:
        before = [w.detach().clone() for w in others]
        loss_at(fast, batch).backward()
        opt.first_step(zero_grad=True)
        assert all(torch.equal(a, w) for a, w in zip(before, others))
        with frozen_bn_stats(fast):
            loss_at(fast, batch).backward()
        opt.second_step(zero_grad=True)
    assert all("backup" not in opt.state[w] for w in others)
    assert_models_close(fast, ref)


# ---- bad arguments ---------------------------------------------------------------------------------
@pytest.mark.parametrize("make,exc,word", [
    (lambda ps: fastsam.FriendlySAM(ps, torch.optim.SGD, lmbda=1.0, lr=0.1), ValueError, "lmbda"),
    (lambda ps: fastsam.FriendlySAM(ps, torch.optim.SGD, sigma="x", lr=0.1), TypeError, "sigma"),
    (lambda ps: fastsam.FriendlySAM(ps, torch.optim.SGD, sigma=float("nan"), lr=0.1), ValueError, "sigma"),
    (lambda ps: fastsam.CRSAM(ps, torch.optim.SGD, mode="exact", lr=0.1), ValueError, "mode"),
    (lambda ps: fastsam.CRSAM(ps, torch.optim.SGD, gamma=float("inf"), lr=0.1), ValueError, "gamma"),
    (lambda ps: fastsam.LastSAM(ps, torch.optim.SGD, switch_at=1.5, lr=0.1), ValueError, "switch_at"),
    (lambda ps: fastsam.LastSAM(ps, torch.optim.SGD, switch_at=-1, lr=0.1), ValueError, "switch_at"),
    (lambda ps: fastsam.LastSAM(ps, torch.optim.SGD, switch_at=0.5, lr=0.1), ValueError, "total_steps"),
    (lambda ps: fastsam.LastSAM(ps, torch.optim.SGD, switch_at="end", lr=0.1), TypeError, "switch_at"),
    (lambda ps: fastsam.LastSAM(ps, torch.optim.SGD, switch_at=3, sharpness="gsam", lr=0.1), ValueError,
     "sharpness"),
    (lambda ps: fastsam.LastSAM(ps, torch.optim.SGD, switch_at=3, eta=-1.0, lr=0.1), ValueError, "eta"),
    (lambda ps: fastsam.SAM([{"params": ps, "perturb": "no"}], torch.optim.SGD, lr=0.1), TypeError, "perturb"),
])
def test_bad_arguments(make, exc, word):
    with pytest.raises(exc, match=word):
        make(list(small_mlp().parameters()))


def test_crsam_paper_mode_needs_the_losses():
    model = small_mlp()
    opt = fastsam.CRSAM(model.parameters(), torch.optim.SGD, mode="paper", lr=0.1)
    batch = batches(model, 1)[0]
    for step in (opt.first_step, opt.second_step):
        loss_at(model, batch).backward()
        step(zero_grad=True)
    loss_at(model, batch).backward()
    with pytest.raises(ValueError, match="losses"):
        opt.third_step()


def test_crsam_steps_out_of_order():
    opt = fastsam.CRSAM(small_mlp().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()
    with pytest.raises(RuntimeError, match="second_step"):
        opt.third_step()
