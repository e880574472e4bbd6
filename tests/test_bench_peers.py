"""The benchmark's peers compute davda54/sam's step, so the rows of the table do the same work."""
import pytest
import torch

import fastsam
from fastsam.bench.peers import PEERS, make_optimizer, rows
from fastsam.bench.shapes import make_params

SHAPES = [("w", (5, 3)), ("b", (5,)), ("c", (2, 3, 2, 2))]


def _two_steps(row, adaptive=False):
    params = make_params(SHAPES)
    opt = make_optimizer(row, params, rho=0.5)
    for group in opt.param_groups:
        group["adaptive"] = adaptive
    for _ in range(2):
        opt.first_step()
        opt.second_step()
    return params


def _plain_sgd():
    params = [p.detach().clone() for p in make_params(SHAPES)]
    grads = [p.grad for p in make_params(SHAPES)]
    bufs = [g.clone() for g in grads]
    for step in range(2):  # the grads stay fixed, as in the benchmark
        bufs = bufs if step == 0 else [b * 0.9 + g for b, g in zip(bufs, grads)]
        params = [p - 0.1 * b for p, b in zip(params, bufs)]
    return params


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("row", PEERS)
def test_peers_restore_exactly_then_step_sgd(row, adaptive):
    for got, want in zip(_two_steps(row, adaptive), _plain_sgd()):
        torch.testing.assert_close(got.detach(), want)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("row", PEERS)
def test_peer_first_step_moves_to_w_plus_e(row, adaptive):
    params = make_params(SHAPES)
    opt = make_optimizer(row, params, rho=0.5)
    for group in opt.param_groups:
        group["adaptive"] = adaptive
    w = torch.cat([p.detach().flatten() for p in params])
    g = torch.cat([p.grad.flatten() for p in params])
    t = w.abs() if adaptive else torch.ones_like(w)
    opt.first_step()
    e = torch.cat([p.detach().flatten() for p in params]) - w
    torch.testing.assert_close(e, 0.5 * t * t * g / (t * g).norm())


def test_rows_are_the_peers_then_the_available_impls():
    expected = [i for i in fastsam.available_impls("cpu") if i != "triton"]  # triton on CPU: interpreter only
    assert rows("cpu") == ["loop", "foreach", *expected]
    assert rows("cpu", ["torch"]) == ["loop", "foreach", "torch"]


@pytest.mark.skipif(not hasattr(fastsam, "SAM"), reason="fastsam.SAM is not there yet")
@pytest.mark.parametrize("impl", rows("cpu")[len(PEERS):])
def test_fastsam_rows_do_the_loop_peers_work(impl):
    for got, want in zip(_two_steps(impl), _two_steps("loop")):
        torch.testing.assert_close(got.detach(), want.detach())
