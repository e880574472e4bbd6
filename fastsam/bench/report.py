"""The printed table and the JSON record of a benchmark run."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Sequence, Set

import torch

LIMIT_ROW = "bw limit"


def device_name(device: torch.device) -> str:
    """Human name of the device: the GPU's marketing name, or the CPU model from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def device_label(device: torch.device) -> str:
    """File-name part for the device: "cpu", or the GPU name lower-cased with runs of odd characters as "-"."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or "cuda"


def default_out(tag: str, device: torch.device, dtype: str) -> Path:
    """bench/results/<tag>-<device>.json (cwd-relative), with -<dtype> for non-fp32 runs so they do not overwrite."""
    safe_tag = re.sub(r"[^A-Za-z0-9._-]+", "-", tag)
    suffix = "" if dtype == "fp32" else f"-{dtype}"
    return Path("bench") / "results" / f"{safe_tag}-{device_label(device)}{suffix}.json"


def row_label(row: Dict[str, Any]) -> str:
    return f"fastsam:{row['impl']}" if row["kind"] == "fastsam" else row["impl"]


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _ms(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _load(result: Dict[str, Any]) -> str:
    """The load averages of the run, and a warning line when other processes shared the CPU cores."""
    text = f"load average {result['load_avg_before']:.2f} -> {result['load_avg_after']:.2f}"
    if result["device"] == "cpu" and result["threads"] > 1 and result["load_avg_before"] > 0.5:
        # a busy core stalls every parallel region of a multi-threaded op at its barrier: steps slow down many-fold
        text += (f"\nWARNING: other processes were running (load average {result['load_avg_before']:.2f}); "
                 f"multi-threaded CPU timings are unreliable (try --threads 1, or a quiet machine)")
    return text


def _ratio(x: Any, suffix: str = "x") -> str:
    return "-" if x is None else f"{x:.2f}{suffix}"


def _calls(method: Dict[str, Any]) -> str:
    """A method's step calls, runs of one call counted (``first_step + second_step + 4 x step``), and ``/ n`` for
    a timed call of n steps (its times are per step)."""
    runs: List[List[Any]] = []
    for call in method["steps"]:
        if runs and runs[-1][0] == call:
            runs[-1][1] += 1
        else:
            runs.append([call, 1])
    text = " + ".join(call if n == 1 else f"{n} x {call}" for call, n in runs)
    cycle = method.get("steps_per_call", 1)  # records before the field: 1
    return text if cycle == 1 else f"({text}) / {cycle}"


def format_table(result: Dict[str, Any]) -> str:
    """The SAM table: a header line per shape set and method with its dtype and STREAM bandwidths; per shape
    set and method a row per peer and fastsam impl, then the method's bandwidth limit."""
    methods = result["methods"]
    by_steps: Dict[str, List[str]] = {}
    for name, m in methods.items():
        by_steps.setdefault(_calls(m), []).append(name)
    steps = "; ".join(f"{', '.join(names)}: {calls}" for calls, names in by_steps.items())
    words = ", ".join(f"{name} {m['words_per_param'] if m['words_per_param'] is not None else '-'}"
                      for name, m in methods.items())
    head = [f"step = {steps}; over SGD(lr=0.1, momentum=0.9), grads given, no forward/backward; the rows of a "
            f"shape set and method share params and grads and run in interleaved rounds",
            f"device {result['device']} ({result['device_name']}, threads={result['threads']}), "
            f"torch {result['torch']}, pytorch_optimizer {result.get('pytorch_optimizer') or 'not installed'}, "
            f"{_load(result)}",
            f"limit = words/param ({words}) x element size / bandwidth, the bandwidth being the best of the STREAM "
            f"kernels ({', '.join(f'{k} {w}' for k, w in result['stream_words'].items())} words over SAM's 4 "
            f"arrays of the set's size) timed in the method's rounds; x limit = ms / limit; compile s: the compiled "
            f"row's first call less a step",
            "passes/100 steps: the forward/backward passes of 100 fastsam step(closure) calls (an explicit loop "
            "over any row can run the same; pytorch_optimizer's step(closure) runs 2 a step, LookSAM's too)"]
    for name, info in result["shapes"].items():
        for method, per in info["methods"].items():
            head.append(f"  STREAM GB/s in the rounds of {name} ({info['dtype']}), {method}: " +
                        ", ".join(f"{k} {v:.1f}" for k, v in per["stream_GBps"].items()))
    cols = ("shapes", "params", "tensors", "method", "impl", "ms/step", "rounds", "vs loop", "vs compiled",
            "x limit", "launches", "compile s", "passes/100 steps")
    blocks = []
    for name, info in result["shapes"].items():
        head_cells = (name, _count(info["params"]), str(info["tensors"]))
        for method in methods:
            passes = str(methods[method].get("passes_per_100_steps", "-"))  # records before the column: "-"
            rows = [head_cells + (method, row_label(r), _ms(r["median_ms"]), str(r["reps"]),
                                  _ratio(r["speedup_vs_loop"]), _ratio(r["speedup_vs_compiled"]),
                                  _ratio(r["x_limit"], ""), "-" if r["launches"] is None else str(r["launches"]),
                                  "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}", passes)
                    for r in result["rows"] if r["shapes"] == name and r["method"] == method]
            if not rows:
                continue
            per = info["methods"][method]
            if per["limit_ms"] is not None:
                rows.append(head_cells + (method, LIMIT_ROW, _ms(per["limit_ms"]), "-",
                                          _ratio(per["loop_ms"] / per["limit_ms"]), "-", "1.00", "-", "-", passes))
            blocks.append(rows)
    return _columns("\n".join(head), cols, blocks, right={1, 2, 5, 6, 7, 8, 9, 10, 11, 12})


def _columns(head: str, cols: Sequence[str], blocks: List[List[Sequence[str]]], right: Set[int]) -> str:
    """``head``, then the column titles and the blocks of rows (a blank line between blocks), each column as
    wide as its widest cell, the columns in ``right`` right-aligned."""
    lines = [line for rows in blocks for line in rows]
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(cols)]

    def fmt(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [head, fmt(cols), fmt(["-" * w for w in widths])]
    for i, rows in enumerate(blocks):
        out += ([""] if i else []) + [fmt(line) for line in rows]
    return "\n".join(out)


def format_cvar_table(result: Dict[str, Any]) -> str:
    """The CVaR table: per batch size, a row per peer and fastsam impl with its median ms and its speed-up over
    each peer (peer ms / row ms); the authors' row also shows its objective evaluations per call."""
    cvar = result["cvar"]
    peers = cvar["peers"]
    head = (f"CVaR losses: loss = cvar_cross_entropy(logits [n, {cvar['classes']}], target, "
            f"alpha={cvar['alpha']:g}); loss.backward(); logits a {result['dtype'] or 'fp32'} leaf; "
            f"device {result['device']} ({result['device_name']}, threads={result['threads']}), {_load(result)}\n"
            "composite: F.cross_entropy(reduction='none') + torch.topk + weighted sum; authors: Brent's bounded "
            f"search of lambda ({cvar.get('minimiser', 'fminbound')}, xtol {cvar['xtol']:g}), one .item() per "
            "objective evaluation")
    cols = ("n", "impl", "ms/call", "reps", *(f"vs {p}" for p in peers), "evals", "loss")
    blocks = []
    for n in cvar["sizes"]:
        blocks.append([(str(n), row_label(r), _ms(r["median_ms"]), str(r["reps"]),
                        *(f"{r[f'speedup_vs_{p}']:.2f}x" for p in peers),
                        "-" if r["evals"] is None else str(r["evals"]), f"{r['value']:.6g}")
                       for r in cvar["rows"] if r["n"] == n])
    return _columns(head, cols, blocks, right=set(range(len(cols))) - {1})


def format_affect_table(result: Dict[str, Any]) -> str:
    """The affect tables: training (a row per peer and fastsam impl with its median ms per step, steps per
    second, seconds per epoch of the bank and its speed-up over each peer (peer ms / row ms)), then feature
    extraction (frames per second per worker count and the speed-up over 1 worker)."""
    affect = result["affect"]
    peers = affect["peers"]
    head = (f"Affect MLP training: steps of batch {affect['batch']} from a synthetic bank of {affect['bank_rows']:,} x "
            f"{affect['dim']} {affect['bank_dtype']} rows held on {affect['bank_device']} "
            f"({affect['steps_per_epoch']:,} steps an epoch), {affect['classes']} classes, 2 forward/backward passes, "
            f"CVaR alpha {affect['alpha']:g}, SAM rho {affect['rho']:g} + Adam, fp32; device {result['device']} "
            f"({result['device_name']}, threads={result['threads']}), {_load(result)}\n"
            "loop: per-parameter SAM (davda54) + the authors' CVaR (Brent lambda search, a .item() per evaluation); "
            f"foreach: torch._foreach SAM + torch.topk CVaR; timed in calls of {affect['steps_per_call']} steps, "
            "the rows in paired rounds")
    cols = ("impl", "ms/step", "steps/s", "s/epoch", "rounds", *(f"vs {p}" for p in peers))
    lines = [(row_label(r), _ms(r["median_ms"]), f"{r['steps_per_s']:.1f}", f"{r['epoch_s']:.0f}", str(r["reps"]),
              *(f"{r[f'speedup_vs_{p}']:.2f}x" for p in peers)) for r in affect["rows"]]
    training = _columns(head, cols, [lines], right=set(range(1, len(cols))))
    ext = affect["extraction"]
    head = (f"Affect feature extraction (python -m fastsam.affect extract): the demo's {ext['frames']:,} training "
            f"frames, JPEG decode + resize + crop in DataLoader workers, its tiny random CLIP tower in {ext['dtype']}, "
            f"batch {ext['batch']}; frames/s as extract reports them (worker start-up included), median of "
            f"{len(ext['rows'][0]['runs'])} runs; all = {ext['default_workers']} workers (extract's default)")
    lines = [(f"{r['workers']}{' (all)' if r['all'] else ''}", f"{r['frames_per_s']:,.0f}", str(len(r["runs"])),
              f"{r['speedup_vs_1']:.2f}x") for r in ext["rows"]]
    extraction = _columns(head, ("workers", "frames/s", "runs", "vs 1 worker"), [lines], right={1, 2, 3})
    return training + "\n\n" + extraction


def write_json(result: Dict[str, Any], path: Path) -> Path:
    """Writes the run record, making the folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path
