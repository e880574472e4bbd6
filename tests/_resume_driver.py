"""Trains a small model with a fastsam optimizer for a range of steps, optionally from and to a checkpoint.

Run as a script (the phase of a resume test that must start in a fresh process), or main_jobs(jobs):
    python _resume_driver.py JOBS.json
JOBS.json is a list of jobs {"spec": ..., "start": int, "stop": int, "load": path | null,
"save": [[step, path], ...], "base_only": bool}: build the model and optimizer of ``spec``, load the
checkpoint ``load`` (its optimizer state dict without the method's own state when ``base_only``), train
steps [start, stop)
and, once ``step`` steps are done, save the checkpoint {"model", "optimizer", "rng"} to ``path``.
A spec is {"method": class name in fastsam, "options": method kwargs, "base": key of BASES,
"impl": impl}. Everything is seeded, so a job depends on its spec, its step range and its checkpoint only.
"""
import contextlib
import json
import sys

import torch
import torch.nn as nn

import fastsam
from fastsam.utils import frozen_bn_stats

BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4)),
    "nesterov": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    "adam": (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-4)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    "rmsprop": (torch.optim.RMSprop, dict(lr=1e-2, momentum=0.5)),  # not fused: restore, then base.step()
    "adagrad": (torch.optim.Adagrad, dict(lr=0.05)),  # not fused, and its state is made eagerly
}


def make_model() -> nn.Module:
    """Conv1d (a filter-wise ASAM weight) -> BatchNorm -> ReLU -> Dropout -> Linear; inputs [8, 2, 6].
    The conv has no bias: before a BatchNorm its grad is rounding noise, which Adam would amplify."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 4, 3, bias=False), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.3),
                         nn.Linear(16, 3))


def batch(step: int):
    """The data of step ``step``: x [8, 2, 6] float32, y [8] int64, the same in every process."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 2, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def make_optimizer(spec: dict, model: nn.Module) -> torch.optim.Optimizer:
    cls, kwargs = BASES[spec["base"]]
    method = getattr(fastsam, spec["method"])
    return method(model.named_parameters(), cls, impl=spec["impl"], **spec["options"], **kwargs)


def train(model: nn.Module, opt: torch.optim.Optimizer, start: int, stop: int, save: dict) -> None:
    """Steps [start, stop) with opt.step(closure): BatchNorm statistics update in the first pass only.
    ``save``: {number of steps done: checkpoint path}."""
    model.train()
    for step in range(start, stop):
        x, y = batch(step)
        passes = []

        def closure():
            frozen = frozen_bn_stats(model) if passes else contextlib.nullcontext()
            passes.append(1)
            with frozen:
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.zero_grad()
        opt.step(closure)
        if step + 1 in save:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state()},
                       save[step + 1])


def base_only(state_dict: dict) -> dict:
    """An optimizer state dict as its base optimizer alone would have saved it: without the "fastsam" entries
    of the param groups and the "fastsam_" buffers of the per-parameter state."""
    return {"state": {i: {k: v for k, v in s.items() if not k.startswith("fastsam_")}
                      for i, s in state_dict["state"].items()},
            "param_groups": [{k: v for k, v in g.items() if k != "fastsam"} for g in state_dict["param_groups"]]}


def run_job(job: dict) -> None:
    model = make_model()
    opt = make_optimizer(job["spec"], model)
    if job["load"]:
        ckpt = torch.load(job["load"], weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(base_only(ckpt["optimizer"]) if job.get("base_only") else ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
    train(model, opt, job["start"], job["stop"], dict(job["save"]))


def main_jobs(jobs: list) -> None:
    torch.set_num_threads(1)  # the same reduction order in every process
    for job in jobs:
        run_job(job)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        main_jobs(json.load(f))
