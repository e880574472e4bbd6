"""fastsam.distributed.sam_closure: DDP on 2 CPU processes (gloo) against a single-process simulation.

Run as a script, this file is one rank of the DDP job (``python test_distributed.py RANK INIT_FILE OUT``):
it trains every configuration of CONFIGS and saves the parameters after each step. The test then checks
that the ranks agree exactly and match the simulation written here with plain torch, which averages the
per-rank grads the way DDP does (each rank's BatchNorm keeps its own batch statistics).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import fastsam
from fastsam.distributed import sam_closure

WORLD = 2
RHO, LR, MOMENTUM, GAMMA, BETA = 0.5, 0.1, 0.9, 0.1, 0.1
# method -> number of steps; LastSAM switches to SAM after its first step. "sam_zero": SAM over ZeRO-1
# (torch's ZeroRedundancyOptimizer: each rank updates its partition and broadcasts it), the math of "sam".
STEPS = {"sam": 3, "crsam": 2, "crsam_paper": 2, "lastsam": 3, "sam_zero": 3, "gsam": 2, "wsam": 2,
         "sam_interval": 3, "looksam": 4}
ALPHA, WSAM_GAMMA = 0.4, 0.6  # GSAM's alpha; WSAM coupled, a = 1.5
LOOK_K, LOOK_ALPHA = 2, 0.7  # LookSAM: SAM steps 0 and 2, the steps between 1 and 3 reuse g_v
CONFIGS = [(method, sync) for method in STEPS for sync in (False, True)]


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(),
                               torch.nn.Linear(6, 1))


def _shard(step: int, rank: int):
    """(x [8, 4], y [8, 1]) fp32: rank ``rank``'s batch of step ``step``; the ranks' batches differ."""
    g = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(8, 4, generator=g) + rank
    return x, torch.randn(8, 1, generator=g)


def _optimizer(method: str, params):
    if method == "sam":
        return fastsam.SAM(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)
    if method == "sam_zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer
        return fastsam.SAM(params, ZeroRedundancyOptimizer, optimizer_class=torch.optim.SGD, rho=RHO, lr=LR,
                           momentum=MOMENTUM)
    if method.startswith("crsam"):
        return fastsam.CRSAM(params, torch.optim.SGD, rho=RHO, gamma=GAMMA, beta=BETA, lr=LR, momentum=MOMENTUM,
                             mode="paper" if method == "crsam_paper" else "authors")
    if method == "gsam":
        return fastsam.GSAM(params, torch.optim.SGD, rho=RHO, alpha=ALPHA, lr=LR, momentum=MOMENTUM)
    if method == "wsam":
        return fastsam.WSAM(params, torch.optim.SGD, rho=RHO, gamma=WSAM_GAMMA, decouple=False, lr=LR,
                            momentum=MOMENTUM)
    if method == "sam_interval":  # SAM on steps 0 and 2, the one-pass step 1 between
        return fastsam.SAM(params, torch.optim.SGD, rho=RHO, interval=2, lr=LR, momentum=MOMENTUM)
    if method == "looksam":
        return fastsam.LookSAM(params, torch.optim.SGD, rho=RHO, k=LOOK_K, alpha=LOOK_ALPHA, lr=LR, momentum=MOMENTUM)
    return fastsam.LastSAM(params, torch.optim.SGD, switch_at=1, sharpness="sam", rho=RHO, lr=LR,
                           momentum=MOMENTUM)


# ---- one rank of the DDP job -------------------------------------------------------------------
def _rank_main(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {}
    for method, sync in CONFIGS:
        net = _net()
        model = torch.nn.parallel.DistributedDataParallel(net)
        opt = _optimizer(method, model.parameters())
        trajectory = []
        for step in range(STEPS[method]):
            x, y = _shard(step, rank)
            opt.step(sam_closure(opt, model, lambda: F.mse_loss(model(x), y), sync_first_pass=sync))
            opt.zero_grad()
            trajectory.append([p.detach().clone() for p in net.parameters()])
        results[method, sync] = trajectory
    torch.save(results, out)
    dist.destroy_process_group()


# ---- the single-process simulation -------------------------------------------------------------
def _loss(net, names, w, step: int, rank: int):
    x, y = _shard(step, rank)
    return F.mse_loss(torch.func.functional_call(net, dict(zip(names, w)), (x,)), y)


def _grads(net, names, w, step: int, rank: int):
    """The grad of rank ``rank``'s loss at parameters ``w`` (a list like net.parameters())."""
    w = [t.detach().requires_grad_() for t in w]
    return torch.autograd.grad(_loss(net, names, w, step, rank), w)


def _mean_loss(net, names, w, step: int) -> float:
    with torch.no_grad():
        return sum(_loss(net, names, w, step, r) for r in range(WORLD)) / WORLD


def _mean(per_rank):
    return [torch.stack(gs).mean(0) for gs in zip(*per_rank)]


def _moved(w, g, sign: float = 1.0):
    """w + sign * rho g / (||g|| + 1e-12), the norm over all tensors."""
    scale = sign * RHO / (torch.linalg.vector_norm(torch.cat([t.flatten() for t in g])) + 1e-12)
    return [p + scale * t for p, t in zip(w, g)]


def _flat(ts):
    return torch.cat([t.flatten() for t in ts])


def _update_grad(method: str, sync: bool, step: int, net, names, w, kept):
    """The grad the base optimizer steps with on every rank: the mean over ranks, as DDP all-reduces.
    ``kept``: what a method keeps from step to step (LookSAM's g_v)."""
    grad = [_grads(net, names, w, step, r) for r in range(WORLD)]
    if (method == "lastsam" and step == 0) or (method == "sam_interval" and step % 2):  # one pass: synced
        return _mean(grad)
    if method == "looksam":  # g enters g_v and the steps between, so the pass at w is synced in both modes
        g = _mean(grad)
        if step % LOOK_K:
            ratio = LOOK_ALPHA * _flat(g).norm() / _flat(kept["g_v"]).norm()
            return [x + ratio * v for x, v in zip(g, kept["g_v"])]
        g_s = _mean([_grads(net, names, _moved(w, g), step, r) for r in range(WORLD)])
        coef = _flat(g).dot(_flat(g_s)) / (_flat(g).norm() ** 2 + 1e-12)
        kept["g_v"] = [s - coef * x for s, x in zip(g_s, g)]
        return g_s
    if method in ("gsam", "wsam"):  # g0 enters the update, so the pass at w is synced in both modes
        g0 = _mean(grad)
        g1 = _mean([_grads(net, names, _moved(w, g0), step, r) for r in range(WORLD)])
        if method == "wsam":
            a = WSAM_GAMMA / (1 - WSAM_GAMMA)
            return [a * x + (1 - a) * y for x, y in zip(g1, g0)]
        flat0, flat1 = (torch.cat([t.flatten() for t in g]) for g in (g0, g1))
        n0, n1 = flat0.norm(), flat1.norm()
        cos = flat0.dot(flat1) / (n1 * n0 + 1e-12)
        return [x - ALPHA * (y - cos * n0 * x / (n1 + 1e-12)) for x, y in zip(g1, g0)]
    if method.startswith("crsam"):  # g0 enters the update, so the pass at w is synced in both modes
        g0 = _mean(grad)
        plus = _mean([_grads(net, names, _moved(w, g0), step, r) for r in range(WORLD)])
        minus = _mean([_grads(net, names, _moved(w, g0, -1.0), step, r) for r in range(WORLD)])
        a, b = GAMMA, BETA
        if method == "crsam_paper":  # the losses of the whole batch: the mean over the ranks
            l0, lp, lm = (_mean_loss(net, names, v, step) for v in (w, _moved(w, g0), _moved(w, g0, -1.0)))
            a, b = GAMMA / (lp + lm - 2 * l0), BETA / (lp - lm)
        return [gp + a * (gp + gm - 2 * g) + b * (gp - gm) for gp, gm, g in zip(plus, minus, g0)]
    # SAM: each rank's own perturbation (no_sync), or the one of the averaged grad (synced).
    perturbation = [_mean(grad)] * WORLD if sync else grad
    return _mean([_grads(net, names, _moved(w, perturbation[r]), step, r) for r in range(WORLD)])


def _simulate(method: str, sync: bool):
    net = _net()
    names = [n for n, _ in net.named_parameters()]
    w = [p.detach().clone() for p in net.parameters()]
    leaves = [t.clone().requires_grad_() for t in w]
    sgd = torch.optim.SGD(leaves, lr=LR, momentum=MOMENTUM)
    trajectory, kept = [], {}
    for step in range(STEPS[method]):
        for leaf, g in zip(leaves, _update_grad(method, sync, step, net, names, [t.detach() for t in leaves], kept)):
            leaf.grad = g
        sgd.step()
        trajectory.append([t.detach().clone() for t in leaves])
    return trajectory


# ---- the tests ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    tmp = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    outs = [tmp / f"rank{r}.pt" for r in range(WORLD)]
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(tmp / "rendezvous"), str(outs[r])], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the DDP ranks did not finish within 120 s")
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log}"
    return [torch.load(o) for o in outs]


@pytest.mark.parametrize("method,sync", CONFIGS)
def test_ranks_identical_and_match_simulation(ddp_results, method, sync):
    rank0, rank1 = (res[method, sync] for res in ddp_results)
    expected = _simulate(method, sync)
    for step, (w0, w1, ref) in enumerate(zip(rank0, rank1, expected)):
        for a, b, c in zip(w0, w1, ref):
            assert torch.equal(a, b), f"ranks differ after step {step}"
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step}: {m}")


@pytest.mark.parametrize("method", ["sam", "lastsam"])
def test_local_and_synced_first_pass_differ(ddp_results, method):
    local, synced = (ddp_results[0][method, sync][-1] for sync in (False, True))
    assert max((a - b).abs().max().item() for a, b in zip(local, synced)) > 1e-3


@pytest.mark.parametrize("method", ["sam", "crsam"])
def test_bn_running_stats_update_at_w_only(method):
    # Without DDP: every pass away from w (one for SAM, two for CR-SAM) leaves the running stats alone.
    net = _net()
    ref = _net()
    opt = _optimizer(method, net.parameters())
    x, y = _shard(0, 0)
    ref(x)  # one training-mode forward at w: the running stats' only update
    opt.step(sam_closure(opt, net, lambda: F.mse_loss(net(x), y)))
    bn, ref_bn = net[1], ref[1]
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)


def test_arguments_are_checked():
    net = _net()
    opt = _optimizer("sam", net.parameters())
    loss = lambda: net(torch.ones(2, 4)).sum()  # noqa: E731
    with pytest.raises(TypeError, match="optimizer"):
        sam_closure(torch.optim.SGD(net.parameters(), lr=0.1), net, loss)
    with pytest.raises(TypeError, match="model"):
        sam_closure(opt, lambda x: x, loss)
    with pytest.raises(TypeError, match="compute_loss"):
        sam_closure(opt, net, 1.0)
    with pytest.raises(TypeError, match="sync_first_pass"):
        sam_closure(opt, net, loss, sync_first_pass=1)
    with pytest.raises(TypeError, match="freeze_bn"):
        sam_closure(opt, net, loss, freeze_bn=None)
    with pytest.raises(ValueError, match="optimizer.freeze_bn = False"):
        sam_closure(opt, net, loss, freeze_bn=False)  # step(closure) would freeze them anyway
    opt.freeze_bn = False
    sam_closure(opt, net, loss, freeze_bn=False)
    with pytest.raises(TypeError, match="compute_loss"):
        opt.step(sam_closure(opt, net, lambda: net(torch.ones(2, 4))))


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
