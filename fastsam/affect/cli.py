"""``python -m fastsam.affect``: make-demo, extract, train and evaluate from the command line.

Every subcommand has ``--help``. A bad path, a wrong task folder or an empty bank ends the command with one
``error: ...`` line on stderr and exit status 2, not a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import torch

from .tasks import TASKS, get_task
from .train import OPTIMIZERS, PRESETS

# User errors: paths (OSError: missing, not a folder, no permission) and bad values or inputs.
_ERRORS = (OSError, ValueError)


def _make_demo(args) -> None:
    from .demo import make_demo

    paths = make_demo(args.out, args.task, videos=args.videos, frames=args.frames, seed=args.seed)
    print(f"demo {args.task} data in {args.out}:\n  --images {paths['images']}\n  --annotations "
          f"{paths['annotations']}\n  --checkpoint {paths['checkpoint']}")


def _extract(args) -> None:
    from .bank import default_workers, extract_bank
    from .data import scan_split, split_folder

    task = get_task(args.task)
    frames, stats = scan_split(args.images, args.annotations, task, args.split)
    folder, parent = split_folder(args.annotations, args.split)
    how = f"the {os.path.basename(folder)} folder in --annotations" if parent else "the --annotations folder itself"
    print(f"annotations: {folder} ({how})")
    print(f"{args.split}: {stats.videos} videos, {stats.frames} frames "
          f"({stats.invalid} invalid and {stats.missing} without an image skipped)")
    if args.limit is not None:
        if args.limit <= 0:
            raise ValueError(f"--limit must be a positive number of frames, got {args.limit}")
        frames = frames[:args.limit]
        print(f"--limit: the first {len(frames)} frames only (a bank of its own)")
    workers = default_workers() if args.workers is None else args.workers
    bank = extract_bank(frames, stats, task, args.split, args.images, args.checkpoint, args.out,
                        batch_size=args.batch_size, device=args.device, workers=workers, dtype=args.dtype,
                        save_every=args.save_every)
    rate = bank.manifest.get("frames_per_second")
    print(f"bank {bank.path}: {len(bank)} x {bank.dim} float16 features"
          + (f" (extracted at {rate:.1f} frames/s)" if rate else ""))


def _train(args) -> None:
    from .bank import load_bank
    from .graphed import check_cuda_graph
    from .train import make_config, train

    task = get_task(args.task)
    config = make_config(task.name, args.preset, optimizer=args.optimizer, alpha=args.alpha, rho=args.rho,
                         epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, impl=args.impl,
                         seed=args.seed, device=args.device, interval=args.interval)
    if args.cuda_graph:  # before the banks are read
        check_cuda_graph(config.optimizer, torch.device(config.device), config.interval)
    train_bank = load_bank(args.train_bank, task)
    val_bank = load_bank(args.val_bank, task)
    metrics = train(config, train_bank, val_bank, args.out, cuda_graph=args.cuda_graph)
    final = metrics["final"]
    print(f"val F1 {final['val_f1']:.4f} after epoch {final['epoch']}; run files in {args.out}")


def _evaluate(args) -> None:
    from .bank import load_bank
    from .metrics import score
    from .predictions import write_predictions
    from .train import load_model, predict

    model, config = load_model(args.run, device=args.device)
    task = get_task(config.task)
    bank = load_bank(args.bank, task)
    _, pred = predict(model, bank.features, task)
    result = {"bank": os.path.abspath(bank.path), "frames": len(bank), **score(task, pred, bank.labels)}
    out = args.out or os.path.join(args.run, "evaluation.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    if args.predictions:
        write_predictions(args.predictions, bank.images, pred, task)
    width = max(len(n) for n in task.names)
    print(f"{task.name} F1 {result['f1']:.4f} on {len(bank)} frames of {bank.path}")
    for name, value in result["per_class"].items():
        print(f"  {name:<{width}}  {value:.4f}")
    print(f"metrics written to {out}" + (f", predictions to {args.predictions}" if args.predictions else ""))


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m fastsam.affect`` argument parser (one sub-parser per subcommand)."""
    parser = argparse.ArgumentParser(prog="python -m fastsam.affect",
                                     description="CLIP-MLP facial-affect pipeline on Aff-Wild2: frozen CLIP "
                                                 "features, an MLP trained with CVaR and SAM, macro F1.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tasks = sorted(TASKS)

    p = sub.add_parser("make-demo", help="write a small synthetic dataset and a tiny encoder checkpoint",
                       description="Write a synthetic dataset in the official layout (OUT/cropped_aligned, "
                                   "OUT/annotations/{Train_Set,Validation_Set}) and a tiny random CLIP image "
                                   "tower (OUT/encoder.pt), so the pipeline runs with no download.")
    p.add_argument("out", metavar="OUT", help="folder to create the dataset in")
    p.add_argument("--task", choices=tasks, required=True)
    p.add_argument("--videos", type=int, default=4, help="videos per split (default 4)")
    p.add_argument("--frames", type=int, default=24, help="annotation lines per video (default 24)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_make_demo)

    p = sub.add_parser("extract", help="encode a split's frames into a feature bank",
                       description="Encode every valid frame of a split with the CLIP image tower into a "
                                   "feature bank (fp16 .npy, index, manifest). An existing bank of the same "
                                   "inputs is reused; an interrupted one resumes.")
    p.add_argument("--images", required=True, help="the cropped_aligned folder (one sub-folder per video)")
    p.add_argument("--annotations", required=True, help="the task's annotation folder, holding Train_Set "
                                                        "and Validation_Set, or the split's folder itself")
    p.add_argument("--task", choices=tasks, required=True)
    p.add_argument("--split", choices=["train", "val"], required=True)
    p.add_argument("--checkpoint", required=True, help="OpenAI CLIP checkpoint (ViT-L-14.pt or a state dict)")
    p.add_argument("--out", required=True, help="bank folder")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=None,
                   help="processes that decode and preprocess images (default: one per CPU, at most 8; 0: none)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="the encoder's dtype (float16 on a GPU only; default float32)")
    p.add_argument("--limit", type=int, default=None, help="extract the first N frames only (a trial bank)")
    p.add_argument("--save-every", type=float, default=30.0,
                   help="seconds between progress saves in the manifest, which a rerun resumes from (default 30)")
    p.set_defaults(handler=_extract)

    p = sub.add_parser("train", help="train the MLP on feature banks",
                       description="Train the affect MLP with the fused CVaR loss and a fastsam optimizer. "
                                   "Writes RUN/metrics.json, log.csv, model.pt, checkpoint.pt (resume by "
                                   "rerunning the same command) and PNG curves when matplotlib is installed.")
    p.add_argument("--task", choices=tasks, required=True)
    p.add_argument("--train-bank", required=True)
    p.add_argument("--val-bank", required=True)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                   help="paper: alpha 0.3, rho 0.05, Adam 1e-3, cosine over all epochs; authors: alpha 0.5, "
                        "rho 0.5, AdamW wd 1e-4, cosine T_max epochs/4, eta_min 1e-5 (default paper)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="default: the preset's (sam)")
    for name, kind in (("alpha", float), ("rho", float), ("epochs", int), ("batch-size", int), ("lr", float),
                       ("seed", int)):
        p.add_argument(f"--{name}", type=kind, default=None, help="default: the preset's")
    p.add_argument("--interval", type=int, default=None,
                   help="the SAM family's step on every INTERVAL-th step, the base optimizer's one-pass step between "
                        "(default 1); for looksam its k (default 5)")
    p.add_argument("--impl", default=None, help="fastsam kernel impl: auto, cuda, triton, cpu or torch")
    p.add_argument("--device", default=None, help="default: cpu")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture the whole training step in a CUDA graph and replay it per batch (CUDA only; the "
                        "training bank must fit on the GPU; not with lastsam)")
    p.set_defaults(handler=_train)

    p = sub.add_parser("evaluate", help="score a trained run on a bank and write predictions",
                       description="Score RUN's model on BANK (EXPR: macro F1 over 8 classes; AU: mean F1 over "
                                   "12 AUs at threshold 0.5), print and write the metrics, and optionally the "
                                   "predictions as a CSV: image and one 0/1 column per AU (AU1 ... AU26), or "
                                   "image,expression with the class index (EXPR).")
    p.add_argument("--run", required=True, help="a folder written by train")
    p.add_argument("--bank", required=True)
    p.add_argument("--predictions", default=None, help="CSV to write, one row per frame")
    p.add_argument("--out", default=None, help="metrics JSON (default RUN/evaluation.json)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(handler=_evaluate)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run one subcommand; returns the exit status (2 with one ``error:`` line on a user error)."""
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except _ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
