"""Command line of the main benchmark: python -m fastsam.bench --help.

Three tables: "sam" (one optimizer step per shape set, method and row), "cvar" (forward + backward of a
CVaR cross-entropy per batch size and row) and "affect" (whole training steps of the affect MLP: two passes,
CVaR, SAM); one JSON record holds them all.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import socket
import statistics
import sys
import weakref
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

import fastsam
from fastsam._extension import IMPLS, extension_error
from fastsam.bench import affect_extraction, affect_peers, cvar_peers, po_peers, stream
from fastsam.bench.methods import METHODS, SAM_PEERS
from fastsam.bench.peers import PEERS, fastsam_impls
from fastsam.bench.report import (default_out, device_name, format_affect_table, format_cvar_table, format_table,
                                  write_json)
from fastsam.bench.shapes import DTYPES, SHAPE_DTYPES, SHAPES, make_params, numel
from fastsam.bench.stream import KERNELS as STREAM_KERNELS
from fastsam.bench.timing import count_launches, time_calls, time_paired

# Paired rounds of a method's rows (each round: one step of every row). The budget is the slowest row's time
# over the rounds: the loop and pytorch_optimizer peers on ViT-B/16 and GPT-2 medium take 0.4-1 s a step on 2
# CPU cores, which gives those sets 12-30 rounds, the small sets up to 100.
# Three warm-up calls: the compiled row compiles at its first call and recompiles at its second (its state and
# SGD's momentum exist from then on), and the round count is fitted to the last warm-up call.
PAIRED_TIMING = {False: dict(warmup=3, budget_s=12.0, min_rounds=7, max_rounds=100),
                 True: dict(warmup=1, budget_s=0.5, min_rounds=3, max_rounds=10)}
# CVaR rows take 0.05-50 ms a call: 12 rows in well under a minute
CVAR_TIMING = {False: dict(warmup=3, budget_s=1.0, min_reps=7, max_reps=300),
               True: dict(warmup=1, budget_s=0.1, min_reps=3, max_reps=20)}
# Affect rows: calls of 20 training steps (0.2-1 s each on 2 CPU cores), in paired rounds.
AFFECT_TIMING = {False: dict(warmup=1, budget_s=20.0, min_rounds=5, max_rounds=50),
                 True: dict(warmup=1, budget_s=0.5, min_rounds=2, max_rounds=5)}
EXTRACTION_ROUNDS = {False: 3, True: 1}  # extractions of the demo per worker count
TABLES = ("sam", "cvar", "affect")


def _comma_list(allowed, what: str):
    def parse(text: str) -> List[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, bad)) or '(empty list)'}; choose from {', '.join(allowed)}")
        return list(dict.fromkeys(items))
    return parse


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_list(text: str) -> List[int]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma list of positive integers, got an empty list")
    return list(dict.fromkeys(_positive(s) for s in items))


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parses and checks the flags; bad values exit through argparse's error (status 2)."""
    p = argparse.ArgumentParser(
        prog="python -m fastsam.bench",
        description="Time one step (first_step + second_step; CR-SAM: + third_step; LookSAM: a cycle of k steps / k; "
                    "no forward/backward) of "
                    "SAM and its variants, for every available fastsam impl against a per-parameter loop of the "
                    "published algorithm (davda54/sam's for SAM) and a torch._foreach version of it; then the "
                    "forward + backward of fastsam.losses.cvar_cross_entropy against a torch.topk composite and "
                    "the affect paper authors' lambda search; then training steps of the affect MLP (two passes, "
                    "CVaR, SAM + Adam) over a synthetic feature bank against the authors' loop and a stock-PyTorch "
                    "one, and the affect pipeline's feature extraction at 1, 2 and all worker processes.")
    p.add_argument("--tables", type=_comma_list(TABLES, "table"),
                   help=f"comma list of {', '.join(TABLES)} (default: all)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if visible, else cpu")
    p.add_argument("--shapes", type=_comma_list(tuple(SHAPES), "shape set"),
                   help=f"comma list of {', '.join(SHAPES)} (default: all, but gpt2_medium on the CPU only when "
                        "named; --quick: neither vit_b16 nor gpt2_medium)")
    p.add_argument("--methods", type=_comma_list(tuple(METHODS), "method"),
                   help=f"comma list of {', '.join(METHODS)} (default: all)")
    p.add_argument("--dtype", choices=tuple(DTYPES),
                   help="parameter dtype of every shape set (default: each set's own: "
                        f"{', '.join(f'{k} {v}' for k, v in SHAPE_DTYPES.items())}); CVaR: default fp32")
    p.add_argument("--impl", type=_comma_list(IMPLS, "impl"),
                   help="comma list of the fastsam impls (default: the available ones, less triton on cpu; the "
                        "SAM table also leaves out the pure-torch reference \"torch\")")
    p.add_argument("--cvar-rows", type=_positive_list,
                   help="comma list of batch sizes n of the CVaR table "
                        f"(default: {','.join(map(str, cvar_peers.CVAR_ROWS))})")
    p.add_argument("--cvar-alpha", type=_fraction, default=cvar_peers.ALPHA,
                   help=f"CVaR level alpha in (0, 1] (default: {cvar_peers.ALPHA})")
    p.add_argument("--affect-rows", type=_positive, default=affect_peers.BANK_ROWS,
                   help="rows of the affect table's synthetic feature bank "
                        f"(default: {affect_peers.BANK_ROWS}; an epoch is rows / 32 steps)")
    p.add_argument("--quick", action="store_true",
                   help="few reps, and skip vit_b16 and gpt2_medium unless --shapes names them")
    p.add_argument("--reps", type=_positive,
                   help="paired rounds per shape set and method (CVaR: calls per row; affect: paired rounds of 20-step "
                        "calls) (default: fit a time budget)")
    p.add_argument("--threads", type=_positive,
                   help="CPU threads for torch (default: torch's choice); 1 resists other processes on the cores")
    p.add_argument("--out", type=Path, help="JSON path (default: bench/results/<host>-<device>.json)")
    p.add_argument("--tag", help="name for the results file instead of the host name")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    available = fastsam.available_impls(args.device)
    missing = [i for i in args.impl or () if i not in available]
    if missing:
        p.error(f"--impl {','.join(missing)}: not available on {args.device} (available: {', '.join(available)})")
    # The SAM table leaves the pure-torch reference out unless --impl names it: the spec, not a tuned path, it
    # would add GBs of state and minutes of steps to the large sets (the CVaR and affect tables keep it).
    args.sam_impl = args.impl or [i for i in fastsam_impls(args.device) if i != "torch"]
    args.impl = args.impl or fastsam_impls(args.device)
    # GPT-2 medium on a CPU only when named: its rows hold 12-16 GB per method, and a 24 GB machine ran out of
    # memory after a few methods in one process (freed memory stays with the process's allocator).
    skip = {"vit_b16", "gpt2_medium"} if args.quick else {"gpt2_medium"} if args.device == "cpu" else set()
    args.shapes = args.shapes or [s for s in SHAPES if s not in skip]
    args.methods = args.methods or list(METHODS)
    args.tables = args.tables or list(TABLES)
    args.cvar_rows = args.cvar_rows or list(cvar_peers.CVAR_ROWS)
    return args


def run(args: argparse.Namespace, log=sys.stderr,
        progress: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Times the tables of ``args.tables`` and returns the record that report.py prints and stores.

    SAM (:func:`run_sam`): every (shapes, method) pair in paired rounds of its rows. Per shape set: its dtype,
    and per method the STREAM kernels' bandwidths, the best of them, its limit and loop time; each row has
    a ``method``, its ``speedup_vs_loop`` and ``speedup_vs_compiled`` (peer ms / row ms), its ``x_limit`` (row
    ms / the method's limit; None without one), the first call's time, the compiled row's compile time and
    the GPU launches of one step (None on the CPU). Times and launches are per step: a method whose timed call
    is a cycle of steps (LookSAM) has them divided by its ``steps_per_call``; ``first_call_ms`` is the whole
    first call. Without the SAM table, ``shapes`` and ``rows`` are empty.
    CVaR (:func:`run_cvar`): the ``cvar`` entry; affect (:func:`run_affect`): the ``affect`` entry.
    ``progress`` gets the record so far after each (shapes, method) pair and each table, with ``complete``
    False until the end, so that a run stopped part-way (a time limit) leaves what it measured.
    """
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]  # other processes on the cores skew every figure: keep the evidence
    sam = "sam" in args.tables
    result: Dict[str, Any] = dict(
        host=socket.gethostname(), tag=args.tag, device=device.type, device_name=device_name(device),
        dtype=args.dtype, threads=torch.get_num_threads(), torch=torch.__version__, fastsam=fastsam.__version__,
        extension_error=extension_error(), available_impls=fastsam.available_impls(device),
        load_avg_before=load_before, date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        argv=sys.argv[1:], quick=args.quick, tables=args.tables,
        timing=dict(PAIRED_TIMING[args.quick], rounds=args.reps), stream_kernels=list(STREAM_KERNELS),
        stream_words=dict(stream.WORDS), pytorch_optimizer=po_peers.version(),
        methods={m: dict(title=METHODS[m].title, steps=list(METHODS[m].steps), options=METHODS[m].options,
                         fastsam_options=METHODS[m].fastsam_options,
                         words_per_param=METHODS[m].words_per_param, steps_per_call=METHODS[m].cycle,
                         passes_per_100_steps=METHODS[m].passes_per_100_steps()) for m in args.methods if sam},
        shapes={}, rows=[], complete=False)

    def report() -> None:
        result["load_avg_after"] = os.getloadavg()[0]
        if progress is not None:
            progress(result)
    if sam:
        run_sam(args, result, log, report)
    if "cvar" in args.tables:
        result["cvar"] = run_cvar(args, log)
        report()
    if "affect" in args.tables:
        result["affect"] = run_affect(args, log)
    result["complete"] = True
    report()
    return result


def run_sam(args: argparse.Namespace, result: Dict[str, Any], log=sys.stderr,
            progress: Callable[[], None] = lambda: None) -> None:
    """Times every (shapes, method) pair into ``result["shapes"]`` and ``result["rows"]``.

    The rows of a pair share one set of parameters and grads and are timed in interleaved rounds
    (:func:`fastsam.bench.timing.time_paired`) together with the STREAM kernels of the limit
    (:mod:`fastsam.bench.stream`), so that where the allocator put a row's tensors, or what else ran during
    one row, does not decide a comparison. Each row has its own optimizer state. Rows that write into
    ``.grad`` (pytorch_optimizer's Friendly SAM writes d there; the orthogonal LastSAM peers and impl
    "torch" the projected grad) change the values the next rows see, not the work they do: the grads stay
    far from denormals and no op skips zeros (see :mod:`fastsam.bench.methods`).
    """
    device = torch.device(args.device)
    for name in args.shapes:
        dtype_name = args.dtype or SHAPE_DTYPES[name]
        dtype = DTYPES[dtype_name]
        n = numel(SHAPES[name])
        info = result["shapes"][name] = dict(params=n, tensors=len(SHAPES[name]), dtype=dtype_name,
                                             element_size=dtype.itemsize, methods={})
        for method_name in args.methods:
            method = METHODS[method_name]
            row_names = method.rows(device, args.sam_impl)
            timed, launches = _time_rows(method, row_names, SHAPES[name], device, dtype, result["timing"])
            streams = stream.bandwidths(stream.array_bytes(n, dtype.itemsize),
                                        {k: statistics.median(timed[STREAM + k]["times"]) for k in STREAM_KERNELS})
            bandwidth = max(streams.values())
            words = method.words_per_param
            limit_ms = None if words is None else 1e3 * stream.limit_seconds(n, dtype, bandwidth, words)
            # ms per step: a timed call is method.cycle steps (LookSAM: a SAM step and the k - 1 between)
            per_step = {row: [t / method.cycle for t in timed[row]["times"]] for row in row_names}
            medians = {row: 1e3 * statistics.median(per_step[row]) for row in row_names}
            info["methods"][method_name] = dict(limit_ms=limit_ms, loop_ms=medians["loop"],
                                                stream_GBps={k: v / 1e9 for k, v in streams.items()},
                                                bandwidth_GBps=bandwidth / 1e9)
            for row in row_names:
                first_ms = 1e3 * timed[row]["first_s"]
                result["rows"].append(dict(
                    shapes=name, method=method_name, impl=row, kind="peer" if row in SAM_PEERS else "fastsam",
                    **_stats(per_step[row]), first_call_ms=first_ms,
                    compile_s=(first_ms - method.cycle * medians[row]) / 1e3 if row == "compiled" else None,
                    launches=None if launches[row] is None else launches[row] / method.cycle,
                    speedup_vs_loop=medians["loop"] / medians[row],
                    speedup_vs_compiled=medians["compiled"] / medians[row],
                    x_limit=None if limit_ms is None else medians[row] / limit_ms))
                print(f"{name:11s} {method_name:18s} {row:17s} {medians[row]:10.3f} ms  "
                      f"({len(timed[row]['times'])} rounds)", file=log, flush=True)
            print(f"{name:11s} {method_name:18s} STREAM GB/s " +
                  ", ".join(f"{k} {v / 1e9:.1f}" for k, v in streams.items()), file=log, flush=True)
            progress()


STREAM = "stream:"  # the prefix of the STREAM kernels' names among the timed functions


def _time_rows(method, row_names: List[str], shapes, device: torch.device, dtype: torch.dtype,
               timing: Dict[str, Any]):
    """Builds every row's optimizer over one shared set of parameters, times their steps and the STREAM
    kernels (named ``STREAM + kernel``) in paired rounds, and counts each step's GPU launches; frees the
    tensors before returning."""
    params = make_params(shapes, device, dtype)
    reset = method.grad_reset(params)
    fns = {row: method.step_fn(method.make(row, params), row, reset) for row in row_names}
    arrays = stream.stream_arrays(stream.array_bytes(numel(shapes), dtype.itemsize), device)
    timed = time_paired({**fns, **{STREAM + k: fn for k, fn in stream.kernels(arrays).items()}}, device, **timing)
    launches = {row: count_launches(fn, device) for row, fn in fns.items()}
    alive = weakref.ref(params[0])
    del fns, params, arrays, reset
    torch._dynamo.reset()  # the compiled row's graphs hold its optimizer, and with it the rows' tensors
    if alive() is not None:  # a reference cycle holds the rows' tensors (GBs on the large sets):
        gc.collect()  # free them before the next pair allocates
    _release_freed_memory()
    return timed, launches


def _release_freed_memory() -> None:
    """Hands the heap's free pages back to the system (glibc's malloc_trim; a no-op elsewhere): the rows of a
    large pair leave GBs of freed but retained heap that the next pair's tensors, of other sizes, do not reuse."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


def run_cvar(args: argparse.Namespace, log=sys.stderr) -> Dict[str, Any]:
    """Times ``loss = cvar_cross_entropy(logits, target, alpha); loss.backward()`` per batch size and row (the
    peers of :mod:`fastsam.bench.cvar_peers`, then the fastsam impls) and returns the record's ``cvar`` entry:
    the setting, and a row each with its timings, the loss it computed, its speed-up over each peer
    (``speedup_vs_<peer>`` = peer ms / row ms) and, for the authors' row, the objective evaluations per call.
    """
    device, dtype = torch.device(args.device), DTYPES[args.dtype or "fp32"]
    timing = dict(CVAR_TIMING[args.quick], reps=args.reps)
    out: Dict[str, Any] = dict(loss="cvar_cross_entropy", classes=cvar_peers.CLASSES, alpha=args.cvar_alpha,
                               peers=list(cvar_peers.CVAR_PEERS), xtol=cvar_peers.XTOL, maxfun=cvar_peers.MAXFUN,
                               minimiser=cvar_peers.minimiser()[1],
                               sizes=args.cvar_rows, timing=timing, rows=[])
    for n in args.cvar_rows:
        block = []
        for row in cvar_peers.cvar_rows(device, args.impl):
            logits, target = cvar_peers.make_logits(n, device=device, dtype=dtype)
            value, evals = cvar_peers.evaluate(row, logits, target, args.cvar_alpha)
            times = time_calls(cvar_peers.step_fn(row, logits, target, args.cvar_alpha), device, **timing)
            block.append(dict(n=n, impl=row, kind="peer" if row in cvar_peers.CVAR_PEERS else "fastsam",
                              **_stats(times), value=value, evals=evals))
            print(f"cvar n={n:<8d} {row:10s} {block[-1]['median_ms']:10.3f} ms  ({len(times)} reps)", file=log,
                  flush=True)
        peer_ms = {r["impl"]: r["median_ms"] for r in block if r["kind"] == "peer"}
        for r in block:
            r.update({f"speedup_vs_{peer}": ms / r["median_ms"] for peer, ms in peer_ms.items()})
        out["rows"] += block
    return out


def run_affect(args: argparse.Namespace, log=sys.stderr) -> Dict[str, Any]:
    """Times training steps of the affect MLP per row over one synthetic bank of ``args.affect_rows`` rows
    (:mod:`fastsam.bench.affect_peers`: calls of 20 steps, the rows in paired rounds), then extracts the demo
    data at 1, 2 and all workers (:mod:`fastsam.bench.affect_extraction`). Returns the record's ``affect``
    entry: the setting, a row each with its per-step timings, steps per second, the seconds an epoch of the
    bank takes and its speed-up over each peer (``speedup_vs_<peer>`` = peer ms / row ms), and the
    ``extraction`` entry. The MLP trains in fp32 whatever ``--dtype``."""
    device = torch.device(args.device)
    timing = dict(AFFECT_TIMING[args.quick], rounds=args.reps)
    steps = affect_peers.STEPS_PER_CALL
    features, labels = affect_peers.make_bank(args.affect_rows, device)
    rows = affect_peers.affect_rows(device, args.impl)
    fns = {row: affect_peers.BankSteps(affect_peers.step_fn(*affect_peers.make_row(row, device)), features, labels,
                                       steps=steps) for row in rows}
    timed = time_paired(fns, device, **timing)
    out: Dict[str, Any] = dict(batch=affect_peers.BATCH, dim=affect_peers.DIM, classes=affect_peers.CLASSES,
                               alpha=affect_peers.ALPHA, rho=affect_peers.RHO, lr=affect_peers.LR,
                               bank_rows=args.affect_rows, bank_dtype="fp16", bank_device=str(features.device),
                               steps_per_call=steps, steps_per_epoch=fns[rows[0]].steps_per_epoch,
                               peers=list(PEERS), timing=timing, rows=[])
    del fns, features, labels
    for row in rows:
        per_step = [t / steps for t in timed[row]["times"]]
        r = dict(impl=row, kind="peer" if row in PEERS else "fastsam", **_stats(per_step))
        r.update(steps_per_s=1e3 / r["median_ms"], epoch_s=out["steps_per_epoch"] * r["median_ms"] / 1e3)
        out["rows"].append(r)
        print(f"affect    {row:10s} {r['median_ms']:10.3f} ms/step  ({r['reps']} calls of {steps} steps)", file=log,
              flush=True)
    peer_ms = {r["impl"]: r["median_ms"] for r in out["rows"] if r["kind"] == "peer"}
    for r in out["rows"]:
        r.update({f"speedup_vs_{peer}": ms / r["median_ms"] for peer, ms in peer_ms.items()})
    out["extraction"] = affect_extraction.run_extraction(device, EXTRACTION_ROUNDS[args.quick], args.quick)
    for r in out["extraction"]["rows"]:
        print(f"extract   {r['workers']} workers {r['frames_per_s']:10.1f} frames/s  ({len(r['runs'])} runs)", file=log,
              flush=True)
    return out


def _stats(times: List[float]) -> Dict[str, Any]:
    """A row's timing fields, in ms: reps, median, min, mean and every sample."""
    return dict(reps=len(times), median_ms=1e3 * statistics.median(times), min_ms=1e3 * min(times),
                mean_ms=1e3 * statistics.mean(times), times_ms=[1e3 * t for t in times])


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the benchmark, prints the table, writes the JSON record (rewritten after each part, so that a run
    stopped part-way leaves what it measured, marked ``"complete": false``)."""
    args = parse_args(argv)
    path = args.out or default_out(args.tag or socket.gethostname(), torch.device(args.device), args.dtype or "fp32")
    result = run(args, progress=lambda partial: write_json(partial, path))
    formats = dict(sam=format_table, cvar=format_cvar_table, affect=format_affect_table)
    tables = [formats[t](result) for t in TABLES if t in args.tables]
    print("\n\n".join(tables))
    print(f"results: {path}")
    return 0
