"""Resume: 20 steps in one process equal 11 steps, a checkpoint, and 9 more steps in a new process.

The training runs tests/_resume_driver.py (a small Conv1d/BatchNorm/Dropout model, seeded data,
opt.step(closure) with BatchNorm frozen after the first pass). The test process runs every case's
uninterrupted 20 steps, saving a checkpoint (model, optimizer.state_dict(), torch RNG) after step 11;
a fresh process (a subprocess) loads each checkpoint and runs the last 10. The reference is the
uninterrupted run: on the same impl the resumed weights and buffers must be bitwise equal. Resumed on
the other impl ("cpu" checkpoint, "torch" run, and back) they are not bitwise (the fused kernels round
differently from torch's step; 3e-7 at most here) but equal within the fp32 tolerance.
A state dict of another method is refused with ValueError; a base optimizer's state dict loads.
"""
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import fastsam

import _resume_driver as driver

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS, HALF = 20, 11  # an odd step: LastSAM's and the interval's phases are not aligned with it


def _spec(method, base, impl="cpu", **options):
    return dict(method=method, base=base, impl=impl, options=options)


# name -> spec: every method and option the state carries, over fused and non-fused bases.
METHODS = {
    "sam-p2-sgd": _spec("SAM", "sgd"),
    "sam-adaptive-nesterov": _spec("SAM", "nesterov", adaptive=True),
    "sam-pinf-adam": _spec("SAM", "adam", p=math.inf, rho=1e-3),
    "sam-p2-adamw": _spec("SAM", "adamw"),
    "sam-p2-rmsprop": _spec("SAM", "rmsprop"),
    "sam-p2-adagrad": _spec("SAM", "adagrad"),
    "asam-elementwise-sgd": _spec("ASAM", "sgd", normalization="elementwise"),
    "asam-filterwise-adamw": _spec("ASAM", "adamw", normalization="filterwise"),
    "fsam-sgd": _spec("FriendlySAM", "sgd"),
    "fsam-adam": _spec("FriendlySAM", "adam"),
    "fsam-rmsprop": _spec("FriendlySAM", "rmsprop"),
    "crsam-authors-sgd": _spec("CRSAM", "sgd", mode="authors"),
    "crsam-paper-adam": _spec("CRSAM", "adam", mode="paper"),
    "gsam-sgd": _spec("GSAM", "sgd"),
    "gsam-adaptive-rho-min-adamw": _spec("GSAM", "adamw", adaptive=True, rho_min=0.01),
    "gsam-rmsprop": _spec("GSAM", "rmsprop"),
    "wsam-decoupled-nesterov": _spec("WSAM", "nesterov"),
    "wsam-coupled-clipped-adam": _spec("WSAM", "adam", decouple=False, max_norm=1.0),
    "wsam-decoupled-rmsprop": _spec("WSAM", "rmsprop"),
    "sam-interval-3-sgd": _spec("SAM", "sgd", interval=3),
    "looksam-3-adamw": _spec("LookSAM", "adamw", k=3),
    "looksam-4-adaptive-rmsprop": _spec("LookSAM", "rmsprop", k=4, adaptive=True, rho=0.5),
    "crsam-interval-2-adam": _spec("CRSAM", "adam", interval=2),
    "lastsam-5-interval-2-ortho-asam-adamw": _spec("LastSAM", "adamw", switch_at=5, orthogonal=True, interval=2),
}
for _switch in (5, 15):
    for _ortho in (False, True):
        for _sharp, _base in (("sam", "nesterov"), ("asam", "adamw")):
            METHODS[f"lastsam-{_switch}-{'ortho' if _ortho else 'plain'}-{_sharp}-{_base}"] = _spec(
                "LastSAM", _base, switch_at=_switch, orthogonal=_ortho, sharpness=_sharp)

IMPLS = ("cpu", "torch")
# Checkpoints resumed without the method's own state (the EMA; steps_done): the runs must differ, or
# the comparison is blind.
STRIPPED = ("fsam-sgd", "lastsam-5-plain-sam-nesterov", "looksam-3-adamw")
# Checkpoints of a cpu run resumed with impl="torch" (and back): the kernels round differently.
CROSS = ("sam-p2-sgd", "asam-filterwise-adamw", "fsam-adam", "crsam-paper-adam", "lastsam-5-ortho-asam-adamw",
         "gsam-adaptive-rho-min-adamw", "wsam-coupled-clipped-adam")


def _run(jobs, path):
    with open(path, "w") as f:
        json.dump(jobs, f)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, os.path.join(HERE, "_resume_driver.py"), path], check=True, env=env, cwd=HERE)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{(case, impl, kind): checkpoint path} after 20 steps: "straight" uninterrupted, and resumed from
    the straight run's checkpoint at step 11: "resumed" on the same impl, "cross" on the other impl,
    "stripped" without the method's own state in the optimizer state dict (driver.base_only)."""
    tmp = tmp_path_factory.mktemp("resume")
    first, second, out = [], [], {}
    for name, spec in METHODS.items():
        for impl in IMPLS:
            s = dict(spec, impl=impl)
            half = str(tmp / f"{name}-{impl}-10.pt")
            out[name, impl, "straight"] = tmp / f"{name}-{impl}-20.pt"
            first.append(dict(spec=s, start=0, stop=STEPS, load=None,
                              save=[[HALF, half], [STEPS, str(out[name, impl, "straight"])]]))
            resumed = [("resumed", s, False)]
            if name in CROSS:
                resumed.append(("cross", dict(spec, impl=IMPLS[1 - IMPLS.index(impl)]), False))
            if name in STRIPPED and impl == "cpu":
                resumed.append(("stripped", s, True))
            for kind, spec2, base_only in resumed:
                out[name, impl, kind] = tmp / f"{name}-{impl}-{kind}.pt"
                second.append(dict(spec=spec2, start=HALF, stop=STEPS, load=half,
                                   save=[[STEPS, str(out[name, impl, kind])]], base_only=base_only))
    threads = torch.get_num_threads()
    with torch.random.fork_rng():
        try:
            driver.main_jobs(first)  # here, so that only the resume pays for a new process's imports
        finally:
            torch.set_num_threads(threads)
    _run(second, tmp / "second.json")  # a fresh process: nothing but the checkpoints carries over
    return out


def _model(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(METHODS))
def test_resume_in_a_new_process_is_bitwise(runs, name, impl):
    straight, resumed = _model(runs[name, impl, "straight"]), _model(runs[name, impl, "resumed"])
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), f"{name} {impl}: {key} differs after the resume"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", CROSS)
def test_resume_on_the_other_impl_is_close(runs, name, impl):
    straight, resumed = _model(runs[name, impl, "straight"]), _model(runs[name, impl, "cross"])
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("name", STRIPPED)
def test_resume_without_the_method_state_differs(runs, name):
    straight, stripped = _model(runs[name, "cpu", "straight"]), _model(runs[name, "cpu", "stripped"])
    assert not all(torch.equal(straight[k], stripped[k]) for k in straight)


# ---- in-process checks of what a state dict may be loaded into ---------------------------------------
def _trained(spec, steps=3):
    model = driver.make_model()
    opt = driver.make_optimizer(spec, model)
    driver.train(model, opt, 0, steps, {})
    return model, opt


@pytest.mark.parametrize("saved,loading", [
    (_spec("FriendlySAM", "sgd"), _spec("SAM", "sgd")),
    (_spec("SAM", "sgd"), _spec("FriendlySAM", "sgd")),
    (_spec("ASAM", "sgd"), _spec("SAM", "sgd")),
    (_spec("CRSAM", "sgd"), _spec("SAM", "sgd")),
    (_spec("LastSAM", "sgd", switch_at=1, sharpness="sam"), _spec("SAM", "sgd")),
    (_spec("LastSAM", "sgd", switch_at=1, sharpness="sam"), _spec("LastSAM", "sgd", switch_at=1, sharpness="asam")),
], ids=["fsam>sam", "sam>fsam", "asam>sam", "crsam>sam", "lastsam>sam", "lastsam-sam>lastsam-asam"])
def test_state_dict_of_another_method_is_refused(saved, loading):
    _, opt = _trained(saved)
    target = driver.make_optimizer(loading, driver.make_model())
    groups = copy.deepcopy(target.state_dict()["param_groups"])
    with pytest.raises(ValueError, match="state_dict"):
        target.load_state_dict(opt.state_dict())
    assert target.state_dict()["param_groups"] == groups  # left as it was


def test_base_optimizer_state_dict_loads_with_the_method_options():
    """A plain SGD checkpoint loads into SAM like into SAM's base optimizer: SAM's options stay."""
    model = driver.make_model()
    sgd = torch.optim.SGD(model.parameters(), **driver.BASES["sgd"][1])
    model(driver.batch(0)[0]).sum().backward()
    sgd.step()
    results = []
    for load_into_base in (True, False):
        m = copy.deepcopy(model)
        saved = copy.deepcopy(sgd.state_dict())  # torch's load keeps these tensors as the state
        base = torch.optim.SGD(m.parameters(), **driver.BASES["sgd"][1])
        if load_into_base:
            base.load_state_dict(saved)
        opt = fastsam.SAM(None, base, rho=0.1)
        if not load_into_base:
            opt.load_state_dict(saved)
        assert opt.param_groups[0]["rho"] == 0.1
        torch.manual_seed(0)
        driver.train(m, opt, 1, 4, {})
        results.append(m.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_loading_replaces_the_method_state():
    """A used FriendlySAM that loads a state dict continues as a new one that loads it, also when the
    state dict has no method state (then the EMA starts again)."""
    spec = _spec("FriendlySAM", "sgd")
    _, saved_opt = _trained(spec)
    saved = driver.base_only(copy.deepcopy(saved_opt.state_dict()))
    results = []
    for used in (False, True):
        model = driver.make_model()
        opt = driver.make_optimizer(spec, model)
        if used:
            driver.train(model, opt, 0, 2, {})  # an EMA of its own, which the load must drop
            model.load_state_dict(driver.make_model().state_dict())
        opt.load_state_dict(copy.deepcopy(saved))
        torch.manual_seed(0)
        driver.train(model, opt, 3, 6, {})
        results.append(model.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
