"""fastsam optimizers on FSDP2 (``fully_shard``) parameters: 2 CPU processes (gloo) against one process.

Run as a script, this file is one rank (``python test_fsdp.py PHASE RANK INIT_FILE OUT [CKPT]``): PHASE
"train" trains every configuration of JOBS on a sharded model and saves the full parameters after the last
step, counts the collectives of the optimizer's own steps, and writes a distributed checkpoint (DCP) at step
5; PHASE "resume" builds fresh ranks, loads that checkpoint and trains on to step 10. The tests compare the
ranks with each other and with the same optimizer trained in this process without sharding, on a loss
that averages the ranks' losses as FSDP averages their grads (each rank's BatchNorm keeps its own batch
statistics, so the reference runs the model on each rank's batch apart). The m-sharpness runs (each rank
perturbs with its own batch's grad) are compared with a single-process simulation in plain torch.
"""
import math
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
STEPS = 10
SAVE_AT = 5
METHODS = {
    "sam": (fastsam.SAM, dict(rho=0.5)),
    "sam_inf": (fastsam.SAM, dict(rho=0.02, p=math.inf)),
    "sam_adaptive": (fastsam.SAM, dict(rho=0.5, adaptive=True)),
    "asam": (fastsam.ASAM, dict(rho=0.5)),
    "asam_filterwise": (fastsam.ASAM, dict(rho=0.5, normalization="filterwise")),
    "fsam": (fastsam.FriendlySAM, dict(rho=0.5)),
    "crsam": (fastsam.CRSAM, dict(rho=0.5)),
    "crsam_paper": (fastsam.CRSAM, dict(rho=0.5, mode="paper", gamma=1e-3, beta=1e-3)),
    "lastsam": (fastsam.LastSAM, dict(switch_at=3, sharpness="sam", rho=0.5)),
    "lastsam_orthogonal": (fastsam.LastSAM, dict(switch_at=3, sharpness="asam", orthogonal=True)),
    "gsam": (fastsam.GSAM, dict(rho=0.5)),
    "wsam": (fastsam.WSAM, dict(rho=0.5, max_norm=1.0)),
    "sam_interval": (fastsam.SAM, dict(rho=0.5, interval=3)),
    "looksam": (fastsam.LookSAM, dict(rho=0.5, k=3)),
}
BASES = {"sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
         "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.01))}
# (method, base, variant), the variant's words: "" plain; "keep" reshard_after_forward=False; "accumulate" two
# micro-batches per pass under set_requires_gradient_sync(False); "bf16" MixedPrecisionPolicy(bf16 params,
# fp32 reduce); "closure" the closure of fastsam.distributed.sam_closure; "m-sharpness" that closure with
# sync_first_pass=False (each rank perturbs its full w with its own batch's grad); "nan": a NaN in one input of
# rank 1 at step NAN_STEP, under nonfinite="skip"; "explicit": first_step/second_step around the closure's passes.
PER_RANK = ["sam", "sam_inf", "sam_adaptive", "asam", "asam_filterwise", "fsam", "lastsam"]  # m-sharpness per rank
JOBS = ([(m, b, "") for m in METHODS for b in BASES]
        + [("sam", "sgd", "keep"), ("lastsam_orthogonal", "adamw", "keep"), ("sam", "adamw", "accumulate"),
           ("crsam", "sgd", "accumulate"), ("sam", "sgd", "bf16"), ("sam", "sgd", "closure"),
           ("crsam_paper", "adamw", "closure")]
        + [(m, b, "m-sharpness") for m in PER_RANK for b in BASES]
        + [("sam", "adamw", "m-sharpness keep"), ("asam_filterwise", "sgd", "m-sharpness keep"),
           ("sam", "sgd", "m-sharpness bf16"), ("sam", "adamw", "m-sharpness nan"),
           ("asam", "sgd", "m-sharpness explicit")]
        # their update uses the pass at w, which stays synced (as under DDP): the plain result
        + [(m, b, "m-sharpness") for m in ("crsam", "crsam_paper", "lastsam_orthogonal", "gsam", "wsam", "looksam")
           for b in BASES])
# The checkpointed runs: the method's own state (EMA, step counter across the switch) must survive DCP.
CHECKPOINTED = [("sam", "adamw", ""), ("fsam", "sgd", ""), ("lastsam_orthogonal", "sgd", ""),
                ("asam", "adamw", "m-sharpness"), ("fsam", "adamw", "m-sharpness"),
                ("looksam", "sgd", "")]  # its g_v, kept at step 3, is used by steps 5 (after the load) and 7
CHECKPOINT_SWITCH = 7  # LastSAM switches after the checkpoint: a lost steps_done would delay it
COUNTED = ["sam", "sam_inf", "asam_filterwise", "fsam", "crsam", "crsam_paper", "lastsam_orthogonal", "sam_skip"]


def _net() -> torch.nn.Module:
    """A conv layer (3 filters over 2 ranks: 2 and 1), BatchNorm and Linear layers; the last layer has
    one output row, so rank 1 holds empty shards of it. No bias (nor BatchNorm shift) right before a
    BatchNorm: its grad would be rounding noise, which Adam scales up to full steps."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, bias=False), torch.nn.BatchNorm2d(3), torch.nn.Tanh(),
                               torch.nn.Flatten(), torch.nn.Linear(48, 6, bias=False), torch.nn.BatchNorm1d(6),
                               torch.nn.Tanh(), torch.nn.Linear(6, 1))


NAN_STEP = 3


def _batch(step: int, rank: int, nan: bool = False):
    """(x [8, 2, 6, 6], y [8, 1]) fp32: rank ``rank``'s batch of step ``step``; the ranks' batches differ.
    ``nan``: one NaN in rank 1's x at step NAN_STEP."""
    g = torch.Generator().manual_seed(100 * step + rank)
    x, y = torch.randn(8, 2, 6, 6, generator=g) + rank, torch.randn(8, 1, generator=g)
    if nan and step == NAN_STEP and rank == 1:
        x[0, 0, 0, 0] = float("nan")
    return x, y


def _optimizer(method: str, base: str, model, switch_at=None, variant: str = ""):
    cls, options = METHODS[method]
    base_cls, base_options = BASES[base]
    options = dict(options, switch_at=switch_at) if switch_at is not None else options
    if "nan" in variant.split():
        options = dict(options, nonfinite="skip")
    if cls is fastsam.FriendlySAM and "m-sharpness" in variant.split():
        options = dict(options, per_rank_ema=True)
    return cls(model.named_parameters(), base_cls, **options, **base_options)


def _train_step(opt, model, losses, variant: str = "") -> None:
    """One step through ``step(closure)``; ``losses()`` gives the micro-batch losses of one pass."""
    words = variant.split()
    if "explicit" in words:  # the closure as the forward + backward of an explicit loop
        closure = sam_closure(opt, model, lambda: losses()[0], sync_first_pass="m-sharpness" not in words)
        closure()
        opt.first_step(zero_grad=True)
        closure()
        opt.second_step(zero_grad=True)
        return
    if "closure" in words or "m-sharpness" in words:
        opt.step(sam_closure(opt, model, lambda: losses()[0], sync_first_pass="m-sharpness" not in words))
        opt.zero_grad()
        return

    def closure():
        parts = losses()
        for i, loss in enumerate(parts):
            last = i == len(parts) - 1
            if variant == "accumulate":
                model.set_requires_gradient_sync(last)
            (loss / len(parts)).backward()
        return sum(p.detach() for p in parts) / len(parts)
    opt.step(closure)
    opt.zero_grad()


# ---- one rank of the FSDP2 job ---------------------------------------------------------------------
def _sharded(variant: str = ""):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    model = _net()
    options = {}
    if "keep" in variant.split():
        options["reshard_after_forward"] = False
    for layer in model:
        if any(True for _ in layer.parameters()):
            # BatchNorm stays fp32 under mixed precision, as usual (its running statistics are fp32)
            bf16 = "bf16" in variant.split() and not isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
            fully_shard(layer, **options, **({"mp_policy": mp} if mp else {}))
    fully_shard(model, **options)
    return model


def _rank_losses(model, step: int, rank: int, variant: str):
    x, y = _batch(step, rank, "nan" in variant.split())
    if variant == "accumulate":
        return lambda: [F.mse_loss(model(x[:4]), y[:4]), F.mse_loss(model(x[4:]), y[4:])]
    return lambda: [F.mse_loss(model(x), y)]


def _full(model):
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def _count_collectives(method: str, rank: int) -> list:
    """The collectives each explicit call of a step issues (forward and backward passes not counted)."""
    from torch.distributed.tensor.debug import CommDebugMode
    model = _sharded()
    name = "sam" if method == "sam_skip" else method
    cls, options = METHODS[name]
    kwargs = dict(options, nonfinite="skip") if method == "sam_skip" else dict(options)
    if cls is fastsam.LastSAM:
        kwargs["switch_at"] = 0
    opt = cls(model.named_parameters(), torch.optim.SGD, **kwargs, lr=0.05, momentum=0.9)
    x, y = _batch(0, rank)
    calls = ["first_step", "second_step"] + (["third_step"] if cls is fastsam.CRSAM else [])
    counts, losses = [], []
    for i, call in enumerate(calls):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        losses.append(loss)
        call_kwargs = {"losses": losses} if call == "third_step" and "paper" in method else {}
        with CommDebugMode() as comm:
            getattr(opt, call)(zero_grad=True, **call_kwargs)
        counts.append({str(k): v for k, v in comm.get_comm_counts().items()})
    return counts


def _count_step_collectives(rank: int, sync_first_pass: bool) -> dict:
    """The collectives of a whole SAM step through sam_closure (forward and backward passes included), by
    c10d op name. (CommDebugMode's module tracker fails on a step's several forward passes.)"""
    from collections import Counter
    from torch.utils._python_dispatch import TorchDispatchMode

    class Collectives(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "c10d":
                self.counts[func.__name__.split(".")[0]] += 1
            return func(*args, **(kwargs or {}))
    model = _sharded()
    opt = _optimizer("sam", "sgd", model)
    x, y = _batch(0, rank)
    with Collectives() as seen:
        opt.step(sam_closure(opt, model, lambda: F.mse_loss(model(x), y), sync_first_pass=sync_first_pass))
    return dict(seen.counts)


def _m_sharpness_refusals() -> dict:
    """The ValueError of sam_closure(..., sync_first_pass=False) where m-sharpness under FSDP2 is not made."""
    errors = {}
    for method in ("fsam", "stray parameter", "per-rank EMA synced"):
        model = _sharded()
        if method == "per-rank EMA synced":
            opt = _optimizer("fsam", "sgd", model, variant="m-sharpness")
            try:
                sam_closure(opt, model, lambda: None, sync_first_pass=True)
            except ValueError as e:
                errors[method] = str(e)
            x, y = _batch(0, dist.get_rank())
            try:
                opt.step(lambda: F.mse_loss(model(x), y).backward())
            except RuntimeError as e:
                errors["per-rank EMA, plain step"] = str(e)
            try:
                opt.load_state_dict(_optimizer("fsam", "sgd", model).state_dict())
            except ValueError as e:
                errors["per-rank EMA, other layout"] = str(e)
            continue
        if method == "stray parameter":
            opt = fastsam.SAM(list(model.parameters()) + [torch.nn.Parameter(torch.zeros(5))], torch.optim.SGD,
                              lr=0.1)
        else:
            opt = _optimizer(method, "sgd", model)
        try:
            sam_closure(opt, model, lambda: None, sync_first_pass=False)
        except ValueError as e:
            errors[method] = str(e)
    # davda54's style: the caller's own backward pass at w, which FSDP reduce-scattered, then step(closure)
    model = _sharded()
    opt = _optimizer("sam", "sgd", model)
    x, y = _batch(0, dist.get_rank())
    before = _full(model)
    F.mse_loss(model(x), y).backward()
    try:
        opt.step(sam_closure(opt, model, lambda: F.mse_loss(model(x), y), sync_first_pass=False))
    except RuntimeError as e:
        errors["pass at w outside"] = str(e)
    errors["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, _full(model)))
    return errors


def _record_fused_updates(seen: set) -> None:
    """Records (base kind, type of the state keys) of every fused restore + update call of this process."""
    from fastsam.optim import _fused_update
    fused = _fused_update.restore_and_update

    def recorded(kind, base, bucket, *args, **kwargs):
        seen.add((kind, type(bucket.keys()[0]).__name__))
        return fused(kind, base, bucket, *args, **kwargs)
    _fused_update.restore_and_update = recorded


def _train_phase(rank: int, ckpt: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    results = {"fused updates": set()}
    _record_fused_updates(results["fused updates"])
    for method, base, variant in JOBS:
        model = _sharded(variant)
        opt = _optimizer(method, base, model, variant=variant)
        for step in range(STEPS):
            _train_step(opt, model, _rank_losses(model, step, rank, variant), variant)
        results["train", method, base, variant] = _full(model)
    for method, base, variant in CHECKPOINTED:
        model = _sharded()
        opt = _optimizer(method, base, model, CHECKPOINT_SWITCH if method.startswith("lastsam") else None, variant)
        for step in range(STEPS):
            if step == SAVE_AT:
                dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                         checkpoint_id=os.path.join(ckpt, f"{method}-{base}-{variant}"))
            _train_step(opt, model, _rank_losses(model, step, rank, ""), variant)
        results["straight", method, base, variant] = _full(model)
    for method in COUNTED:
        results["collectives", method] = _count_collectives(method, rank)
    results["m-sharpness refused"] = _m_sharpness_refusals()
    results["step collectives"] = {sync: _count_step_collectives(rank, sync) for sync in (True, False)}
    results["placement errors"] = _placement_errors()
    results["scaler"] = _train_with_scaler(rank)
    return results


SCALER_SKIP = 2  # the step whose last pass gets an inf in one element of rank 1's shard


def _train_with_scaler(rank: int):
    """SAM + SGD with torch.amp.GradScaler (the explicit loop of the README), on sharded parameters; at step
    SCALER_SKIP one grad element of rank 1's shard only is inf. (full parameters, skipped steps, last scale)."""
    model = _sharded()
    opt = _optimizer("sam", "sgd", model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for step in range(STEPS // 2):
        x, y = _batch(step, rank)
        scaler.scale(F.mse_loss(model(x), y)).backward()
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        scaler.scale(F.mse_loss(model(x), y)).backward()
        if step == SCALER_SKIP and rank == 1:
            model[4].weight.grad.to_local().view(-1)[0] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    return _full(model), opt.skipped_steps, scaler.get_scale()


def _placement_errors() -> dict:
    """The ValueError of a first step on DTensor parameters whose placement the optimizer cannot step."""
    from torch.distributed.tensor import Partial, Shard, distribute_tensor, init_device_mesh
    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)
    cases = {"filterwise, sharded on dim 1": (distribute_tensor(torch.randn(4, 4, 3, 3), mesh, [Shard(1)]),
                                              dict(normalization="filterwise")),
             "partial": (torch.distributed.tensor.DTensor.from_local(torch.randn(4, 3), mesh, [Partial()]), {})}
    errors = {}
    for case, (tensor, options) in cases.items():
        weight = torch.nn.Parameter(tensor)
        weight.grad = tensor.detach().clone()
        opt = fastsam.ASAM([("conv.weight", weight)], torch.optim.SGD, lr=0.1, **options)
        try:
            opt.first_step()
        except ValueError as e:
            errors[case] = str(e)
    return errors


def _resume_phase(rank: int, ckpt: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    results = {}
    for method, base, variant in CHECKPOINTED:
        model = _sharded()
        opt = _optimizer(method, base, model, CHECKPOINT_SWITCH if method.startswith("lastsam") else None, variant)
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=os.path.join(ckpt, f"{method}-{base}-{variant}"))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        for step in range(SAVE_AT, STEPS):
            _train_step(opt, model, _rank_losses(model, step, rank, ""), variant)
        results["resumed", method, base, variant] = _full(model)
    return results


def _rank_main(phase: str, rank: int, init_file: str, out: str, ckpt: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = (_train_phase if phase == "train" else _resume_phase)(rank, ckpt)
    torch.save(results, out)
    dist.destroy_process_group()


# ---- the single-process reference -------------------------------------------------------------------
def _reference(method: str, base: str, variant: str = "", steps: int = STEPS, switch_at=None):
    """The same training without sharding: the loss of a pass is the mean of the ranks' losses, each on its
    own batch (each micro-batch's under "accumulate")."""
    model = _net()
    opt = _optimizer(method, base, model, switch_at)
    for step in range(steps):
        per_rank = [_rank_losses(model, step, r, variant) for r in range(WORLD)]
        _train_step(opt, model, lambda: [sum(parts) / WORLD for parts in zip(*(f() for f in per_rank))])
    return [p.detach().clone() for p in model.parameters()]


def _perturbation(method: str, names, w, g):
    """One rank's e at parameters ``w`` from its own grads ``g`` (lists like net.parameters()), written out from
    the methods' formulas: e = rho T^2 g / (||T g|| + eps) over all parameters, or rho T sign(g) for p = inf."""
    rho = METHODS[method][1]["rho"]
    method = "sam" if method in ("lastsam", "fsam") else method  # LastSAM's sharpness="sam"; F-SAM: g is d
    if method == "sam_inf":
        return [rho * torch.sign(t) for t in g]
    if method.startswith("asam"):  # T = |w| + eta (filter norms + eta for conv weights) on weights, 1 elsewhere
        eta, eps = 0.01, 1e-16

        def t_of(name, p):
            if "weight" not in name:
                return torch.ones_like(p)
            if method == "asam_filterwise" and p.dim() >= 3:
                return torch.linalg.vector_norm(p.flatten(1), dim=1).reshape(-1, *[1] * (p.dim() - 1)) + eta + 0 * p
            return p.abs() + eta
        ts = [t_of(n, p) for n, p in zip(names, w)]
    else:
        eps = 1e-12
        ts = [p.abs() if method == "sam_adaptive" else torch.ones_like(p) for p in w]
    norm = torch.linalg.vector_norm(torch.cat([(t * d).flatten() for t, d in zip(ts, g)]))
    return [rho * t * t * d / (norm + eps) for t, d in zip(ts, g)]


def _m_sharpness_reference(method: str, base: str, steps: int = STEPS, nan: bool = False):
    """m-sharpness in one process: each rank's grad at w gives its own e; the base optimizer steps with the
    mean over ranks of each rank's grad at its own w + e (FSDP's reduce-scatter of the later pass); a step
    whose grads are not finite is skipped (``nan``: the batches of the "nan" variant)."""
    net = _net()
    names = [n for n, _ in net.named_parameters()]
    leaves = [p.detach().clone().requires_grad_() for p in net.parameters()]
    base_cls, base_options = BASES[base]
    opt = base_cls(leaves, **base_options)

    def grads(w, step, rank):
        w = [t.detach().requires_grad_() for t in w]
        x, y = _batch(step, rank, nan)
        return torch.autograd.grad(F.mse_loss(torch.func.functional_call(net, dict(zip(names, w)), (x,)), y), w)
    ema = [None] * WORLD  # Friendly SAM: each rank's EMA of its own grads at w
    for step in range(steps):
        w = [t.detach() for t in leaves]
        later = []
        for rank in range(WORLD):
            if step < METHODS[method][1].get("switch_at", 0):  # LastSAM before its switch: the base step alone
                later.append(grads(w, step, rank))
                continue
            g = grads(w, step, rank)
            if method == "fsam":  # d = g - sigma m (d = g at the first step), m <- lmbda m + (1 - lmbda) g
                sigma, lmbda = 1.0, 0.9
                d = g if ema[rank] is None else [t - sigma * m for t, m in zip(g, ema[rank])]
                ema[rank] = list(g) if ema[rank] is None else [lmbda * m + (1 - lmbda) * t for m, t in zip(ema[rank], g)]
                g = d
            e = _perturbation(method, names, w, g)
            later.append(grads([p + d for p, d in zip(w, e)], step, rank))
        for leaf, per_rank in zip(leaves, zip(*later)):
            leaf.grad = sum(per_rank) / WORLD
        if all(leaf.grad.isfinite().all() for leaf in leaves):
            opt.step()
    return [t.detach().clone() for t in leaves]


def _expected(method: str, base: str, variant: str):
    if "m-sharpness" in variant.split() and method in PER_RANK:
        return _m_sharpness_reference(method, base, nan="nan" in variant.split())
    return _reference(method, base, variant)


def _launch(phase: str, tmp: Path) -> list:
    init = tmp / f"init-{phase}"
    procs, outs = [], []
    for rank in range(WORLD):
        outs.append(tmp / f"{phase}-{rank}.pt")
        procs.append(subprocess.Popen([sys.executable, __file__, phase, str(rank), str(init), str(outs[-1]),
                                       str(tmp / "ckpt")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, env=dict(os.environ, OMP_NUM_THREADS="1")))
    logs = [p.communicate(timeout=240)[0] for p in procs]
    failed = [f"rank {r}:\n{log[-3000:]}" for r, (p, log) in enumerate(zip(procs, logs)) if p.returncode]
    assert not failed, "\n".join(failed)
    return [torch.load(o, weights_only=False) for o in outs]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    trained = _launch("train", tmp)
    resumed = _launch("resume", tmp)
    return [{**t, **r} for t, r in zip(trained, resumed)]


def _assert_close(actual, expected, rtol=1e-5, atol=1e-6):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


@pytest.mark.parametrize("method,base,variant", [j for j in JOBS if "bf16" not in j[2].split()])
def test_sharded_training_equals_one_process(ranks, method, base, variant):
    key = ("train", method, base, variant)
    _assert_close(ranks[1][key], ranks[0][key], rtol=0, atol=0)  # every rank holds the same parameters
    # Accumulated micro-batch grads are summed in another order than the reference's single backward, and
    # CR-SAM's finite differences (g+ + g- - 2 g0) scale that rounding up: atol 1e-5 there.
    _assert_close(ranks[0][key], _expected(method, base, variant), atol=1e-5 if variant == "accumulate" else 1e-6)


@pytest.mark.parametrize("variant", ["bf16", "m-sharpness bf16"])
def test_mixed_precision_follows_fp32_to_bf16_rounding(ranks, variant):
    key = ("train", "sam", "sgd", variant)
    _assert_close(ranks[1][key], ranks[0][key], rtol=0, atol=0)
    _assert_close(ranks[0][key], _expected("sam", "sgd", variant), rtol=5e-2, atol=5e-3)


def test_m_sharpness_is_per_rank(ranks):
    """The per-rank perturbation differs from the synced one enough for the comparisons above to tell them
    apart (the ranks' batches differ)."""
    per_rank, synced = ranks[0]["train", "sam", "sgd", "m-sharpness"], ranks[0]["train", "sam", "sgd", ""]
    assert max((a - b).abs().max().item() for a, b in zip(per_rank, synced)) > 1e-3


@pytest.mark.parametrize("method,base,variant", CHECKPOINTED)
def test_dcp_checkpoint_resumes_exactly(ranks, method, base, variant):
    key = (method, base, variant)
    for rank in ranks:
        _assert_close(rank[("resumed",) + key], rank[("straight",) + key], rtol=0, atol=0)
    switch = CHECKPOINT_SWITCH if method.startswith("lastsam") else None
    expected = _expected(method, base, variant) if variant else _reference(method, base, switch_at=switch)
    _assert_close(ranks[0][("straight",) + key], expected)


# Per explicit call (first_step, second_step[, third_step]): the all-reduces a step adds, each of an fp32
# tensor of one or two elements: one per global reduction.
EXPECTED_ALL_REDUCES = {
    "sam": [1, 0],  # the norm
    "sam_inf": [0, 0],  # sign(g): no reduction
    "asam_filterwise": [1, 0],  # the filter norms stay on their rank
    "fsam": [1, 0],
    "crsam": [1, 0, 0],
    "crsam_paper": [1, 0, 1],  # + the three losses, averaged over the ranks
    "lastsam_orthogonal": [1, 1],  # + the dot product and the norm of g, one reduction
    "sam_skip": [1, 1],  # the norm carries the found flag of pass 1 (the other grads add to it: same call);
                         # the check of pass 2
}


def test_grad_scaler_skips_on_every_rank(ranks):
    """An inf in one rank's shard skips the step on every rank, and both scalers back off alike; the other
    steps equal unscaled training in one process (power-of-two scales unscale exactly)."""
    (params0, skipped0, scale0), (params1, skipped1, scale1) = (r["scaler"] for r in ranks)
    assert skipped0 == skipped1 == 1 and scale0 == scale1 == 512.0
    _assert_close(params1, params0, rtol=0, atol=0)
    model = _net()
    opt = _optimizer("sam", "sgd", model)
    for step in range(STEPS // 2):
        if step != SCALER_SKIP:
            _train_step(opt, model, lambda: [sum(F.mse_loss(model(x), y) for x, y in
                                                 (_batch(step, r) for r in range(WORLD))) / WORLD])
    _assert_close(params0, [p.detach() for p in model.parameters()])


def test_the_update_stays_fused_on_dtensors(ranks):
    assert {("sgd", "DTensor"), ("adam", "DTensor")} <= ranks[0]["fused updates"]


def test_m_sharpness_refusals_name_the_reason(ranks):
    errors = ranks[0]["m-sharpness refused"]
    assert "FriendlySAM(..., per_rank_ema=True)" in errors["fsam"]
    assert "is for m-sharpness under FSDP2" in errors["per-rank EMA synced"]
    assert "step with opt.step(fastsam.distributed.sam_closure(" in errors["per-rank EMA, plain step"]
    assert "saved by 'FriendlySAM'" in errors["per-rank EMA, other layout"]
    assert "1 other parameter(s) (shapes [(5,)]" in errors["stray parameter"]
    assert "the pass at w of this step did not run through the closure" in errors["pass at w outside"]
    assert errors["unchanged"]  # the step was abandoned with w restored


def test_m_sharpness_saves_a_reduce_scatter_per_group_and_the_norm(ranks):
    """A whole step: the synced pass at w reduce-scatters (one per FSDP parameter group: 5 here) and the
    norm is all-reduced; the per-rank pass at w does neither. The later pass reduce-scatters in both, and
    both all-gather alike (forward, and backward after resharding)."""
    for rank in ranks:
        synced, per_rank = rank["step collectives"][True], rank["step collectives"][False]
        assert synced["_allgather_base_"] == per_rank["_allgather_base_"] == 20
        scatters = {mode: sum(v for k, v in c.items() if "reduce_scatter" in k) for mode, c in
                    (("synced", synced), ("per rank", per_rank))}
        all_reduces = {mode: sum(v for k, v in c.items() if "allreduce" in k) for mode, c in
                       (("synced", synced), ("per rank", per_rank))}
        assert scatters == {"synced": 10, "per rank": 5}, (synced, per_rank)
        assert all_reduces == {"synced": 1, "per rank": 0}, (synced, per_rank)


def test_placements_that_cannot_be_stepped_raise(ranks):
    errors = ranks[0]["placement errors"]
    assert "each filter (a slice along dim 0) on one rank" in errors["filterwise, sharded on dim 1"]
    assert "sharded (Shard) or replicated (Replicate)" in errors["partial"]


@pytest.mark.parametrize("method", COUNTED)
def test_collectives_per_step(ranks, method):
    for rank in ranks:
        counts = rank["collectives", method]
        all_reduces = [sum(v for k, v in c.items() if "allreduce" in k) for c in counts]
        assert all_reduces == EXPECTED_ALL_REDUCES[method], counts
        assert all(all(("allreduce" in k) for k in c) for c in counts), counts  # no other collective


# ---- torch.distributed.checkpoint's state initialisation, in one process ---------------------------
def _state_of(opt):
    """Everything a step reads: the base optimizer's state, the method's saved buffers and counters."""
    import copy
    return copy.deepcopy((opt.base_optimizer.state_dict(), opt.state_dict()))


def _assert_same_state(a, b):
    flat_a, flat_b = torch.utils._pytree.tree_flatten(a)[0], torch.utils._pytree.tree_flatten(b)[0]
    assert len(flat_a) == len(flat_b)
    for x, y in zip(flat_a, flat_b):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def _trained(method: str, base: str, steps: int, switch_at=None):
    model = _net()
    opt = _optimizer(method, base, model, switch_at)
    for step in range(steps):
        _train_step(opt, model, _rank_losses(model, step, 0, ""))
    return model, opt


@pytest.mark.parametrize("method,base,reload", [("lastsam", "sgd", False), ("sam", "adamw", True),
                                                ("crsam", "sgd", True)])
def test_dcp_state_initialisation_changes_nothing(method, base, reload):
    """get_optimizer_state_dict calls step() with lr 0 and zero grads when the optimizer's own .state is empty:
    LastSAM before its switch, or any method after load_state_dict. The base optimizer's momentum and step
    counts, the method's state and LastSAM's step count stay as they were, and training goes on identically."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    model, opt = _trained(method, base, 2, switch_at=5 if method == "lastsam" else None)
    if reload:
        opt.load_state_dict(opt.state_dict())
    assert not opt.state  # what makes torch's helper run its dummy step
    before = _state_of(opt)
    saved = get_optimizer_state_dict(model, opt)
    _assert_same_state(_state_of(opt), before)
    assert set(saved["state"]) == {n for n, _ in model.named_parameters()}
    for step in range(2, 4):
        _train_step(opt, model, _rank_losses(model, step, 0, ""))
    straight, _ = _trained(method, base, 4, switch_at=5 if method == "lastsam" else None)
    _assert_close(list(model.parameters()), list(straight.parameters()), rtol=0, atol=0)


def test_dcp_template_of_a_fresh_optimizer_keeps_its_first_step():
    """A fresh Friendly SAM asked for its state dict (DCP makes its state first: base state, zero EMA) still
    takes its first step as a new optimizer (m = g), so it trains as if never asked."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    model = _net()
    opt = _optimizer("fsam", "sgd", model)
    saved = get_optimizer_state_dict(model, opt)
    assert all("fastsam_ema" in s and "momentum_buffer" in s for s in saved["state"].values())
    for step in range(3):
        _train_step(opt, model, _rank_losses(model, step, 0, ""))
    straight, _ = _trained("fsam", "sgd", 3)
    _assert_close(list(model.parameters()), list(straight.parameters()), rtol=0, atol=0)


def test_per_rank_ema_needs_sharded_parameters():
    with pytest.raises(ValueError, match="per_rank_ema=True is for FSDP2 parameters"):
        fastsam.FriendlySAM(_net().parameters(), torch.optim.SGD, lr=0.1, per_rank_ema=True)
    with pytest.raises(TypeError, match="per_rank_ema must be a bool"):
        fastsam.FriendlySAM(_net().parameters(), torch.optim.SGD, lr=0.1, per_rank_ema=1)


def test_step_without_closure_still_raises():
    model = _net()
    opt = _optimizer("sam", "sgd", model)
    F.mse_loss(model(_batch(0, 0)[0]), _batch(0, 0)[1]).backward()
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()  # lr is not 0: not a checkpoint's state initialisation
    for group in opt.param_groups:
        group["lr"] = 0.0
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()  # lr 0, but the grads are not zero


if __name__ == "__main__":
    _rank_main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
