"""The CVaR table of python -m fastsam.bench: its Brent search finds minima, its peers compute fastsam's loss and
gradient, and the command line prints and stores the table."""
import json
import math

import pytest
import torch

from fastsam.bench import cli, cvar_peers
from fastsam.bench.brent import SQRT_EPS, fminbound
from fastsam.bench.cli import parse_args
from fastsam.bench.peers import fastsam_impls
from fastsam.losses import cvar_cross_entropy

# ---- Brent's bounded minimisation ------------------------------------------------------------------------


def _piecewise(x):  # convex, three pieces, minimum 0.6 where -2x meets 0.5 (x - 3)
    return max(-2.0 * x, 0.5 * (x - 3.0), x - 4.0)


@pytest.mark.parametrize("f,lower,upper,argmin", [
    (lambda x: (x - 1.234) ** 2, -10.0, 10.0, 1.234),
    (lambda x: 3.0 * (x + 7.5) ** 2 - 2.0, -1000.0, 0.0, -7.5),
    (lambda x: abs(x - 0.3), -1000.0, 5.0, 0.3),
    (lambda x: abs(x - 123.456), -1000.0, 1000.0, 123.456),
    (_piecewise, -1000.0, 10.0, 0.6),
    (math.cos, 3.0, 4.0, math.pi),
    (lambda x: x, 2.0, 5.0, 2.0),  # monotone: the minimum is an end of the bracket
    (lambda x: -x, 2.0, 5.0, 5.0),
])
@pytest.mark.parametrize("xtol", [1e-5, 1e-3])
def test_brent_finds_the_minimum_within_xtol(f, lower, upper, argmin, xtol):
    found = fminbound(f, lower, upper, xtol=xtol)
    assert found.converged and found.nfev < 100
    assert abs(found.x - argmin) <= xtol + 2 * SQRT_EPS * abs(argmin)
    assert found.fun == f(found.x) and lower <= found.x <= upper


def test_brent_counts_calls_and_stops_at_maxfun():
    calls = []

    def f(x):
        calls.append(x)
        return abs(x - 0.3)

    found = fminbound(f, -1000.0, 5.0)
    assert found.nfev == len(calls) and found.fun == min(abs(x - 0.3) for x in calls)
    calls.clear()
    short = fminbound(f, -1000.0, 5.0, maxfun=5)
    assert not short.converged and short.nfev == len(calls) == 5
    assert fminbound(f, 0.3, 0.3).x == 0.3  # an empty bracket: its one point
    with pytest.raises(ValueError, match="lower <= upper"):
        fminbound(f, 1.0, 0.0)
    with pytest.raises(ValueError, match="maxfun"):
        fminbound(f, 0.0, 1.0, maxfun=0)


# ---- the peers against fastsam's loss ----------------------------------------------------------------------

# (n, alpha): k = alpha n fractional (9.6, 2.1), whole (6, 10: the boundary loss gets no weight), below 1, all
CASES = [(32, 0.3), (7, 0.3), (20, 0.3), (10, 1.0), (7, 0.05), (50, 0.2)]


def _loss_and_grad(fn, n, alpha, dtype=torch.float32):
    logits, target = cvar_peers.make_logits(n, dtype=dtype, seed=n)
    loss = fn(logits, target, alpha)
    loss.backward()
    return loss.detach(), logits.grad, logits, target


def _fastsam(n, alpha, dtype=torch.float32):
    return _loss_and_grad(lambda x, t, a: cvar_cross_entropy(x, t, a, impl="torch"), n, alpha, dtype)


@pytest.mark.parametrize("n,alpha", CASES)
def test_composite_is_fastsam_cvar(n, alpha):
    value, grad, _, _ = _loss_and_grad(cvar_peers.composite_cvar_cross_entropy, n, alpha)
    want_value, want_grad, _, _ = _fastsam(n, alpha)
    torch.testing.assert_close(value, want_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)


def _boundary(logits, target, alpha):
    """Index of the ceil(k)-th largest loss (the VaR) and k."""
    losses = torch.nn.functional.cross_entropy(logits.detach(), target, reduction="none")
    k = alpha * losses.numel()
    return losses.argsort(descending=True)[math.ceil(round(k, 9)) - 1].item(), k


@pytest.mark.parametrize("n,alpha", CASES)
def test_authors_peer_is_fastsam_cvar_to_its_tolerance(n, alpha):
    """The search stops within xtol of the VaR, so the loss is the CVaR to ~1e-5; the gradient is fastsam's on
    every sample but the VaR's: its fractional weight (k - floor(k)) / k is 0 or 1/k on either side of it."""
    value, grad, logits, target = _loss_and_grad(cvar_peers.authors_cvar_cross_entropy, n, alpha)
    want_value, want_grad, _, _ = _fastsam(n, alpha)
    torch.testing.assert_close(value, want_value, rtol=1e-4, atol=0.0)
    at, k = _boundary(logits, target, alpha)
    whole = abs(k - round(k)) <= 1e-9 * k
    others = torch.arange(n) != at
    torch.testing.assert_close(grad[others], want_grad[others], rtol=1e-5, atol=1e-6)
    if whole or k >= n:  # no fractional weight: the VaR's gradient too
        torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)
    else:
        full = want_grad[at] * (1.0 / k) / ((k - math.floor(k)) / k)  # the VaR's gradient at weight 1/k
        assert torch.allclose(grad[at], full, rtol=1e-5, atol=1e-6) or torch.equal(grad[at], torch.zeros(8))


@pytest.mark.parametrize("n,alpha,on_var", [(32, 0.3, True), (4096, 0.3, False), (1000, 0.01, False)])
def test_authors_search_minimises_the_objective(n, alpha, on_var):
    """The search's minimum is the CVaR; its lambda is the VaR within xtol where the objective is steep on both
    sides of it (n = 32: slopes -1/24 and 1/16). For large n the slopes beside the VaR are ~1/(alpha n) and the
    fp32 rounding of the mean then moves lambda by more than xtol (1.5e-4 at n = 4096), at no cost in the loss."""
    logits, target = cvar_peers.make_logits(n)
    losses = torch.nn.functional.cross_entropy(logits.detach(), target, reduction="none")
    found = cvar_peers.authors_lambda(losses, alpha)
    value, var = cvar_cross_entropy(logits.detach(), target, alpha, impl="torch", return_lambda=True)
    assert found.converged and found.nfev <= cvar_peers.MAXFUN
    assert found.fun == pytest.approx(value.item(), rel=1e-6)
    if on_var:
        assert abs(found.x - var.item()) <= 2 * (SQRT_EPS * abs(found.x) + cvar_peers.XTOL / 3)


def test_own_brent_follows_scipy_fminbound():
    """The fallback minimiser follows scipy's steps: the same number of evaluations, the same point up to the
    rounding of the parabolic step's arithmetic (1e-8, xtol is 1e-5), on the authors' objective (scipy is what
    the authors call and what the bench runs when it is installed)."""
    scipy_optimize = pytest.importorskip("scipy.optimize")
    assert cvar_peers.minimiser()[1].startswith("scipy.optimize.fminbound")
    for n, alpha in ((32, 0.3), (4096, 0.3), (1000, 0.01)):
        logits, target = cvar_peers.make_logits(n)
        losses = torch.nn.functional.cross_entropy(logits.detach(), target, reduction="none").double()

        def objective(lam):
            return (lam + torch.relu(losses - lam).mean() / alpha).item()
        lower, upper = losses.min().item() - cvar_peers.BRACKET, losses.max().item()
        x, fun, flag, nfev = scipy_optimize.fminbound(objective, lower, upper, xtol=cvar_peers.XTOL,
                                                      maxfun=cvar_peers.MAXFUN, full_output=True)
        own = fminbound(objective, lower, upper, xtol=cvar_peers.XTOL, maxfun=cvar_peers.MAXFUN)
        assert own.nfev == nfev and own.x == pytest.approx(x, rel=0, abs=1e-8) and flag == 0


def test_authors_peer_syncs_once_per_evaluation(monkeypatch):
    items = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: items.append(1) or real_item(self))
    logits, target = cvar_peers.make_logits(32)
    value, evals = cvar_peers.evaluate("authors", logits, target)
    assert evals > 10 and len(items) == evals + 1  # + 1: evaluate's own .item() of the loss


def test_bf16_logits_run_every_peer():
    for row in cvar_peers.CVAR_PEERS:
        value, grad, logits, _ = _loss_and_grad(cvar_peers.cvar_loss_fn(row), 64, 0.3, torch.bfloat16)
        want_value, _, _, _ = _fastsam(64, 0.3, torch.bfloat16)
        assert grad.dtype == torch.bfloat16 and math.isclose(value.item(), want_value.item(), rel_tol=2e-2)


def test_rows_are_the_peers_then_the_impls():
    assert cvar_peers.cvar_rows("cpu") == ["composite", "authors", *fastsam_impls("cpu")]
    assert cvar_peers.cvar_rows("cpu", ["torch"]) == ["composite", "authors", "torch"]


# ---- the command line --------------------------------------------------------------------------------------


def test_quick_cvar_table_is_printed_and_stored(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli.main(["--quick", "--device", "cpu", "--tables", "cvar", "--cvar-rows", "32,1000", "--reps", "2",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = [line.split() for line in printed.splitlines()]
    record = json.loads(out.read_text())
    rows = cvar_peers.cvar_rows("cpu")
    labels = [r if r in cvar_peers.CVAR_PEERS else f"fastsam:{r}" for r in rows]
    assert "CVaR losses" in printed and "alpha=0.3" in printed and "bw limit" not in printed
    assert [cells[:2] for cells in table if cells and cells[0] in ("32", "1000")] == [
        [n, label] for n in ("32", "1000") for label in labels]
    assert record["tables"] == ["cvar"] and record["rows"] == [] and record["shapes"] == {}
    cvar = record["cvar"]
    assert cvar["classes"] == 8 and cvar["alpha"] == 0.3 and cvar["sizes"] == [32, 1000]
    assert [(r["n"], r["impl"]) for r in cvar["rows"]] == [(n, r) for n in (32, 1000) for r in rows]
    for n in (32, 1000):
        block = {r["impl"]: r for r in cvar["rows"] if r["n"] == n}
        assert block["composite"]["speedup_vs_composite"] == 1.0 and block["authors"]["speedup_vs_authors"] == 1.0
        assert block["authors"]["evals"] > 10 and block["composite"]["evals"] is None
        for r in block.values():
            assert r["reps"] == len(r["times_ms"]) == 2 and r["median_ms"] > 0
            for peer in cvar_peers.CVAR_PEERS:
                assert r[f"speedup_vs_{peer}"] == pytest.approx(block[peer]["median_ms"] / r["median_ms"])
            assert r["value"] == pytest.approx(block["composite"]["value"], rel=1e-4)


def test_cvar_defaults_and_flags():
    args = parse_args(["--device", "cpu"])
    assert args.tables == ["sam", "cvar", "affect"] and args.cvar_rows == [32, 4096, 262144] and args.cvar_alpha == 0.3
    args = parse_args(["--device", "cpu", "--tables", "cvar,cvar", "--cvar-rows", "64, 8,64", "--cvar-alpha", "1"])
    assert args.tables == ["cvar"] and args.cvar_rows == [64, 8] and args.cvar_alpha == 1.0
