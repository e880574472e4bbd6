"""The pytorch_optimizer peer (fastsam.bench.po_peers) computes what our loop peer computes, for every mapped
method, with the method's options honoured."""
import pytest
import torch

pytest.importorskip("pytorch_optimizer")

from fastsam.bench import po_peers  # noqa: E402
from fastsam.bench.methods import METHODS  # noqa: E402
from fastsam.bench.shapes import make_params  # noqa: E402

from _bench_trajectory import trajectory  # noqa: E402

SHAPES = [("w", (5, 3)), ("b", (5,)), ("c", (2, 3, 2, 2)), ("scalar", ())]
MAPPED = list(po_peers.PO_CLASSES)
UNMAPPED = [m for m in METHODS if m not in po_peers.PO_CLASSES]
# (method, option overrides): the benchmarked configurations, and others that exercise every mapped option
# (FriendlySAM's sigma != 1 also takes the package's general foreach path instead of its sigma == 1 shortcut);
# LookSAM's class normalizes per tensor (po_peers.DIFFERENT_MATH): compared below where that agrees
VARIANTS = [(m, {}) for m in MAPPED if m not in po_peers.DIFFERENT_MATH] + [
    ("sam", dict(rho=0.5)),
    ("sam", dict(rho=0.5, adaptive=True)),
    ("friendly_sam", dict(rho=0.2, sigma=0.5, lmbda=0.8)),
    ("friendly_sam", dict(adaptive=True, sigma=0.5, lmbda=0.8)),
]


def _trajectory(method, options, po_foreach=None, steps=3):
    """The parameters after every step call of ``steps`` steps and SGD's momentum buffers after every step, of
    the loop peer (``po_foreach`` None) or of the pytorch_optimizer peer with that ``foreach``. Every pass is
    given fresh grads (as a backward would), the same for both rows."""
    params = make_params(SHAPES)
    if po_foreach is None:
        opt = METHODS[method].make("loop", params, **options)
    else:
        opt = po_peers.make(method, params, foreach=po_foreach, **options)
    return trajectory(method, opt, params, SHAPES, steps, row="loop" if po_foreach is None else "pytorch_optimizer")


def _variant_id(v):
    method, options = v
    return method + "".join(f"-{k}={o}" for k, o in options.items())


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_po_peer_computes_the_loop_peers_math(variant, foreach):
    """Three steps from the same start pass through the same points (w + e, then the updated w) and leave the
    same momentum buffers (fp32; rtol 1e-5, atol 1e-6 on w ~ 0.02, atol 1e-8 on the buffers ~ 1e-3)."""
    method, options = variant
    want_points, want_momenta = _trajectory(method, options)
    points, momenta = _trajectory(method, options, po_foreach=foreach)
    assert len(points) == len(want_points)
    for i, (got, want) in enumerate(zip(points, want_points)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"call {i}: {m}")
    for i, (got, want) in enumerate(zip(momenta, want_momenta)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8, msg=lambda m: f"step {i}: {m}")


def changes_for(method):
    """A value other than the method's default for each of its options."""
    return {k: v for k, v in dict(rho=0.5, sigma=0.5, lmbda=0.5, adaptive=True, k=2, alpha=0.5).items()
            if k in po_peers.OPTION_NAMES[method]}


@pytest.mark.parametrize("method", MAPPED)
def test_options_are_honoured(method):
    """A different value of each option changes the points the peer passes through (the perturbed ones: the
    updated w depends on the grads only, which are given), and the class holds the values given."""
    defaults = dict(METHODS[method].options)
    base = torch.cat(_trajectory(method, {}, po_foreach=True)[0])
    changes = changes_for(method)
    for name, value in changes.items():
        assert defaults.get(name, False) != value
        points = torch.cat(_trajectory(method, {name: value}, po_foreach=True)[0])
        assert not torch.allclose(points, base, rtol=1e-5, atol=1e-6), name
    opt = po_peers.make(method, make_params(SHAPES), lr=0.3, momentum=0.5, **changes)
    group = opt.param_groups[0]
    for name, value in changes.items():  # a group option, or the optimizer's own (LookSAM's k and alpha)
        key = po_peers.OPTION_NAMES[method][name]
        assert (group[key] if key in group else getattr(opt, key)) == value
    assert (group["lr"], group["momentum"]) == (0.3, 0.5)
    assert type(opt).__name__ == po_peers.PO_CLASSES[method]


@pytest.mark.parametrize("foreach", [True, None, False])
@pytest.mark.parametrize("method", MAPPED)
def test_foreach_reaches_the_base_sgd(method, foreach):
    opt = po_peers.make(method, make_params(SHAPES), foreach=foreach)
    assert isinstance(opt.base_optimizer, torch.optim.SGD)
    assert all(group["foreach"] is foreach for group in opt.base_optimizer.param_groups)


@pytest.mark.parametrize("method", UNMAPPED)
def test_unmapped_methods_raise(method):
    with pytest.raises(ValueError, match=method):
        po_peers.make(method, make_params(SHAPES))


def test_unknown_option_raises():
    with pytest.raises(ValueError, match="gamma"):
        po_peers.make("sam", make_params(SHAPES), gamma=0.1)


def test_missing_package_raises_import_error_with_the_pip_command(monkeypatch):
    monkeypatch.setattr(po_peers, "_module", lambda: None)
    assert not po_peers.available() and po_peers.version() is None
    with pytest.raises(ImportError, match="pip install"):
        po_peers.make("sam", make_params(SHAPES))


def test_mapping_and_version():
    import pytorch_optimizer

    assert po_peers.available() and po_peers.version()
    for method, cls in po_peers.PO_CLASSES.items():
        assert method in METHODS and hasattr(pytorch_optimizer, cls)


def test_the_benchmark_row_runs_the_steps_in_order():
    params = make_params(SHAPES)
    opt = METHODS["sam"].make("pytorch_optimizer", params)
    w = [p.detach().clone() for p in params]
    METHODS["sam"].step_fn(opt, "pytorch_optimizer")()  # fixed grads, as in the benchmark: w - lr * g after one step
    for p, w0 in zip(params, w):
        torch.testing.assert_close(p.detach(), w0 - 0.1 * p.grad)


def _looksam_points(shapes, row, steps=7):
    """The parameters after each of ``steps`` LookSAM steps (k 3, alpha 0.7, rho 0.5, momentum 0) of fastsam
    (impl "torch") or of pytorch_optimizer's class, driven as an explicit loop: fresh grads at every pass, one
    pass on the steps between (the class's ``first_step`` does nothing there)."""
    params = make_params(shapes)
    options = dict(rho=0.5, k=3, alpha=0.7, momentum=0.0)
    opt = (METHODS["looksam"].make("torch", params, **options) if row == "torch"
           else po_peers.make("looksam", params, **options))
    points = []
    for t in range(steps):
        for p, q in zip(params, make_params(shapes, seed=10 + 2 * t)):
            p.grad = q.grad
        if t % 3 == 0:
            opt.first_step()
            for p, q in zip(params, make_params(shapes, seed=11 + 2 * t)):
                p.grad = q.grad
            opt.second_step()
        elif row == "torch":
            opt.step()
        else:
            opt.first_step()
            opt.second_step()
        points.append(torch.cat([p.detach().flatten() for p in params]))
    return points


def test_looksam_class_equals_fastsam_on_one_tensor_and_normalizes_per_tensor():
    """pytorch_optimizer's LookSAM is the paper's method with per-tensor norms: on one parameter tensor it
    follows fastsam.LookSAM (its 1e-8 on ||g_v|| and clamps are far below rounding here: rtol 1e-5); on
    several tensors it does not."""
    one = [("w", (7, 5))]
    for got, want in zip(_looksam_points(one, "pytorch_optimizer"), _looksam_points(one, "torch")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    differ = [float((a - b).abs().max()) for a, b in zip(_looksam_points(SHAPES, "pytorch_optimizer"),
                                                          _looksam_points(SHAPES, "torch"))]
    # the SAM step agrees; the step between does not (by 3e-3 of |w| ~ 0.02, the tolerance above being 1e-5)
    assert differ[0] < 1e-7 and differ[1] > 1e-5, differ
