"""Trains the affect MLP on precomputed features with a CVaR loss and a SAM-family optimizer.

A run lives in one folder (``out_dir``): ``log.csv``, ``metrics.json``, ``model.pt`` (the model after the
latest epoch), ``checkpoint.pt`` and, when matplotlib is importable, ``loss.png`` and ``f1.png``. Every
file is written atomically after each epoch, ``checkpoint.pt`` last: it marks the epoch as done.

Resuming: calling :func:`train` again with the *same* config and ``out_dir`` continues after the last
finished epoch (e.g. after a crash or Ctrl-C) and ends with the same metrics, bit for bit on the CPU,
as an uninterrupted run: model, optimizer, scheduler, the global torch RNG (dropout) and the shuffling
generator are all restored. Extending a run (a larger ``epochs``) is *not* a resume: it changes the
cosine schedule, so it is refused like any other config change; pick another ``out_dir``.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Callable, Iterator, Tuple

import numpy as np
import torch

import fastsam
from fastsam.losses import cvar_bce_with_logits, cvar_cross_entropy
from fastsam.ops import check_impl
from fastsam.distributed import sam_closure

from .graphed import GraphedStep, check_cuda_graph
from .metrics import score_from_counts
from .model import AffectMLP
from .tasks import TASKS, Task, get_task

OPTIMIZERS = ("sam", "asam", "fsam", "crsam", "gsam", "wsam", "looksam", "lastsam", "adam", "adamw")
BASES = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
_SAM_FAMILY = {"sam": fastsam.SAM, "asam": fastsam.ASAM, "fsam": fastsam.FriendlySAM, "crsam": fastsam.CRSAM,
               "gsam": fastsam.GSAM, "wsam": fastsam.WSAM}

# Everything but the task and the scheduler's T_max, which follows the final epoch count (_T_MAX_DIVISOR).
PRESETS = {
    "paper": dict(optimizer="sam", alpha=0.3, rho=0.05, epochs=32, batch_size=32, lr=1e-3, weight_decay=0.0,
                  base="adam", eta_min=0.0, impl="auto", seed=0, device="cpu"),
    "authors": dict(optimizer="sam", alpha=0.5, rho=0.5, epochs=32, batch_size=32, lr=1e-3, weight_decay=1e-4,
                    base="adamw", eta_min=1e-5, impl="auto", seed=0, device="cpu"),
}
_T_MAX_DIVISOR = {"paper": 1, "authors": 4}  # T_max = max(1, epochs // divisor)


def _number(name: str, value, low: float, low_open: bool, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or value > high:
        raise ValueError(f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {value}")
    return float(value)


def _integer(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _choice(name: str, value, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {sorted(allowed)}, got {value!r}")
    return value


@dataclass
class TrainConfig:
    """Everything a run depends on besides the data. All fields are checked on construction.

    ``base`` is the base optimizer of the SAM family (ignored by the plain "adam"/"adamw" choices) and
    ``rho`` its radius; ``t_max`` (epochs) and ``eta_min`` configure CosineAnnealingLR, stepped once per
    epoch; ``impl`` goes to the optimizer and the loss; ``interval``: the SAM family's step on every
    ``interval``-th step, the base optimizer's one-pass step between (default 1: every step; must be 1 for
    the plain "adam"/"adamw" choices). For "looksam" it is LookSAM's k, its SAM steps' interval, and 1 takes
    LookSAM's default k = 5.
    """

    task: str
    optimizer: str
    alpha: float
    rho: float
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    base: str
    t_max: int
    eta_min: float
    impl: str
    seed: int
    device: str
    interval: int = 1  # last, with a default: configs saved before it existed load as interval 1

    def __post_init__(self):
        _choice("task", self.task, TASKS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("base", self.base, BASES)
        self.alpha = _number("alpha", self.alpha, 0.0, True, 1.0)
        self.rho = _number("rho", self.rho, 0.0, False)
        self.epochs = _integer("epochs", self.epochs, 1)
        self.batch_size = _integer("batch_size", self.batch_size, 2)  # BatchNorm needs 2 rows
        self.lr = _number("lr", self.lr, 0.0, True)
        self.weight_decay = _number("weight_decay", self.weight_decay, 0.0, False)
        self.t_max = _integer("t_max", self.t_max, 1)
        self.eta_min = _number("eta_min", self.eta_min, 0.0, False)
        check_impl(self.impl)
        self.seed = _integer("seed", self.seed, 0)
        if not isinstance(self.device, str):
            raise TypeError(f"device must be a str, got {type(self.device).__name__}")
        try:
            torch.device(self.device)
        except RuntimeError as e:
            raise ValueError(f"device {self.device!r} is not a torch device: {e}") from None
        self.interval = _integer("interval", self.interval, 1)
        if self.interval != 1 and self.optimizer in BASES:
            raise ValueError(f"interval applies to the SAM family; optimizer {self.optimizer!r} takes interval 1, "
                             f"got {self.interval}")

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The config ``to_dict`` gave; unknown or missing keys raise ValueError."""
        if not isinstance(d, dict):
            raise TypeError(f"d must be a dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING}
        if not required <= set(d) <= names:
            raise ValueError(f"config dict: unknown keys {sorted(set(d) - names)}, missing {sorted(required - set(d))}")
        return cls(**d)


def make_config(task: str, preset: str = "paper", **overrides) -> TrainConfig:
    """The ``preset`` ("paper" or "authors") for ``task``, with the non-None ``overrides`` applied.

    ``t_max`` follows the final ``epochs`` (paper: epochs; authors: max(1, epochs // 4)) unless given.
    """
    _choice("preset", preset, PRESETS)
    names = {f.name for f in fields(TrainConfig)} - {"task"}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"make_config got unknown option(s) {unknown}")
    values = dict(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    values.setdefault("t_max", max(1, values["epochs"] // _T_MAX_DIVISOR[preset]))
    return TrainConfig(task=task, **values)


# ---- the pieces of a step ----------------------------------------------------------------------------
def make_optimizer(config: TrainConfig, model: torch.nn.Module, steps_per_epoch: int,
                   capturable: bool = False) -> torch.optim.Optimizer:
    """The optimizer ``config`` names, over ``model``'s parameters (named: ASAM leaves biases unscaled).
    ``capturable``: Adam/AdamW keep their step counts on the device, so a CUDA graph can replay the step."""
    steps_per_epoch = _integer("steps_per_epoch", steps_per_epoch, 1)
    kwargs = dict(lr=config.lr, weight_decay=config.weight_decay, **({"capturable": True} if capturable else {}))
    if config.optimizer in BASES:
        return BASES[config.optimizer](model.parameters(), **kwargs)
    kwargs.update(rho=config.rho, impl=config.impl)
    base = BASES[config.base]
    if config.optimizer == "looksam":  # its interval is its k; 1 takes LookSAM's default
        return fastsam.LookSAM(model.named_parameters(), base, k=config.interval if config.interval > 1 else 5,
                               **kwargs)
    kwargs["interval"] = config.interval
    if config.optimizer == "lastsam":
        return fastsam.LastSAM(model.named_parameters(), base, switch_at=0.5, sharpness="sam",
                               total_steps=config.epochs * steps_per_epoch, **kwargs)
    return _SAM_FAMILY[config.optimizer](model.named_parameters(), base, **kwargs)


def make_loss(config: TrainConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss(logits [B, C] float, y) -> 0-dim``: CVaR_alpha cross-entropy (EXPR, y int64 [B]) or
    element-wise CVaR_alpha BCE (AU, y 0/1 int64 [B, 12])."""
    alpha, impl = config.alpha, config.impl
    if get_task(config.task).multilabel:
        return lambda logits, y: cvar_bce_with_logits(logits, y.float(), alpha, reduction="element", impl=impl)
    return lambda logits, y: cvar_cross_entropy(logits, y, alpha, impl=impl)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn, x: torch.Tensor,
               y: torch.Tensor) -> torch.Tensor:
    """One optimizer step on the batch ``x`` [B, D] float, ``y`` (labels); returns the loss of the first pass.

    Only the first forward pass (at w) updates the BatchNorm running statistics; the SAM family's later
    passes (at w + e, w - e) run with them frozen, so the statistics describe the weights actually kept.
    """
    def compute_loss():
        return loss_fn(model(x), y)

    if isinstance(optimizer, fastsam.SAM):
        closure = sam_closure(optimizer, model, compute_loss)  # BN frozen in every pass but the one at w
    else:
        def closure():
            loss = compute_loss()
            loss.backward()
            return loss

    optimizer.zero_grad(set_to_none=True)  # no grads: the step runs the closure at w first
    return optimizer.step(closure).detach()


# ---- data ------------------------------------------------------------------------------------------
def _check_bank(name: str, bank, task: Task) -> Tuple[int, int]:
    for attr in ("features", "labels", "images"):
        if not hasattr(bank, attr):
            raise TypeError(f"{name} must have .features, .labels and .images; .{attr} is missing")
    feats, labels = bank.features, np.asarray(bank.labels)
    if feats.ndim != 2:
        raise ValueError(f"{name}.features must be 2-D [N, D], got shape {feats.shape}")
    want = (feats.shape[0], task.outputs) if task.multilabel else (feats.shape[0],)
    if labels.shape != want:
        raise ValueError(f"{name}.labels must have shape {want} for task {task.name}, got {labels.shape}")
    return feats.shape


def _rows(features, idx: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.asarray(features[idx], dtype=np.float32)).to(device)


def _resident(features, device: torch.device) -> torch.Tensor:
    """A bank's features read once into one tensor, in their dtype (fp16 for an extracted bank): on the device
    when it takes less than half of the GPU's free memory, else in host memory (pinned on CUDA). A step then
    gathers its rows from memory instead of reading them from the memmap."""
    host = torch.from_numpy(np.array(features, copy=True, order="C"))  # a memmap is read once, here
    if device.type != "cuda":
        return host
    free, _ = torch.cuda.mem_get_info(device)
    return host.to(device) if host.numel() * host.element_size() < free // 2 else host.pin_memory()


def batch_order(n: int, batch_size: int, gen: torch.Generator, device: torch.device) -> Tuple[torch.Tensor, list]:
    """One epoch's shuffled batches of ``n`` rows, drawn from ``gen``: their row indices, concatenated (int64
    ``[n]`` or one fewer, on ``device``: one copy per epoch), and each batch's (start, end) in them. Each batch
    is sorted (a set of rows, read in order); a last batch of one row is dropped (BatchNorm)."""
    batches = [b.sort().values for b in torch.randperm(n, generator=gen).split(batch_size) if len(b) >= 2]
    ends = np.cumsum([len(b) for b in batches]).tolist()
    return torch.cat(batches).to(device), list(zip([0] + ends[:-1], ends))


def _predictions(logits: torch.Tensor, task: Task) -> torch.Tensor:
    """int64 predictions of float32 ``logits`` [n, C], where they are: the class (argmax, EXPR) or, per AU,
    sigmoid(logit) >= 0.5, i.e. logit >= 0 (:func:`fastsam.affect.metrics.au_predict`'s default)."""
    return (logits >= 0).long() if task.multilabel else logits.argmax(1)


def _eval_chunks(model: AffectMLP, rows: Callable[[int, int], torch.Tensor], n: int,
                 batch_size: int) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """``(start, end, logits)`` of rows ``[start, end)`` (``rows(start, end)``: float32 on the model's device),
    ``batch_size`` at a time, in eval mode without autograd; the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                end = min(start + batch_size, n)
                yield start, end, model(rows(start, end)).float()
    finally:
        model.train(was_training)


def _validation_counts(model: AffectMLP, features: torch.Tensor, labels: torch.Tensor, task: Task,
                       batch_size: int = 1024) -> np.ndarray:
    """Per class (EXPR) or AU: true positives, false positives and false negatives of the model's predictions
    (those of :func:`predict`) on resident rows, counted on the device and read once: int64 ``[3, C]``."""
    device = next(model.parameters()).device
    counts = torch.zeros(3, task.outputs, dtype=torch.int64, device=device)

    def rows(start: int, end: int) -> torch.Tensor:
        return features[start:end].to(device, torch.float32, non_blocking=True)
    for start, end, logits in _eval_chunks(model, rows, len(features), batch_size):
        pred, target = _predictions(logits, task), labels[start:end].to(device, non_blocking=True)
        if task.multilabel:
            counts += torch.stack([pred & target, pred & (1 - target), (1 - pred) & target]).sum(1)
        else:
            hit = torch.bincount(target[pred == target], minlength=task.outputs)
            counts += torch.stack([hit, torch.bincount(pred, minlength=task.outputs) - hit,
                                   torch.bincount(target, minlength=task.outputs) - hit])
    return counts.cpu().numpy()


def predict(model: AffectMLP, features, task, batch_size: int = 1024) -> Tuple[np.ndarray, np.ndarray]:
    """Logits (float32 ``[N, outputs]``) and predictions (int64: ``[N]`` classes for EXPR, ``[N, 12]`` 0/1 for
    AU, as :func:`fastsam.affect.metrics.expr_predict` / ``au_predict`` make them) for ``features``
    (array-like ``[N, in_dim]``, any float dtype), in eval mode, ``batch_size`` rows at a time. The model's
    train/eval mode is restored afterwards."""
    task = task if isinstance(task, Task) else get_task(task)
    batch_size = _integer("batch_size", batch_size, 1)
    device = next(model.parameters()).device

    def rows(start: int, end: int) -> torch.Tensor:
        return _rows(features, np.arange(start, end), device)
    chunks = [(logits.cpu(), _predictions(logits, task).cpu())
              for _, _, logits in _eval_chunks(model, rows, len(features), batch_size)]
    if not chunks:
        empty = torch.empty(0, model.outputs)
        return empty.numpy(), _predictions(empty, task).numpy()
    return tuple(torch.cat(parts).numpy() for parts in zip(*chunks))


# ---- run files -------------------------------------------------------------------------------------
def _atomic(path: str, write: Callable[[str], None]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def _write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    _atomic(path, write)


def _metrics(config: TrainConfig, history: list) -> dict:
    last = history[-1]
    return {"task": config.task, "config": config.to_dict(),
            "epochs": [{k: h[k] for k in ("epoch", "train_loss", "val_f1", "val_per_class", "lr")} for h in history],
            "final": {"val_f1": last["val_f1"], "per_class": last["val_per_class"], "epoch": last["epoch"]}}


def _log_csv(history: list) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["epoch", "train_loss", "val_f1", "lr", "seconds", "steps_per_second"])
    for h in history:
        # steps/s: of the training steps alone (the epoch's seconds include validation and the run files)
        w.writerow([h["epoch"], repr(h["train_loss"]), repr(h["val_f1"]), repr(h["lr"]), f"{h['seconds']:.3f}",
                    f"{h.get('steps_per_second', float('nan')):.2f}"])
    return buf.getvalue()


def _plots(out_dir: str, history: list) -> None:
    try:
        from matplotlib.figure import Figure  # optional: no pyplot, so no GUI backend is touched
    except ImportError:
        return
    epochs = [h["epoch"] for h in history]
    for name, key, label in (("loss.png", "train_loss", "train CVaR loss"), ("f1.png", "val_f1", "validation F1")):
        fig = Figure(figsize=(5, 3.5))
        ax = fig.add_subplot()
        ax.plot(epochs, [h[key] for h in history], marker="o")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        fig.tight_layout()
        _atomic(os.path.join(out_dir, name), lambda tmp: fig.savefig(tmp, format="png"))


def _save(obj, path: str) -> None:
    _atomic(path, lambda tmp: torch.save(obj, tmp))


# ---- training --------------------------------------------------------------------------------------
def train(config: TrainConfig, train_bank, val_bank, out_dir, log: Callable[[str], None] = print,
          cuda_graph: bool = False) -> dict:
    """Train ``config``'s run in ``out_dir`` and return its metrics (the content of ``metrics.json``).

    ``train_bank``/``val_bank``: objects with ``.features`` (float array ``[N, D]``, e.g. an fp16 memmap),
    ``.labels`` (int64 ``[N]`` for EXPR, ``[N, 12]`` for AU) and ``.images``. Each epoch shuffles the
    training rows with a generator seeded from ``config.seed``; a last batch of one row is dropped
    (BatchNorm). After each epoch the model is scored on ``val_bank`` and all run files are rewritten.
    An ``out_dir`` holding a checkpoint of the same config resumes (or, if finished, returns at once);
    one of another config raises ValueError.

    ``cuda_graph``: capture the whole training step in a CUDA graph and replay it per batch
    (:mod:`fastsam.affect.graphed`); needs ``config.device`` on CUDA, the training bank held on the GPU, Adam or
    AdamW made ``capturable`` (done here; a run begun without it resumes without it) and not LastSAM.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be a bool, got {cuda_graph!r}")
    if cuda_graph:
        check_cuda_graph(config.optimizer, torch.device(config.device), config.interval)
    task = get_task(config.task)
    n_train, in_dim = _check_bank("train_bank", train_bank, task)
    n_val, val_dim = _check_bank("val_bank", val_bank, task)
    if val_dim != in_dim:
        raise ValueError(f"val_bank has {val_dim}-d features but train_bank {in_dim}-d")
    if n_train < 2 or n_val < 1:
        raise ValueError(f"train_bank needs >= 2 rows and val_bank >= 1, got {n_train} and {n_val}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    data_shape = [n_train, n_val, in_dim]

    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    model = AffectMLP(task.outputs, in_dim=in_dim).to(device)
    # Batches of one row are dropped, so a last batch of one row does not count as a step.
    steps_per_epoch = n_train // config.batch_size + (n_train % config.batch_size >= 2)
    optimizer = make_optimizer(config, model, steps_per_epoch, capturable=cuda_graph)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.t_max, eta_min=config.eta_min)
    gen = torch.Generator().manual_seed(config.seed)
    history: list = []

    if os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        if ckpt["config"] != config.to_dict() or ckpt["data_shape"] != data_shape:
            raise ValueError(f"{out_dir} holds a run of another config or data set; pick another --out")
        history = ckpt["history"]
        if ckpt["epoch"] >= config.epochs:
            return _metrics(config, history)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])  # its param groups replace ours, "capturable" among them
        if cuda_graph and not all(g.get("capturable", True) for g in optimizer.param_groups):
            raise ValueError(f"{out_dir} was begun without cuda_graph (its Adam counts steps on the host, which a "
                             "captured step would freeze): resume it without --cuda-graph")
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        gen.set_state(ckpt["generator"])
        log(f"resuming {out_dir} after epoch {ckpt['epoch']}")

    loss_fn = make_loss(config)
    # Both banks in memory (on the device when they fit): no memmap read, and on CUDA no host sync, per step.
    features, val_features = _resident(train_bank.features, device), _resident(val_bank.features, device)
    labels = torch.from_numpy(np.asarray(train_bank.labels)).to(features.device)
    val_labels = torch.from_numpy(np.asarray(val_bank.labels)).to(device)
    if cuda_graph and features.device.type != "cuda":  # _resident left it in host memory
        raise ValueError(f"cuda_graph: the training bank ({features.numel() * features.element_size() / 2**30:.1f} "
                         "GiB) takes more than half of the GPU's free memory, and a captured step gathers its rows "
                         "on the GPU; train without --cuda-graph")

    def step(idx: torch.Tensor) -> torch.Tensor:  # the batch of rows idx, gathered where the bank is
        x = features.index_select(0, idx).to(device, torch.float32, non_blocking=True)
        y = labels.index_select(0, idx).to(device, non_blocking=True)
        return train_step(model, optimizer, loss_fn, x, y)
    run_step = GraphedStep(step, optimizer, config.batch_size) if cuda_graph else step
    for epoch in range(len(history) + 1, config.epochs + 1):
        start = time.perf_counter()
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        total = torch.zeros((), dtype=torch.float64, device=device)
        order, spans = batch_order(n_train, config.batch_size, gen, features.device)
        for begin, end in spans:
            total += run_step(order[begin:end]).double()
        train_loss = float(total) / len(spans)  # the epoch's one read of the device
        steps_per_second = len(spans) / (time.perf_counter() - start)
        scheduler.step()
        val = score_from_counts(task, *_validation_counts(model, val_features, val_labels, task))
        history.append({"epoch": epoch, "train_loss": train_loss, "val_f1": val["f1"],
                        "val_per_class": val["per_class"], "lr": lr, "seconds": time.perf_counter() - start,
                        "steps_per_second": steps_per_second})
        _write_epoch(out_dir, config, model, optimizer, scheduler, gen, history, data_shape, device)
        h = history[-1]
        log(f"epoch {epoch}/{config.epochs}  train_loss {h['train_loss']:.4f}  val_f1 {h['val_f1']:.4f}  "
            f"lr {lr:.3g}  {h['seconds']:.1f}s  {steps_per_second:.1f} steps/s"
            + (f"  (CUDA graph, captured {run_step.captures}x)" if cuda_graph else ""))
    return _metrics(config, history)


def _write_epoch(out_dir, config, model, optimizer, scheduler, gen, history, data_shape, device) -> None:
    metrics = _metrics(config, history)
    _write_text(os.path.join(out_dir, "log.csv"), _log_csv(history))
    _write_text(os.path.join(out_dir, "metrics.json"), json.dumps(metrics, indent=2) + "\n")
    _save({"state_dict": model.state_dict(), "config": config.to_dict(), "in_dim": model.in_dim,
           "outputs": model.outputs, "task": config.task}, os.path.join(out_dir, "model.pt"))
    _plots(out_dir, history)
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": history[-1]["epoch"], "history": history, "config": config.to_dict(),
            "data_shape": data_shape, "rng": torch.get_rng_state(), "generator": gen.get_state()}
    if device.type == "cuda":
        ckpt["cuda_rng"] = torch.cuda.get_rng_state(device)
    _save(ckpt, os.path.join(out_dir, "checkpoint.pt"))  # last: its presence marks the epoch as finished


def load_model(run_dir, device="cpu") -> Tuple[AffectMLP, TrainConfig]:
    """The model saved in ``run_dir/model.pt`` (eval mode, on ``device``) and its TrainConfig."""
    path = os.path.join(os.fspath(run_dir), "model.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: run_dir must be a folder written by train()")
    saved = torch.load(path, map_location=device, weights_only=True)
    config = TrainConfig.from_dict(saved["config"])
    model = AffectMLP(saved["outputs"], in_dim=saved["in_dim"])
    model.load_state_dict(saved["state_dict"])
    return model.to(device).eval(), config


__all__ = ["TrainConfig", "PRESETS", "OPTIMIZERS", "make_config", "make_optimizer", "make_loss", "train_step",
           "batch_order", "train", "predict", "load_model"]
