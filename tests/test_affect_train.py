"""fastsam.affect.model / train: the MLP, configs and presets, every optimizer path, BN handling,
determinism, resume and the run files, on small synthetic feature banks."""
import copy
import importlib.util
import json
import math
import types

import numpy as np
import pytest
import torch

from fastsam.affect.metrics import score
from fastsam.affect.model import AffectMLP
from fastsam.affect.tasks import AU, EXPR
from fastsam.affect.train import (OPTIMIZERS, PRESETS, TrainConfig, load_model, make_config, make_loss,
                                  make_optimizer, predict, train, train_step)

D = 16


def make_banks(task, n_train=64, n_val=32, seed=0, noise=0.5, weights=None, memmap_dir=None):
    """Train/val banks whose fp16 features are class centres (EXPR) or AU-driven directions plus noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(task.outputs, D))

    def bank(n, name):
        if task.multilabel:
            y = (rng.random((n, task.outputs)) < 0.4).astype(np.int64)
            x = (2 * y - 1) @ centres / 2
        else:
            y = rng.choice(task.outputs, size=n, p=weights).astype(np.int64)
            x = centres[y]
        x = (x + noise * rng.normal(size=(n, D))).astype(np.float16)
        if memmap_dir is not None:
            mm = np.memmap(memmap_dir / f"{name}.f16", dtype=np.float16, mode="w+", shape=x.shape)
            mm[:] = x
            mm.flush()
            x = np.memmap(memmap_dir / f"{name}.f16", dtype=np.float16, mode="r", shape=x.shape)
        return types.SimpleNamespace(features=x, labels=y, images=[f"v/{i + 1:05d}.jpg" for i in range(n)])

    return bank(n_train, "train"), bank(n_val, "val")


def _assert_plots(run):
    """loss.png and f1.png are PNG images with something drawn (matplotlib, installed by make test)."""
    image = pytest.importorskip("matplotlib.image")
    for name in ("loss.png", "f1.png"):
        pixels = image.imread(run / name)
        assert pixels.ndim == 3 and min(pixels.shape[:2]) >= 100, pixels.shape
        assert pixels.std() > 0.01  # not a blank canvas


def quiet(_line):
    pass


def small(task_name, preset="paper", **kw):
    kw.setdefault("epochs", 1)
    kw.setdefault("batch_size", 16)
    return make_config(task_name, preset, **kw)


# ---- model ---------------------------------------------------------------------------------------------
def test_mlp_structure_and_init():
    torch.manual_seed(0)
    m = AffectMLP(12)
    linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    assert [tuple(lin.weight.shape) for lin in linears] == [(768, 768)] * 3 + [(12, 768)]
    assert sum(isinstance(mod, torch.nn.BatchNorm1d) for mod in m.modules()) == 3
    assert all(mod.p == 0.6 for mod in m.modules() if isinstance(mod, torch.nn.Dropout))
    bound = math.sqrt(6 / 768)  # Kaiming uniform, fan_in, gain sqrt(2)
    for lin in linears:
        assert lin.weight.abs().max() <= bound
        assert lin.weight.abs().max() > 0.95 * bound
        assert lin.bias.abs().max() <= 1 / math.sqrt(768)  # torch's default bias init kept
    assert AffectMLP(8, in_dim=D)(torch.randn(5, D)).shape == (5, 8)
    with pytest.raises(ValueError, match="x must have shape"):
        AffectMLP(8, in_dim=D)(torch.randn(5, D + 1))
    with pytest.raises(ValueError, match="dropout"):
        AffectMLP(8, dropout=1.0)
    with pytest.raises(ValueError, match="outputs"):
        AffectMLP(0)


# ---- configs -------------------------------------------------------------------------------------------
def test_presets():
    paper = make_config("expr")
    assert (paper.alpha, paper.rho, paper.base, paper.lr, paper.weight_decay) == (0.3, 0.05, "adam", 1e-3, 0.0)
    assert (paper.batch_size, paper.epochs, paper.t_max, paper.eta_min, paper.optimizer) == (32, 32, 32, 0.0, "sam")
    authors = make_config("au", "authors")
    assert (authors.alpha, authors.rho, authors.base, authors.lr, authors.weight_decay) == (0.5, 0.5, "adamw", 1e-3,
                                                                                             1e-4)
    assert (authors.batch_size, authors.epochs, authors.t_max, authors.eta_min) == (32, 32, 8, 1e-5)
    assert make_config("expr", epochs=5).t_max == 5
    assert make_config("expr", "authors", epochs=10).t_max == 2
    assert make_config("expr", "authors", epochs=3).t_max == 1
    assert make_config("expr", "authors", epochs=10, t_max=7).t_max == 7
    assert make_config("expr", alpha=None, optimizer=None) == paper
    assert set(PRESETS) == {"paper", "authors"}
    assert TrainConfig.from_dict(json.loads(json.dumps(authors.to_dict()))) == authors


@pytest.mark.parametrize("field,value", [
    ("task", "va"), ("optimizer", "sgd"), ("base", "sgd"), ("alpha", 0.0), ("alpha", 1.5), ("rho", -0.1),
    ("epochs", 0), ("batch_size", 1), ("lr", 0.0), ("weight_decay", -1e-4), ("t_max", 0), ("eta_min", -1.0),
    ("impl", "gpu"), ("seed", -1), ("device", "tpu9"), ("interval", 0),
])
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig.from_dict(dict(make_config("expr").to_dict(), **{field: value}))


def test_config_type_and_key_errors():
    with pytest.raises(TypeError, match="epochs"):
        make_config("expr", epochs=2.0)
    with pytest.raises(TypeError, match="alpha"):
        make_config("expr", alpha=float("nan"))
    with pytest.raises(TypeError, match="unknown option"):
        make_config("expr", momentum=0.9)
    with pytest.raises(ValueError, match="preset"):
        make_config("expr", "fast")
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig.from_dict(dict(make_config("expr").to_dict(), extra=1))
    with pytest.raises(ValueError, match="interval applies to the SAM family"):
        make_config("expr", optimizer="adamw", interval=2)
    with pytest.raises(ValueError, match=r"missing \['rho'\]"):
        TrainConfig.from_dict({k: v for k, v in make_config("expr").to_dict().items() if k != "rho"})
    older = {k: v for k, v in make_config("expr").to_dict().items() if k != "interval"}  # saved before interval
    assert TrainConfig.from_dict(older).interval == 1


# ---- steps ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sam", "crsam"])
def test_bn_running_stats_come_from_the_first_pass_only(name):
    config = small("expr", optimizer=name)
    torch.manual_seed(0)
    model = AffectMLP(8, in_dim=D)
    reference = copy.deepcopy(model)
    x, y = torch.randn(16, D), torch.randint(0, 8, (16,))
    opt = make_optimizer(config, model, steps_per_epoch=1)
    before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(1)  # the same dropout masks in pass 1 of the step and in the reference's one pass
    loss = train_step(model, opt, make_loss(config), x, y)
    torch.manual_seed(1)
    reference.train()
    ref_loss = make_loss(config)(reference(x), y)
    assert torch.equal(loss, ref_loss.detach())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    buffers = dict(model.named_buffers())
    for key, ref in reference.named_buffers():
        assert torch.equal(buffers[key], ref), key
    assert all(int(b) == 1 for k, b in buffers.items() if k.endswith("num_batches_tracked"))


# ---- training runs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", [EXPR, AU], ids=["expr", "au"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_trains_and_writes_the_run(tmp_path, task, name):
    train_bank, val_bank = make_banks(task)
    config = small(task.name, optimizer=name)
    metrics = train(config, train_bank, val_bank, tmp_path, log=quiet)
    assert metrics == json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["task"] == task.name and metrics["config"] == config.to_dict()
    (epoch,) = metrics["epochs"]
    assert epoch["epoch"] == 1 and math.isfinite(epoch["train_loss"]) and epoch["lr"] == config.lr
    assert set(epoch["val_per_class"]) == set(task.names)
    assert metrics["final"] == {"val_f1": epoch["val_f1"], "per_class": epoch["val_per_class"], "epoch": 1}
    lines = (tmp_path / "log.csv").read_text().splitlines()
    assert lines[0] == "epoch,train_loss,val_f1,lr,seconds,steps_per_second" and len(lines) == 2
    assert float(lines[1].split(",")[-1]) > 0
    assert (tmp_path / "checkpoint.pt").is_file()
    if importlib.util.find_spec("matplotlib") is None:
        assert not (tmp_path / "loss.png").exists()

    model, loaded = load_model(tmp_path)
    assert loaded == config and not model.training
    if name == OPTIMIZERS[0]:
        _assert_plots(tmp_path)
    logits, pred = predict(model, val_bank.features, task.name, batch_size=7)
    assert logits.dtype == np.float32 and logits.shape == (32, task.outputs) and pred.dtype == np.int64
    assert score(task, pred, val_bank.labels)["f1"] == metrics["final"]["val_f1"]


def test_rerun_is_bit_identical(tmp_path):
    train_bank, val_bank = make_banks(AU, memmap_dir=tmp_path)
    config = small("au", "authors", epochs=2)
    for run in ("a", "b"):
        train(config, train_bank, val_bank, tmp_path / run, log=quiet)
    assert (tmp_path / "a/metrics.json").read_bytes() == (tmp_path / "b/metrics.json").read_bytes()
    a, b = (torch.load(tmp_path / run / "model.pt", weights_only=True)["state_dict"] for run in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


class Interrupt(Exception):
    pass


def interrupt_after_first_epoch(line):
    if line.startswith("epoch 1/"):
        raise Interrupt


@pytest.mark.parametrize("name,interval", [("sam", 1), ("fsam", 1), ("lastsam", 1), ("adamw", 1), ("gsam", 1),
                                           ("wsam", 3)])
def test_resume_matches_an_uninterrupted_run(tmp_path, name, interval):
    # Resuming needs the same config, so the first attempt is cut off by an exception after epoch 1.
    train_bank, val_bank = make_banks(EXPR)
    config = small("expr", "authors", optimizer=name, epochs=3, t_max=2, interval=interval)
    whole = train(config, train_bank, val_bank, tmp_path / "whole", log=quiet)
    with pytest.raises(Interrupt):
        train(config, train_bank, val_bank, tmp_path / "cut", log=interrupt_after_first_epoch)
    assert len(json.loads((tmp_path / "cut/metrics.json").read_text())["epochs"]) == 1
    lines = []
    resumed = train(config, train_bank, val_bank, tmp_path / "cut", log=lines.append)
    assert lines[0].startswith("resuming") and len(lines) == 3
    assert resumed == whole
    assert (tmp_path / "cut/metrics.json").read_bytes() == (tmp_path / "whole/metrics.json").read_bytes()


def test_finished_run_returns_its_metrics_and_other_configs_are_refused(tmp_path):
    train_bank, val_bank = make_banks(EXPR)
    config = small("expr")
    first = train(config, train_bank, val_bank, tmp_path, log=quiet)
    lines = []
    assert train(config, train_bank, val_bank, tmp_path, log=lines.append) == first
    assert lines == []
    with pytest.raises(ValueError, match="another --out"):
        train(small("expr", epochs=2), train_bank, val_bank, tmp_path, log=quiet)


def test_bad_inputs(tmp_path):
    train_bank, val_bank = make_banks(EXPR)
    au_train, _ = make_banks(AU)
    with pytest.raises(ValueError, match="train_bank.labels"):
        train(small("expr"), au_train, val_bank, tmp_path, log=quiet)
    with pytest.raises(TypeError, match="images"):
        train(small("expr"), types.SimpleNamespace(features=train_bank.features, labels=train_bank.labels),
              val_bank, tmp_path, log=quiet)
    with pytest.raises(FileNotFoundError, match="model.pt"):
        load_model(tmp_path / "nothing")


def test_cuda_graph_refusals(tmp_path):
    # Refused before anything is written: a device other than CUDA, LastSAM (its phase is picked on the host),
    # a non-bool. (Capture and replay themselves: tests/test_cuda_graphs.py, on a GPU.)
    train_bank, val_bank = make_banks(EXPR)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device .*'cpu'"):
        train(small("expr"), train_bank, val_bank, run, log=quiet, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph: optimizer 'lastsam'"):
        train(small("expr", optimizer="lastsam", device="cuda"), train_bank, val_bank, run, log=quiet,
              cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph: optimizer 'looksam'"):
        train(small("expr", optimizer="looksam", device="cuda"), train_bank, val_bank, run, log=quiet,
              cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph: interval=2"):
        train(small("expr", interval=2, device="cuda"), train_bank, val_bank, run, log=quiet, cuda_graph=True)
    with pytest.raises(TypeError, match="cuda_graph must be a bool"):
        train(small("expr"), train_bank, val_bank, run, log=quiet, cuda_graph=1)
    assert not run.exists()


def test_paper_preset_beats_the_majority_class(tmp_path):
    weights = [0.4, 0.1, 0.05, 0.05, 0.15, 0.1, 0.1, 0.05]  # imbalanced, as EXPR is
    train_bank, val_bank = make_banks(EXPR, n_train=384, n_val=256, noise=0.8, weights=weights)
    majority = np.full(256, np.bincount(train_bank.labels).argmax())
    baseline = score(EXPR, majority, val_bank.labels)["f1"]
    metrics = train(make_config("expr", epochs=4), train_bank, val_bank, tmp_path, log=quiet)
    assert metrics["final"]["val_f1"] > baseline + 0.3
