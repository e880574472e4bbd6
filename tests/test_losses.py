"""fastsam.losses: the math (brute force, gradcheck, torch's losses at alpha = 1), autograd, modules, errors.

The ops under the losses are compared implementation by implementation in test_cvar_ops.py; here every
available impl runs through the public API, against the reference impl ("torch").
"""
import pytest
import torch
import torch.nn.functional as F

from fastsam import losses as L

from _impls import assert_close, impl_params

IMPLS = impl_params()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def brute_force_cvar(values: torch.Tensor, alpha: float) -> float:
    """min over lambda of lambda + 1/(alpha n) sum (l - lambda)_+: the minimum is at one of the losses."""
    v = values.double().flatten()
    return min(float(lam + (v - lam).clamp(min=0).sum() / (alpha * v.numel())) for lam in v)


@pytest.mark.parametrize("n", [1, 2, 7, 10, 33, 100])
@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.3, 0.77, 0.01])
def test_value_is_the_rockafellar_uryasev_minimum(n, alpha):
    values = torch.randn(n, generator=gen(n), dtype=torch.float64)
    values[: n // 3] = values[0]  # ties
    loss, lam = L.cvar(values, alpha, return_lambda=True, impl="torch")
    assert loss.item() == pytest.approx(brute_force_cvar(values, alpha), rel=1e-12, abs=1e-12)
    # lambda is a minimizer of the same objective
    objective = lam + (values - lam).clamp(min=0).sum() / (alpha * n)
    assert objective.item() == pytest.approx(loss.item(), rel=1e-12, abs=1e-12)


def test_gradcheck_float64():
    x = torch.randn(9, 5, generator=gen(0), dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (9,), generator=gen(1))
    y[2] = -1
    for smoothing in (0.0, 0.2):
        assert torch.autograd.gradcheck(
            lambda x: L.cvar_cross_entropy(x, y, 0.3, label_smoothing=smoothing, impl="torch") * 1.7, (x,))
    t = torch.randint(0, 2, (9, 5), generator=gen(2)).double()
    t[0, 0] = t[4] = -1
    pw = torch.rand(5, generator=gen(3)) + 0.5
    for reduction in ("element", "sample"):
        assert torch.autograd.gradcheck(
            lambda x: L.cvar_bce_with_logits(x, t, 0.45, reduction=reduction, pos_weight=pw, impl="torch"), (x,))
    v = torch.randn(20, generator=gen(4), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: L.cvar(v, 0.33, impl="torch"), (v,))


def test_alpha_one_is_torchs_mean_loss():
    x = torch.randn(12, 6, generator=gen(0), dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 6, (12,), generator=gen(1))
    y[::4] = -1
    ours = L.cvar_cross_entropy(x, y, 1.0, label_smoothing=0.1, impl="torch")
    theirs = F.cross_entropy(x, y, ignore_index=-1, label_smoothing=0.1)
    g_ours, = torch.autograd.grad(ours, x)
    g_theirs, = torch.autograd.grad(theirs, x)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(g_ours, g_theirs)
    t = torch.randint(0, 2, (12, 6), generator=gen(2)).double()
    pw = torch.rand(6, generator=gen(3), dtype=torch.float64) + 0.5
    ours = L.cvar_bce_with_logits(x, t, 1.0, pos_weight=pw, impl="torch")
    theirs = F.binary_cross_entropy_with_logits(x, t, pos_weight=pw)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(theirs, x)[0])


def test_top_k_form_matches_autograd_through_sort():
    """The fused gradient equals autograd through an explicit sort-based top-k (no ties)."""
    x = torch.randn(50, 8, generator=gen(5), dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 8, (50,), generator=gen(6))
    alpha = 0.37  # k = 18.5
    losses = F.cross_entropy(x, y, reduction="none")
    top = losses.sort(descending=True).values
    k = alpha * 50
    explicit = (top[:18].sum() + (k - 18) * top[18]) / k
    fused = L.cvar_cross_entropy(x, y, alpha, impl="torch")
    torch.testing.assert_close(fused, explicit)
    torch.testing.assert_close(torch.autograd.grad(fused, x)[0], torch.autograd.grad(explicit, x)[0])


@pytest.mark.parametrize("device,impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_every_impl_through_autograd(device, impl, dtype):
    x = (torch.randn(40, 8, generator=gen(7)) * 2).to(device=device, dtype=dtype).requires_grad_()
    y = torch.randint(0, 8, (40,), generator=gen(8)).to(device)
    y[::6] = -1
    x_ref = x.detach().cpu().requires_grad_()
    ours = L.cvar_cross_entropy(x, y, 0.3, label_smoothing=0.05, impl=impl)
    ref = L.cvar_cross_entropy(x_ref, y.cpu(), 0.3, label_smoothing=0.05, impl="torch")
    assert ours.dtype == dtype
    (ours * 2.5).backward()
    (ref * 2.5).backward()
    assert_close(ours.detach().cpu(), ref.detach(), dtype)
    assert_close(x.grad.cpu(), x_ref.grad, dtype)


@pytest.mark.parametrize("device,impl", IMPLS)
def test_bce_and_generic_through_autograd(device, impl):
    x = torch.randn(16, 12, generator=gen(9), device="cpu").to(device).requires_grad_()
    t = torch.randint(0, 2, (16, 12), generator=gen(10)).float().to(device)
    t[0, :4] = -1
    x_ref = x.detach().cpu().requires_grad_()
    for reduction in ("element", "sample"):
        x.grad = x_ref.grad = None
        L.cvar_bce_with_logits(x, t, 0.5, reduction=reduction, impl=impl).backward()
        L.cvar_bce_with_logits(x_ref, t.cpu(), 0.5, reduction=reduction, impl="torch").backward()
        assert_close(x.grad.cpu(), x_ref.grad)
    v = torch.randn(30, generator=gen(11)).to(device).requires_grad_()
    v_ref = v.detach().cpu().requires_grad_()
    out, lam = L.cvar(v.view(5, 6), 0.2, return_lambda=True, impl=impl)
    ref, lam_ref = L.cvar(v_ref.view(5, 6), 0.2, return_lambda=True, impl="torch")
    assert not lam.requires_grad
    (out * -3.0).backward()
    (ref * -3.0).backward()
    assert_close(out.detach().cpu(), ref.detach())
    assert_close(lam.cpu(), lam_ref)
    assert_close(v.grad.cpu(), v_ref.grad)


def test_backward_twice_with_retain_graph():
    x = torch.randn(10, 3, generator=gen(12), requires_grad=True)
    y = torch.randint(0, 3, (10,), generator=gen(13))
    loss = L.cvar_cross_entropy(x, y, 0.5, impl="torch")
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward(retain_graph=True)
    loss.backward()  # the saved gradient is never scaled in place: the third call adds the same again
    torch.testing.assert_close(x.grad, 3 * first)


def test_modules():
    crit = L.CVaRCrossEntropyLoss(alpha=0.3, label_smoothing=0.1, impl="torch")
    x = torch.randn(8, 4, generator=gen(14))
    y = torch.randint(0, 4, (8,), generator=gen(15))
    assert torch.equal(crit(x, y), L.cvar_cross_entropy(x, y, 0.3, label_smoothing=0.1, impl="torch"))
    assert "alpha=0.3" in repr(crit)
    pw = torch.tensor([1.0, 2.0, 3.0, 4.0])
    bce = L.CVaRBCEWithLogitsLoss(alpha=0.5, reduction="sample", pos_weight=pw, impl="torch")
    t = torch.randint(0, 2, (8, 4), generator=gen(16)).float()
    assert torch.equal(bce(x, t), L.cvar_bce_with_logits(x, t, 0.5, "sample", pos_weight=pw, impl="torch"))
    assert "pos_weight" in bce.state_dict()


def test_one_dim_bce_logits_and_scalar_pos_weight():
    x = torch.randn(9, generator=gen(17))
    t = torch.randint(0, 2, (9,), generator=gen(18)).float()
    ours = L.cvar_bce_with_logits(x, t, 1.0, pos_weight=torch.tensor(2.0), impl="torch")
    torch.testing.assert_close(ours, F.binary_cross_entropy_with_logits(x, t, pos_weight=torch.tensor(2.0)))


@pytest.mark.parametrize("call,error,match", [
    (lambda x, y: L.cvar_cross_entropy(x, y, 0.0), ValueError, "alpha must be in \\(0, 1\\]"),
    (lambda x, y: L.cvar_cross_entropy(x, y, 1.5), ValueError, "alpha"),
    (lambda x, y: L.cvar_cross_entropy(x, y, float("nan")), ValueError, "alpha must be finite"),
    (lambda x, y: L.cvar_cross_entropy(x, y, "0.3"), TypeError, "alpha must be a number"),
    (lambda x, y: L.cvar_cross_entropy(x, y, 0.3, impl="gpu"), ValueError, "impl must be one of"),
    (lambda x, y: L.cvar_cross_entropy(x[0], y, 0.3), ValueError, "logits must be 2-D"),
    (lambda x, y: L.cvar_cross_entropy(x, y[:3], 0.3), ValueError, "target must have shape \\(6,\\)"),
    (lambda x, y: L.cvar_cross_entropy(x, y.float(), 0.3), TypeError, "integer class indices"),
    (lambda x, y: L.cvar_cross_entropy(x.long(), y, 0.3), TypeError, "logits must be float32"),
    (lambda x, y: L.cvar_cross_entropy(x, y, 0.3, label_smoothing=1.5), ValueError, "label_smoothing"),
    (lambda x, y: L.cvar_cross_entropy(x, y, 0.3, ignore_index=-1.0), TypeError, "ignore_index must be an int"),
    (lambda x, y: L.cvar_cross_entropy(x, y + 10, 0.3), ValueError, "outside \\[0, 4\\)"),
    (lambda x, y: L.cvar_cross_entropy(x, [0, 1], 0.3), TypeError, "target must be a Tensor"),
    (lambda x, y: L.cvar_bce_with_logits(x, x, 0.3, reduction="mean"), ValueError, "reduction must be"),
    (lambda x, y: L.cvar_bce_with_logits(x, x[:, :2], 0.3), ValueError, "target must have shape"),
    (lambda x, y: L.cvar_bce_with_logits(x, x, 0.3, pos_weight=torch.ones(3)), ValueError, "pos_weight must have"),
    (lambda x, y: L.cvar_bce_with_logits(x, x, 0.3, pos_weight=[1.0] * 4), TypeError, "pos_weight must be a Tensor"),
    (lambda x, y: L.cvar(x, -0.1), ValueError, "alpha"),
    (lambda x, y: L.CVaRCrossEntropyLoss(alpha=2.0), ValueError, "alpha"),
    (lambda x, y: L.CVaRBCEWithLogitsLoss(alpha=0.3, reduction="sum"), ValueError, "reduction"),
])
def test_bad_input_names_the_argument(call, error, match):
    x = torch.randn(6, 4)
    y = torch.randint(0, 4, (6,))
    with pytest.raises(error, match=match):
        call(x, y)


def test_nan_logits_and_all_ignored_are_defined():
    x = torch.randn(6, 4, requires_grad=True)
    y = torch.randint(0, 4, (6,))
    bad = x.detach().clone()
    bad[1, 1] = float("nan")
    bad.requires_grad_()
    loss = L.cvar_cross_entropy(bad, y, 0.5)
    loss.backward()
    assert loss.isnan() and bad.grad.isnan().all()
    loss = L.cvar_cross_entropy(x, torch.full_like(y, -1), 0.5)
    loss.backward()
    assert loss.isnan() and torch.equal(x.grad, torch.zeros(6, 4))
