"""`make gpu-check`: everything that needs a GPU, in one command for a bare GPU machine with no network.

Runs with the machine's own python (``GPU_PYTHON``, default ``python3``), which must already hold a CUDA build of
torch, triton, pytest (pytest-xdist if there, for parallel tests) and ninja, with ``nvcc`` and
``compute-sanitizer`` on PATH. Nothing is installed. Phases, in order, each timed:

  preflight  torch with CUDA, a visible GPU and nvcc, or one line on stderr and exit status 2 at once
  build      fastsam._C in place (``setup.py build_ext --inplace``) for this GPU's arch only, on every core;
             then fastsam.available_impls("cuda") must hold cuda and triton
  tests      the CUDA and Triton-on-CUDA tests (TEST_FILES, TEST_SELECTION), FASTSAM_REQUIRE_IMPLS set so that
             a missing impl fails instead of skipping
  sanitizer  tools/gpu_smoke.py (every CUDA op once, a SAM step, a CVaR loss) under compute-sanitizer memcheck
  bench      python -m fastsam.bench --device cuda BENCH_ARGS

A failed build stops the run; any other failed phase lets the later ones run. Logs go to ``$OUT/<phase>.log``
when OUT is set (the device runner's folder of files that come back), else to bench/results/gpu-check/; so do
tests.xml (JUnit) and summary.txt. The bench's JSON record is ``$OUT/bench.json``, else
bench/results/<date>-<gpu>.json, the file to commit. Exit status: 0 if every phase passed, 1 if one failed,
2 if the preflight failed.

The whole run must fit in 8 minutes on an H100 with 16 cores: each phase runs under a time limit
(PHASE_LIMITS) within BUDGET_S, and one that overruns is stopped and counted as failed.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent

# The benchmark's flags (appended to `python -m fastsam.bench --device cuda`), sized to about 2 minutes on an H100:
# --quick keeps a few timed rounds per row (GPU steps take milliseconds, so even those are steady), and naming the
# shape sets keeps ViT-B/16 and GPT-2 medium, which --quick alone would drop. SAM alone: each shape set and method
# compiles the compiled peer's two steps afresh (estimated 10-30 s on 16 cores for the 152-292 tensors of the
# large sets; not yet measured on a GPU), so every further method costs about a minute. Add flags here, or per
# run with --bench-args.
BENCH_ARGS = "--tables sam,cvar --quick --shapes mlp,resnet18,vit_b16,gpt2_medium --methods sam"

# Every test file with device parametrizations (tests/_impls.py impl_params: ids "cuda-cuda" and "cuda-triton")
# or GPU-only tests (named *_on_the_gpu). Add a file here when it gains CUDA tests; the selection then keeps only
# their device ids (the CPU ids run in `make test` everywhere). test_sam, test_sam_family, test_gsam_wsam and
# test_looksam hold the trajectory tests against the authors' loops (SAM, ASAM, Friendly SAM, CR-SAM, LastSAM,
# GSAM, WSAM, LookSAM over several bases), whose models and batches go to the test's device; their other tests,
# and test_recipes, run on the CPU impls only.
TEST_FILES = ("tests/test_ops.py", "tests/test_ops_scaled.py", "tests/test_cvar_ops.py", "tests/test_losses.py",
              "tests/test_amp.py", "tests/test_cuda_graphs.py", "tests/test_sam.py", "tests/test_sam_family.py",
              "tests/test_gsam_wsam.py", "tests/test_looksam.py", "tests/test_bench_timing.py")
TEST_SELECTION = "cuda-cuda or cuda-triton or test_cuda_graphs or on_the_gpu"
# How the selection was sized for the budget (counted on the CPU, where the cuda ids are collected and skipped):
# it is 4096 tests (2043 cuda-cuda, 2044 cuda-triton, 8 CUDA-graph captures, 1 launch count; 104 of them the
# 20-step trajectory tests of test_sam and test_sam_family), and since GSAM, WSAM and LookSAM 48 more 20-step
# trajectory tests (test_gsam_wsam, test_looksam; on the existing ops, so few new Triton variants). The CUDA kernels are compiled by
# the build, so those tests cost milliseconds each; the Triton ones JIT-compile their kernel variants on first
# use, 0.5-2 s each, and the selection launches 955 distinct variants (kernel x constexprs x dtypes x argument
# specialization, counted by recording the launches of the selected tests with the GPU's block sizes). That is
# 8-32 CPU-minutes of compiling, so the tests run on one xdist worker per core (at most MAX_TEST_WORKERS), which
# share Triton's on-disk cache: about 1-2.5 minutes on 16 cores, within the phase's limit.
MAX_TEST_WORKERS = 16
REQUIRE_IMPLS = "cpu,cuda,triton"
REQUIRED_CUDA_IMPLS = ("cuda", "triton")

# Seconds for the whole run: under the 8-minute limit, with room for python's start and the summary.
BUDGET_S = 450
# phase: (limit, seconds held back for it while the earlier phases run). A phase runs for its limit or for what
# the budget leaves after the holds of the phases still to come, whichever is less.
PHASE_LIMITS: Dict[str, Tuple[float, float]] = {
    "build": (240, 0), "tests": (240, 120), "sanitizer": (120, 60), "bench": (180, 90)}
PHASES = tuple(PHASE_LIMITS)
# Lines of a failed phase's log printed to the console.
TAIL_LINES = 25

# Prints the impls and the extension's load error for the build check, as JSON on the last line.
IMPLS_PROBE = ("import json, fastsam, fastsam._extension as e; "
               "print(json.dumps(dict(impls=fastsam.available_impls('cuda'), error=e.extension_error())))")


class PreflightError(Exception):
    """The machine cannot run the check; the message is the one line printed."""


@dataclass
class Phase:
    name: str
    status: str = "not run"
    seconds: float = 0.0
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ------------------------------------------------------------------------------------------------ pure helpers
def arch_list(capability: Tuple[int, int]) -> str:
    """TORCH_CUDA_ARCH_LIST for one GPU: (9, 0) -> "9.0". Only this GPU's arch: each extra arch is another
    full compile of every kernel."""
    major, minor = capability
    return f"{major}.{minor}"


def xdist_workers(cpu_count: Optional[int], has_xdist: bool) -> Optional[int]:
    """pytest-xdist workers for the tests phase, None to run without xdist (not installed, or one core)."""
    if not has_xdist or not cpu_count or cpu_count < 2:
        return None
    return min(cpu_count, MAX_TEST_WORKERS)


def pytest_command(python: str, workers: Optional[int], junit: Optional[Path]) -> List[str]:
    """The tests phase's command line (run in the repository root)."""
    cmd = [python, "-m", "pytest", *TEST_FILES, "-k", TEST_SELECTION, "-q", "--durations=20"]
    if workers:
        cmd += ["-n", str(workers)]
    if junit is not None:
        cmd.append(f"--junitxml={junit}")
    return cmd


def sanitizer_command(python: str) -> List[str]:
    """compute-sanitizer memcheck over tools/gpu_smoke.py. API errors are not reported: torch's own start-up
    probes return some on purpose, and a failed launch of ours raises in the script anyway."""
    return ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1", "--report-api-errors", "no",
            python, str(ROOT / "tools" / "gpu_smoke.py")]


def bench_command(python: str, bench_args: str, out: Path) -> List[str]:
    """The benchmark on the GPU with ``bench_args``, its JSON record written to ``out``."""
    return [python, "-m", "fastsam.bench", "--device", "cuda", *shlex.split(bench_args), "--out", str(out)]


def log_dir(env: Mapping[str, str]) -> Path:
    """Where the logs, tests.xml and summary.txt go: $OUT if set, else bench/results/gpu-check/."""
    return Path(env["OUT"]) if env.get("OUT") else ROOT / "bench" / "results" / "gpu-check"


def bench_json_path(env: Mapping[str, str], date: str, gpu_label: str) -> Path:
    """$OUT/bench.json if OUT is set, else bench/results/<date>-<gpu>.json (the record to commit)."""
    if env.get("OUT"):
        return Path(env["OUT"]) / "bench.json"
    return ROOT / "bench" / "results" / f"{date}-{gpu_label}.json"


def child_env(env: Mapping[str, str], **overrides: str) -> Dict[str, str]:
    """The environment of a phase's command: the repository importable from any directory, the python's tools
    found, Triton compiling for the GPU (TRITON_INTERPRET would run it in its CPU interpreter) and "auto" meaning
    what it says (FASTSAM_IMPL would override it); plus ``overrides``."""
    out = {k: v for k, v in env.items() if k not in ("TRITON_INTERPRET", "FASTSAM_IMPL", "FASTSAM_NO_EXT")}
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # Last on PATH, shadowing nothing: the interpreter's own bin directory, where a venv that was not activated
    # keeps ninja (torch builds serially without it).
    out["PATH"] = os.pathsep.join(filter(None, [env.get("PATH"), os.path.dirname(sys.executable)]))
    out.update(overrides)
    return out


def phase_timeout(name: str, elapsed: float, budget: float = BUDGET_S) -> float:
    """Seconds phase ``name`` may run when it starts ``elapsed`` seconds into the run."""
    limit, _ = PHASE_LIMITS[name]
    later = PHASES[PHASES.index(name) + 1:]
    return max(0.0, min(limit, budget - elapsed - sum(PHASE_LIMITS[p][1] for p in later)))


def junit_counts(path: Path) -> Optional[Dict[str, int]]:
    """tests, failures, errors and skipped of a JUnit XML file (pytest's), or None if it is missing or torn."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}


def format_summary(info: Mapping[str, str], phases: Sequence[Phase], total_s: float) -> str:
    """summary.txt: the machine and versions, then each phase's status and seconds."""
    lines = [f"{k}: {v}" for k, v in info.items()]
    lines += ["", f"{'phase':10s} {'seconds':>8s}  status"]
    for p in phases:
        lines.append(f"{p.name:10s} {p.seconds:8.1f}  {p.status}" + (f"  ({p.note})" if p.note else ""))
    passed = all(p.ok for p in phases)
    lines += ["", f"total {total_s:.1f} s: {'all phases passed' if passed else 'FAILED'}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- the phases
def preflight() -> Dict[str, str]:
    """Checks torch, the GPU and nvcc without building anything; returns the facts for the summary."""
    exe = sys.executable
    try:
        import torch
    except ImportError as exc:
        raise PreflightError(f"gpu-check: {exe} cannot import torch ({exc}); run it with the GPU machine's python "
                             "(make gpu-check GPU_PYTHON=...)") from None
    if torch.version.cuda is None or not torch.cuda.is_available():
        why = "built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise PreflightError(f"gpu-check: no CUDA device visible to {exe} (torch {torch.__version__}, {why}); "
                             "run it on a GPU machine")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise PreflightError("gpu-check: nvcc is not on PATH; the CUDA kernels cannot be built (put the CUDA "
                             "toolkit's bin directory on PATH)")
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    capability = torch.cuda.get_device_capability(0)
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.splitlines()
    release = [line for line in version if "release" in line] or version[-1:] or ["version unknown"]
    return {
        "device": f"{torch.cuda.get_device_name(0)} (sm_{capability[0]}{capability[1]}), "
                  f"{torch.cuda.device_count()} visible, {os.cpu_count()} CPU cores",
        "python": f"{exe} {sys.version.split()[0]}",
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda})",
        "triton": triton_version,
        "nvcc": f"{nvcc}: {release[0].strip()}",
        "compute-sanitizer": shutil.which("compute-sanitizer") or "not on PATH",
        "ninja": shutil.which("ninja", path=child_env(os.environ)["PATH"]) or "not found (the build runs serially)",
        "arch": arch_list(capability),
    }


class Runner:
    """Runs the phases' commands with logs, time limits and the console lines."""

    def __init__(self, logs: Path, start: float):
        self.logs, self.start = logs, start
        self.phases: List[Phase] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def run(self, phase: Phase, cmd: Sequence[str], env: Mapping[str, str], deadline: float,
            mode: str = "w") -> Optional[int]:
        """Runs ``cmd`` in the repository root with stdout and stderr into the phase's log; its exit status, or
        None if it ran past ``deadline`` (monotonic seconds) and was stopped, with every process it started."""
        log = self.logs / f"{phase.name}.log"
        with open(log, mode) as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            # A session of its own, so that a timeout stops its children too (pytest-xdist's workers, ninja's jobs).
            proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(env), stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                return proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._stop(proc)
                f.write("\n[gpu-check] stopped: past the phase's time limit\n")
                return None
            except BaseException:
                self._stop(proc)
                raise

    @staticmethod
    def _stop(proc: subprocess.Popen) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=5)
                return
            except subprocess.TimeoutExpired:
                continue

    def report(self, phase: Phase, seconds: float) -> None:
        """Records the phase and prints its line (and the tail of its log if it failed)."""
        phase.seconds = seconds
        self.phases.append(phase)
        print(f"[gpu-check] {phase.name}: {seconds:.1f} s {phase.status}" + (f" ({phase.note})" if phase.note else ""),
              flush=True)
        log = self.logs / f"{phase.name}.log"
        if not phase.ok and log.exists():
            tail = log.read_text(errors="replace").splitlines()[-TAIL_LINES:]
            print("\n".join(f"    {line}" for line in [f"last lines of {log}:"] + tail), file=sys.stderr, flush=True)


def status_of(rc: Optional[int], timeout: float) -> str:
    """A phase's status from its command's exit status (None: stopped at its time limit)."""
    return "ok" if rc == 0 else f"timeout after {timeout:.0f} s" if rc is None else f"failed (exit {rc})"


def build_phase(runner: Runner, info: Mapping[str, str], env: Mapping[str, str]) -> Phase:
    """Builds fastsam._C in place for this python and GPU, then checks that cuda and triton are available."""
    phase, t0 = Phase("build"), time.monotonic()
    deadline = t0 + phase_timeout("build", runner.elapsed())
    # --force: setuptools skips an extension whose .so is newer than its sources (a CPU-only build left by an
    # earlier run would stay); ninja still recompiles only the objects that are out of date.
    # FASTSAM_FORCE_CUDA: the CUDA kernels whatever setup.py's own probe of the GPU says.
    build_env = child_env(env, TORCH_CUDA_ARCH_LIST=info["arch"], MAX_JOBS=str(os.cpu_count() or 1),
                          FASTSAM_FORCE_CUDA="1")
    rc = runner.run(phase, [sys.executable, "setup.py", "build_ext", "--inplace", "--force"], build_env, deadline)
    phase.status = status_of(rc, deadline - t0)
    if rc == 0:
        phase.status, phase.note = check_impls(runner.logs / "build.log", env, deadline)
    runner.report(phase, time.monotonic() - t0)
    return phase


def check_impls(log: Path, env: Mapping[str, str], deadline: float) -> Tuple[str, str]:
    """Status and note of the build's last check: a fresh python must find the cuda and triton impls. Its
    output is appended to ``log``."""
    try:
        probe = subprocess.run([sys.executable, "-c", IMPLS_PROBE], cwd=ROOT, env=child_env(env), capture_output=True,
                               text=True, timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return "failed: the check of the impls timed out", ""
    with open(log, "a") as f:
        f.write(f"$ python -c {shlex.quote(IMPLS_PROBE)}\n{probe.stdout}{probe.stderr}")
    try:
        found = json.loads(probe.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return f"failed: fastsam does not import (exit {probe.returncode})", ""
    missing = [i for i in REQUIRED_CUDA_IMPLS if i not in found["impls"]]
    note = f"impls on cuda: {', '.join(found['impls'])}"
    if not missing:
        return "ok", note
    print(f"gpu-check: the build lacks {', '.join(missing)}: {found['error']}", file=sys.stderr)
    return f"failed: {', '.join(missing)} not available", f"{note}; extension_error(): {found['error']}"


def tests_phase(runner: Runner, env: Mapping[str, str]) -> Phase:
    """Runs the device tests on xdist workers (where pytest-xdist is installed), with a JUnit report."""
    phase, t0 = Phase("tests"), time.monotonic()
    timeout = phase_timeout("tests", runner.elapsed())
    workers = xdist_workers(os.cpu_count(), importlib.util.find_spec("xdist") is not None)
    junit = runner.logs / "tests.xml"
    junit.unlink(missing_ok=True)  # the counts below must be this run's
    # One intra-op thread per worker: the workers already fill the cores, and the tests' CPU work (inputs,
    # references on small tensors) gains nothing from more.
    test_env = child_env(env, FASTSAM_REQUIRE_IMPLS=REQUIRE_IMPLS, OMP_NUM_THREADS="1")
    rc = runner.run(phase, pytest_command(sys.executable, workers, junit), test_env, t0 + timeout)
    phase.status = status_of(rc, timeout)
    phase.note = f"{workers or 'no'} xdist workers"
    counts = junit_counts(junit)
    if counts is not None:
        phase.note += (f"; {counts['tests']} tests, {counts['failures']} failed, {counts['errors']} errors, "
                       f"{counts['skipped']} skipped")
    runner.report(phase, time.monotonic() - t0)
    return phase


def sanitizer_phase(runner: Runner, env: Mapping[str, str]) -> Phase:
    """Runs tools/gpu_smoke.py under compute-sanitizer memcheck."""
    phase, t0 = Phase("sanitizer"), time.monotonic()
    timeout = phase_timeout("sanitizer", runner.elapsed())
    if shutil.which("compute-sanitizer") is None:
        phase.status = "failed: compute-sanitizer is not on PATH"
    else:
        # Without the caching allocator every tensor is its own allocation, so memcheck sees an access past a
        # tensor's end (inside a cached block it would land in memory the allocator owns, unreported).
        rc = runner.run(phase, sanitizer_command(sys.executable), child_env(env, PYTORCH_NO_CUDA_MEMORY_CACHING="1"),
                        t0 + timeout)
        phase.status = status_of(rc, timeout)
    runner.report(phase, time.monotonic() - t0)
    return phase


def bench_phase(runner: Runner, env: Mapping[str, str], bench_args: str) -> Tuple[Phase, Optional[Path]]:
    """Runs the benchmark; its tables (stdout) and progress (stderr) go to bench.log. Returns the phase and the
    JSON record's path (None if the benchmark wrote none; a partial one, "complete": false, if it was stopped)."""
    phase, t0 = Phase("bench"), time.monotonic()
    timeout = phase_timeout("bench", runner.elapsed())
    try:
        label = gpu_label()
    except Exception as exc:  # a broken fastsam.bench fails this phase, not the run and its summary
        phase.status = f"failed: no results file name from fastsam.bench.report ({exc!r})"
        runner.report(phase, time.monotonic() - t0)
        return phase, None
    date = datetime.date.today().isoformat()
    out = bench_json_path(env, date, label)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)  # what is there afterwards is this run's
    rc = runner.run(phase, bench_command(sys.executable, bench_args, out), child_env(env), t0 + timeout)
    phase.status = status_of(rc, timeout)
    if rc != 0 and out.exists():  # the benchmark rewrites its record after each part: keep what it measured
        phase.note = "partial record (\"complete\": false)"
    elif env.get("OUT") and rc == 0:
        phase.note = f"commit as bench/results/{date}-{label}.json"
    runner.report(phase, time.monotonic() - t0)
    return phase, out if out.exists() else None


def gpu_label() -> str:
    """The GPU's part of the results file name, as the benchmark names it (fastsam.bench.report.device_label)."""
    import torch

    if str(ROOT) not in sys.path:  # run as a script, only tools/ is on the path
        sys.path.insert(0, str(ROOT))
    from fastsam.bench.report import device_label

    return device_label(torch.device("cuda"))


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the phases; returns the exit status (0 all passed, 1 a phase failed, 2 the preflight failed)."""
    parser = argparse.ArgumentParser(prog="tools/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench-args", default=BENCH_ARGS, help=f"flags of the benchmark (default: {BENCH_ARGS})")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        info = preflight()
    except PreflightError as exc:
        print(exc, file=sys.stderr)
        return 2
    env = dict(os.environ)
    logs = log_dir(env)
    logs.mkdir(parents=True, exist_ok=True)
    info["logs"] = str(logs)
    print(f"[gpu-check] preflight: {time.monotonic() - start:.1f} s ok ({info['device']}; torch {info['torch']}, "
          f"triton {info['triton']}); logs in {logs}", flush=True)
    runner = Runner(logs, start)
    if build_phase(runner, info, env).ok:
        tests_phase(runner, env)
        sanitizer_phase(runner, env)
        _, record = bench_phase(runner, env, args.bench_args)
        if record is not None:
            info = dict(info, bench=str(record))
    else:  # nothing to test without the extension
        runner.phases += [Phase(name, "not run: the build failed") for name in PHASES[1:]]
    summary = format_summary(info, runner.phases, time.monotonic() - start)
    (logs / "summary.txt").write_text(summary)
    print(summary, end="")
    return 0 if all(p.ok for p in runner.phases) else 1


if __name__ == "__main__":
    sys.exit(main())
