"""Every implementation of every fused op against the reference, on the same inputs."""
import pytest
import torch

import fastsam.ops as O
from fastsam.ops import reference as R

from _impls import TOL, assert_close, impl_params

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = {
    "size1": [(1,)],
    "size3": [(3,)],
    "size1000003": [(1000003,)],
    "200tensors": [((i * 7) % 23 + 1, (i * 5) % 11 + 1) if i % 3 else ((i * 13) % 97 + 1,) for i in range(200)],
    "filters": [(16, 3, 3, 3), (1, 2, 1, 1), (6, 5, 7), (1009, 991), (5,)],
    "empty": [],
    "scalars": [(), (2,), ()],
}
MODES = [O.MODE_IDENTITY, O.MODE_ABS, O.MODE_ROW]
OP_IMPLS = [p for p in impl_params() if p.values[1] != "torch"]  # torch *is* the reference


def make(shapes, dtype, device, seed, positive=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        t = torch.randn(s, generator=g)
        out.append((t.abs() if positive else t).to(device=device, dtype=dtype))
    return out


def clone(ts):
    return [t.clone() for t in ts]


def skip_row_on_scalars(case, mode):
    if case == "scalars" and mode == O.MODE_ROW:
        pytest.skip("MODE_ROW needs a dim 0 (the optimizers use it for ndim >= 3 only)")


def row_scales_for(params, mode, eta=0.01):
    if mode != O.MODE_ROW:
        return []
    out = [torch.empty(p.shape[0], device=p.device, dtype=torch.float32) for p in params]
    R.row_norm_(out, params, eta)
    return out


@pytest.mark.parametrize("device,impl", OP_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case,direction", [(c, "grad") for c in CASES] + [
    (c, "ema") for c in ("size1", "size1000003", "200tensors", "scalars")])
@pytest.mark.parametrize("mode", MODES)
def test_norm_sq(device, impl, dtype, case, mode, direction):
    skip_row_on_scalars(case, mode)
    params, grads = make(CASES[case], dtype, device, 0), make(CASES[case], dtype, device, 1)
    ema, sigma = (make(CASES[case], dtype, device, 16), 0.7) if direction == "ema" else ([], 0.0)
    rows = row_scales_for(params, mode)
    acc = torch.full((1,), 0.5, device=device)  # accumulates: the op adds to what is there
    expected = acc.clone()
    O.norm_sq_(acc, grads, params, rows, mode, 0.01, ema, sigma, impl=impl)
    R.norm_sq_(expected, grads, params, rows, mode, 0.01, ema, sigma)
    torch.testing.assert_close(acc, expected, **TOL[torch.float32])


@pytest.mark.parametrize("device,impl", OP_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["size1", "200tensors", "filters", "empty"])
def test_row_norm(device, impl, dtype, case):
    params = make(CASES[case], dtype, device, 2)
    out = [torch.full((p.shape[0],), -1.0, device=device) for p in params]
    expected = clone(out)
    O.row_norm_(out, params, 0.01, impl=impl)
    R.row_norm_(expected, params, 0.01)
    for a, e in zip(out, expected):
        torch.testing.assert_close(a, e, **TOL[torch.float32])


# (sigma, lmbda) of the direction transform: none, Friendly SAM's EMA, and a plain copy of the grads.
DIRECTIONS = {"grad": None, "fsam": (0.7, 0.9), "copy": (0.0, 0.0)}


# Every case without a direction transform; the transforms on the cases that differ in kind.
PERTURB_CASES = [(c, "grad") for c in CASES] + [
    (c, d) for d in DIRECTIONS if d != "grad" for c in ("size1", "size1000003", "200tensors", "scalars")]


@pytest.mark.parametrize("device,impl", OP_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case,direction", PERTURB_CASES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sign", [False, True], ids=["p2", "pinf"])
def test_perturb(device, impl, dtype, case, mode, sign, direction):
    skip_row_on_scalars(case, mode)
    params, grads = make(CASES[case], dtype, device, 3), make(CASES[case], dtype, device, 4)
    if grads:
        grads[0].view(-1)[0] = 0  # sign(0) = 0: no move
    ema, sigma, lmbda = [], 0.0, 0.0
    if DIRECTIONS[direction] is not None:
        (sigma, lmbda), ema = DIRECTIONS[direction], make(CASES[case], dtype, device, 17)
    rows = row_scales_for(params, mode)
    norm_sq = torch.zeros(1, device=device)
    R.norm_sq_(norm_sq, grads, params, rows, mode, 0.01, ema, sigma)
    backups = [torch.full_like(p, 7.0) for p in params]
    ref_params, ref_backups, ref_ema = clone(params), clone(backups), clone(ema)
    O.perturb_(params, grads, backups, rows, norm_sq, 0.3, 1e-12, mode, 0.01, sign, ema, sigma, lmbda, impl=impl)
    R.perturb_(ref_params, grads, ref_backups, rows, norm_sq, 0.3, 1e-12, mode, 0.01, sign, ref_ema, sigma, lmbda)
    for w, rw, b, rb in zip(params, ref_params, backups, ref_backups):
        assert torch.equal(b, rb), "the backup must be an exact copy of w"
        assert_close(w, rw)
    for m, rm, g in zip(ema, ref_ema, grads):
        assert_close(m, rm)
        if lmbda == 0:
            assert torch.equal(m, g), "with lmbda=0 the EMA is an exact copy of the grad"


@pytest.mark.parametrize("device,impl", OP_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["size1", "size3", "size1000003", "200tensors", "empty", "scalars"])
@pytest.mark.parametrize("copy", [False, True], ids=["nocopy", "copy"])
def test_reflect(device, impl, dtype, case, copy):
    shapes = CASES[case]
    params, backups, dirs, grads = (make(shapes, dtype, device, s) for s in (18, 19, 20, 21))
    norm_sq = torch.zeros(1, device=device)
    R.norm_sq_(norm_sq, dirs, params, [], O.MODE_IDENTITY, 0.0, [], 0.0)
    copies = [torch.full_like(p, 7.0) for p in params] if copy else []
    ref_params = clone(params)
    O.reflect_(params, backups, dirs, norm_sq, 0.3, 1e-12, grads if copy else [], copies, impl=impl)
    R.reflect_(ref_params, backups, dirs, norm_sq, 0.3, 1e-12, [], [])
    for w, rw in zip(params, ref_params):
        assert_close(w, rw)
    for c, g in zip(copies, grads):
        assert torch.equal(c, g), "the grad copy must be exact"


@pytest.mark.parametrize("device,impl", OP_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["size1", "size3", "size1000003", "200tensors", "empty", "scalars"])
def test_dot_norm_sq(device, impl, dtype, case):
    a, b = make(CASES[case], dtype, device, 22), make(CASES[case], dtype, device, 23)
    acc = torch.tensor([0.5, 0.25], device=device)  # accumulates: the op adds to what is there
    expected = acc.clone()
    O.dot_norm_sq_(acc, a, b, impl=impl)
    R.dot_norm_sq_(expected, a, b)
    torch.testing.assert_close(acc, expected, **TOL[torch.float32])


@pytest.mark.parametrize("device,impl", OP_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_restore(device, impl, dtype, case):
    params, backups = make(CASES[case], dtype, device, 5), make(CASES[case], dtype, device, 6)
    O.restore_(params, backups, impl=impl)
    for w, b in zip(params, backups):
        assert torch.equal(w, b)


SGD_CONFIGS = {
    "plain": dict(lr=0.1, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, maximize=False),
    "momentum_init": dict(lr=0.1, weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False, maximize=False,
                          init_momentum=True),
    "momentum_wd_damp": dict(lr=0.05, weight_decay=1e-2, momentum=0.9, dampening=0.1, nesterov=False,
                             maximize=False),
    "nesterov_maximize": dict(lr=0.05, weight_decay=5e-4, momentum=0.8, dampening=0.0, nesterov=True,
                              maximize=True),
}


@pytest.mark.parametrize("device,impl", OP_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["size1", "size3", "size1000003", "200tensors", "empty", "scalars"])
@pytest.mark.parametrize("config", list(SGD_CONFIGS))
def test_restore_sgd(device, impl, dtype, case, config):
    kw = dict(SGD_CONFIGS[config])
    kw.setdefault("init_momentum", False)
    shapes = CASES[case]
    params, grads, backups = (make(shapes, dtype, device, s) for s in (7, 8, 9))
    bufs = make(shapes, dtype, device, 10) if kw["momentum"] else []
    ref_params, ref_bufs = clone(params), clone(bufs)
    O.restore_sgd_(params, grads, backups, bufs, impl=impl, **kw)
    R.restore_sgd_(ref_params, grads, backups, ref_bufs, grads_b=[], grads_c=[], coef=None, **kw)
    for a, e in zip(params + bufs, ref_params + ref_bufs):
        assert_close(a, e)


# The grad of a fused update as a combination of up to three grad lists (CR-SAM, orthogonal SAM), and
# an update without a restore (a param group that was not perturbed).
COMBINATIONS = {
    "three_terms": dict(terms=2, coef=(1.2, -0.35, 0.5), restore=True),
    "two_terms": dict(terms=1, coef=(1.0, -0.8, 0.0), restore=True),
    "no_restore": dict(terms=0, coef=None, restore=False),
    "no_restore_three_terms": dict(terms=2, coef=(0.3, 1.1, -0.2), restore=False),
}


def combination(shapes, dtype, device, name):
    c = COMBINATIONS[name]
    extra = [make(shapes, dtype, device, 30 + i) for i in range(c["terms"])] + [[], []]
    grad = None if c["coef"] is None else O.GradArgs(torch.tensor(c["coef"], device=device), extra[0], extra[1])
    return grad, c["restore"]


def reference_terms(grad):
    """The reference's arguments of a combination (the op entries take it as ``grad``)."""
    if grad is None:
        return dict(grads_b=[], grads_c=[], coef=None)
    return dict(grads_b=grad.grads_b, grads_c=grad.grads_c, coef=grad.coef)


@pytest.mark.parametrize("device,impl", OP_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["size1", "size1000003", "200tensors", "empty", "scalars"])
@pytest.mark.parametrize("config", ["momentum_init", "nesterov_maximize"])
@pytest.mark.parametrize("combo", list(COMBINATIONS))
def test_restore_sgd_combination(device, impl, dtype, case, config, combo):
    kw = dict(SGD_CONFIGS[config])
    kw.setdefault("init_momentum", False)
    shapes = CASES[case]
    params, grads, backups, bufs = (make(shapes, dtype, device, s) for s in (7, 8, 9, 10))
    grad, restore = combination(shapes, dtype, device, combo)
    backups = backups if restore else []
    ref_params, ref_bufs = clone(params), clone(bufs)
    O.restore_sgd_(params, grads, backups, bufs, impl=impl, grad=grad, **kw)
    R.restore_sgd_(ref_params, grads, backups, ref_bufs, **reference_terms(grad), **kw)
    for a, e in zip(params + bufs, ref_params + ref_bufs):
        assert_close(a, e)


ADAM_CONFIGS = {
    "adam": dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, decoupled=False, maximize=False,
                 step=1.0),
    "adam_wd_maximize": dict(lr=1e-3, beta1=0.8, beta2=0.99, weight_decay=1e-2, eps=1e-6, decoupled=False,
                             maximize=True, step=7.0),
    "adamw": dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=1e-2, eps=1e-8, decoupled=True, maximize=False,
                  step=3.0),
}


@pytest.mark.parametrize("device,impl", OP_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["size1", "size3", "size1000003", "200tensors", "empty", "scalars"])
@pytest.mark.parametrize("config", list(ADAM_CONFIGS))
def test_restore_adam(device, impl, dtype, case, config):
    kw = ADAM_CONFIGS[config]
    shapes = CASES[case]
    params, grads, backups, exp_avgs = (make(shapes, dtype, device, s) for s in (11, 12, 13, 14))
    exp_avg_sqs = make(shapes, dtype, device, 15, positive=True)
    refs = [clone(params), clone(exp_avgs), clone(exp_avg_sqs)]
    O.restore_adam_(params, grads, backups, exp_avgs, exp_avg_sqs, impl=impl, **kw)
    R.restore_adam_(refs[0], grads, backups, refs[1], refs[2], grads_b=[], grads_c=[], coef=None, **kw)
    for a, e in zip(params + exp_avgs + exp_avg_sqs, refs[0] + refs[1] + refs[2]):
        assert_close(a, e)


@pytest.mark.parametrize("device,impl", OP_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["size1", "size1000003", "200tensors", "empty", "scalars"])
@pytest.mark.parametrize("config", ["adam_wd_maximize", "adamw"])
@pytest.mark.parametrize("combo", list(COMBINATIONS))
def test_restore_adam_combination(device, impl, dtype, case, config, combo):
    kw = ADAM_CONFIGS[config]
    shapes = CASES[case]
    params, grads, backups, exp_avgs = (make(shapes, dtype, device, s) for s in (11, 12, 13, 14))
    exp_avg_sqs = make(shapes, dtype, device, 15, positive=True)
    grad, restore = combination(shapes, dtype, device, combo)
    backups = backups if restore else []
    refs = [clone(params), clone(exp_avgs), clone(exp_avg_sqs)]
    O.restore_adam_(params, grads, backups, exp_avgs, exp_avg_sqs, impl=impl, grad=grad, **kw)
    R.restore_adam_(refs[0], grads, backups, refs[1], refs[2], **reference_terms(grad), **kw)
    for a, e in zip(params + exp_avgs + exp_avg_sqs, refs[0] + refs[1] + refs[2]):
        assert_close(a, e)


def test_unknown_impl_is_rejected():
    t = [torch.zeros(3)]
    with pytest.raises(ValueError, match="impl"):
        O.restore_(t, t, impl="fortran")
    with pytest.raises(TypeError, match="impl"):
        O.restore_(t, t, impl=3)


def test_unavailable_impl_names_itself():
    t = [torch.zeros(3)]
    with pytest.raises(RuntimeError, match="impl='cuda'"):
        O.restore_(t, t, impl="cuda")


def _tensors(n=2):
    return [torch.randn(4, 3) for _ in range(n)]


# A list one tensor short (or long, for a list that may also be empty), per op: (the list named, the call).
# Before the shared checks of fastsam/ops/list_checks.py the reference cut such lists short with zip.
SHORT_LISTS = {
    "norm_sq_ params": ("params", lambda impl: O.norm_sq_(torch.zeros(1), _tensors(), _tensors(1), [], 0, 0.0,
                                                          impl=impl)),
    "norm_sq_ ema": ("ema", lambda impl: O.norm_sq_(torch.zeros(1), _tensors(), _tensors(), [], 0, 0.0,
                                                    ema=_tensors(3), sigma=0.5, impl=impl)),
    "norm_sq_ row_scales": ("row_scales", lambda impl: O.norm_sq_(torch.zeros(1), _tensors(), _tensors(),
                                                                  [torch.ones(4)], 2, 0.0, impl=impl)),
    "row_norm_ out": ("out", lambda impl: O.row_norm_([torch.zeros(4)], _tensors(), 0.0, impl=impl)),
    "perturb_ backups": ("backups", lambda impl: O.perturb_(_tensors(), _tensors(), _tensors(1), [], torch.ones(1),
                                                            0.1, 1e-12, 0, 0.0, False, impl=impl)),
    "perturb_ ema": ("ema", lambda impl: O.perturb_(_tensors(), _tensors(), _tensors(), [], torch.ones(1), 0.1,
                                                    1e-12, 0, 0.0, False, ema=_tensors(1), impl=impl)),
    "reflect_ dirs": ("dirs", lambda impl: O.reflect_(_tensors(), _tensors(), _tensors(1), torch.ones(1), 0.1, 1e-12,
                                                      impl=impl)),
    "reflect_ grad_copies": ("grads and grad_copies", lambda impl: O.reflect_(_tensors(), _tensors(), _tensors(),
                                                                    torch.ones(1), 0.1, 1e-12, grads=_tensors(),
                                                                    grad_copies=_tensors(1), impl=impl)),
    "dot_norm_sq_ b": ("b", lambda impl: O.dot_norm_sq_(torch.zeros(2), _tensors(), _tensors(3), impl=impl)),
    "restore_ backups": ("backups", lambda impl: O.restore_(_tensors(), _tensors(1), impl=impl)),
    "restore_sgd_ grads": ("grads", lambda impl: O.restore_sgd_(_tensors(), _tensors(1), [], [], 0.1, 0.0, 0.0, 0.0,
                                                                False, False, False, impl=impl)),
    "restore_sgd_ momentum_buffers": ("momentum_buffers", lambda impl: O.restore_sgd_(
        _tensors(), _tensors(), [], _tensors(1), 0.1, 0.0, 0.9, 0.0, False, False, False, impl=impl)),
    "restore_sgd_ grads_b": ("grads_b", lambda impl: O.restore_sgd_(
        _tensors(), _tensors(), [], [], 0.1, 0.0, 0.0, 0.0, False, False, False,
        grad=O.GradArgs(torch.ones(3), _tensors(1)), impl=impl)),
    "restore_adam_ exp_avg_sqs": ("exp_avg_sqs", lambda impl: O.restore_adam_(
        _tensors(), _tensors(), [], _tensors(), _tensors(1), 1e-3, 0.9, 0.999, 0.0, 1e-8, False, False, 1.0,
        impl=impl)),
    "restore_adam_ steps": ("steps", lambda impl: O.restore_adam_(
        _tensors(), _tensors(), [], _tensors(), _tensors(), 1e-3, 0.9, 0.999, 0.0, 1e-8, False, False, 1.0,
        steps=[torch.ones(1)], impl=impl)),
}


@pytest.mark.parametrize("device,impl", [p for p in impl_params() if p.values in {("cpu", "torch"), ("cpu", "triton")}])
@pytest.mark.parametrize("case", sorted(SHORT_LISTS))
def test_a_list_of_the_wrong_length_is_named(case, device, impl):
    # The compiled ops check the same rules with their own messages (tests/test_cpu_ext_build.py).
    name, call = SHORT_LISTS[case]
    with pytest.raises(ValueError, match=rf"^{name} must (be both empty or both )?hold 2 tensors"):
        call(impl)
