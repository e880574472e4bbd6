"""tools/gpu_check.py (`make gpu-check`) on a machine without a GPU: it refuses at once, in one line, before
building anything; its pure helpers; its device test selection; and tools/gpu_smoke.py's calls, on the CPU."""
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastsam import _extension

ROOT = Path(__file__).resolve().parent.parent
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the check would run for real")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gc = _load("gpu_check")


def _built_objects():
    """The extension files a build would (re)write, with their modification times."""
    return {p: p.stat().st_mtime for p in (ROOT / "fastsam").glob("_C*.so")}


@no_gpu
def test_without_a_gpu_it_refuses_at_once_in_one_line(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    default_logs = ROOT / "bench" / "results" / "gpu-check"
    had_logs, built = default_logs.exists(), _built_objects()
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py")], env=dict(env, OUT=str(out)),
                          capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("gpu-check: no CUDA device visible to ")
    assert sys.executable in lines[0] and torch.__version__ in lines[0]
    assert proc.stdout == ""
    # Refused before any phase: nothing written, nothing built (a build takes minutes; this is python + torch).
    assert elapsed < 30
    assert list(out.iterdir()) == []
    assert default_logs.exists() == had_logs
    assert _built_objects() == built


@no_gpu
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_gpu_check_runs_the_script_with_gpu_python():
    # run as a top-level make (the suite itself may run under `make test`, whose variables a child make inherits)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    dry = subprocess.run(["make", "-n", "gpu-check", "GPU_PYTHON=/opt/x/python3"], cwd=ROOT, capture_output=True,
                         text=True, check=True, env=env)
    assert "/opt/x/python3 tools/gpu_check.py" in dry.stdout
    default = subprocess.run(["make", "-n", "gpu-check"], cwd=ROOT, capture_output=True, text=True, check=True,
                             env=env)
    assert default.stdout.startswith("python3 tools/gpu_check.py")  # the machine's python, not .venv's
    real = subprocess.run(["make", "gpu-check", f"GPU_PYTHON={sys.executable}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)
    assert real.returncode != 0
    assert "gpu-check: no CUDA device visible to " in real.stderr


@pytest.mark.parametrize("capability,expected", [((9, 0), "9.0"), ((8, 6), "8.6"), ((10, 0), "10.0"),
                                                 ((12, 1), "12.1")])
def test_arch_list_is_the_gpus_own(capability, expected):
    assert gc.arch_list(capability) == expected


def test_xdist_workers():
    assert gc.xdist_workers(16, True) == 16
    assert gc.xdist_workers(64, True) == gc.MAX_TEST_WORKERS
    assert gc.xdist_workers(4, True) == 4
    assert gc.xdist_workers(16, False) is None  # no pytest-xdist: one process
    assert gc.xdist_workers(1, True) is None
    assert gc.xdist_workers(None, True) is None


def test_pytest_command(tmp_path):
    cmd = gc.pytest_command("/py", 8, tmp_path / "tests.xml")
    assert cmd[:3] == ["/py", "-m", "pytest"]
    assert cmd[cmd.index("-k") + 1] == gc.TEST_SELECTION
    assert cmd[cmd.index("-n") + 1] == "8"
    assert f"--junitxml={tmp_path / 'tests.xml'}" in cmd
    assert all((ROOT / f).is_file() for f in gc.TEST_FILES)
    serial = gc.pytest_command("/py", None, None)
    assert "-n" not in serial and not any(a.startswith("--junitxml") for a in serial)


def test_the_selection_is_the_device_tests():
    """Collected here (the cuda ids are collected, and skipped, without a GPU): only cuda-device ids, and all
    of those of the selected files."""
    cmd = gc.pytest_command(sys.executable, None, None) + ["--collect-only", "-p", "no:cacheprovider"]
    env = dict(os.environ, FASTSAM_REQUIRE_IMPLS=gc.REQUIRE_IMPLS)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert len(ids) > 3000  # 4096 when this was written
    device = [i for i in ids if "cuda-cuda]" in i or "cuda-triton]" in i or i.startswith("tests/test_cuda_graphs.py")
              or i.endswith("_on_the_gpu")]
    assert device == ids
    assert any("cuda-cuda]" in i for i in ids) and any("cuda-triton]" in i for i in ids)


def test_phase_timeouts_keep_the_later_phases_time():
    # at the start every phase gets its limit or less, and the holds of the later phases are kept back
    holds = sum(gc.PHASE_LIMITS[p][1] for p in gc.PHASES[1:])
    assert gc.phase_timeout("build", 5.0) == min(gc.PHASE_LIMITS["build"][0], gc.BUDGET_S - 5.0 - holds)
    assert gc.phase_timeout("bench", 0.0) == gc.PHASE_LIMITS["bench"][0]
    assert gc.phase_timeout("bench", gc.BUDGET_S - 30) == 30
    assert gc.phase_timeout("tests", gc.BUDGET_S) == 0
    # the limits alone, if each phase used all of its time, still end within the budget
    elapsed = 0.0
    for name in gc.PHASES:
        elapsed += gc.phase_timeout(name, elapsed)
    assert elapsed <= gc.BUDGET_S < 8 * 60


def test_log_dir_and_bench_record_paths(tmp_path):
    assert gc.log_dir({"OUT": str(tmp_path)}) == tmp_path
    assert gc.log_dir({}) == gc.log_dir({"OUT": ""}) == ROOT / "bench" / "results" / "gpu-check"
    assert gc.bench_json_path({"OUT": str(tmp_path)}, "2026-01-02", "nvidia-h100") == tmp_path / "bench.json"
    assert gc.bench_json_path({}, "2026-01-02", "nvidia-h100") == ROOT / "bench/results/2026-01-02-nvidia-h100.json"


def test_child_env_compiles_triton_for_the_gpu():
    env = gc.child_env({"TRITON_INTERPRET": "1", "FASTSAM_IMPL": "torch", "PYTHONPATH": "/x", "HOME": "/h",
                        "PATH": "/usr/bin"}, A="1")
    assert "TRITON_INTERPRET" not in env and "FASTSAM_IMPL" not in env
    assert env["PYTHONPATH"] == os.pathsep.join([str(ROOT), "/x"])
    assert env["PATH"] == os.pathsep.join(["/usr/bin", os.path.dirname(sys.executable)])  # a venv's ninja, last
    assert env["HOME"] == "/h" and env["A"] == "1"


def test_bench_command_keeps_the_flags():
    cmd = gc.bench_command("/py", gc.BENCH_ARGS + ' --tag "h100 run"', Path("/o/bench.json"))
    assert cmd[:5] == ["/py", "-m", "fastsam.bench", "--device", "cuda"]
    assert "--tables" in cmd and "h100 run" in cmd
    assert cmd[-2:] == ["--out", "/o/bench.json"]


def test_junit_counts_and_summary(tmp_path):
    xml = tmp_path / "tests.xml"
    xml.write_text('<testsuites><testsuite name="pytest" tests="10" failures="1" errors="0" skipped="2"/>'
                   "</testsuites>")
    assert gc.junit_counts(xml) == dict(tests=10, failures=1, errors=0, skipped=2)
    assert gc.junit_counts(tmp_path / "missing.xml") is None
    phases = [gc.Phase("build", "ok", 93.24), gc.Phase("tests", "failed (exit 1)", 120.0, "16 xdist workers")]
    text = gc.format_summary({"device": "NVIDIA H100 (sm_90)", "torch": "2.11.0+cu130 (CUDA 13.0)"}, phases, 250.0)
    assert "device: NVIDIA H100 (sm_90)" in text and "torch: 2.11.0+cu130" in text
    assert "build          93.2  ok" in text
    assert "tests         120.0  failed (exit 1)  (16 xdist workers)" in text
    assert text.rstrip().endswith("FAILED")
    assert gc.format_summary({}, phases[:1], 93.3).rstrip().endswith("all phases passed")


def test_runner_stops_a_phase_at_its_deadline(tmp_path):
    runner = gc.Runner(tmp_path, time.monotonic())
    phase = gc.Phase("tests")
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
           "print('started', flush=True); time.sleep(60)"
    t0 = time.monotonic()
    assert runner.run(phase, [sys.executable, "-c", code], dict(os.environ), time.monotonic() + 3) is None
    assert time.monotonic() - t0 < 20
    log = (tmp_path / "tests.log").read_text()
    assert "started" in log and "stopped: past the phase's time limit" in log
    assert runner.run(phase, [sys.executable, "-c", "print('hi')"], dict(os.environ), time.monotonic() + 60) == 0


def test_smoke_script_calls_every_op_on_the_cpu(capsys):
    """gpu_smoke's calls are valid (argument order, shapes, dtypes), checked with the CPU impl: on a GPU the
    same calls run with impl cuda under the sanitizer."""
    impl = "cpu" if _extension.impl_works_on("cpu", "cpu") else "torch"
    assert _load("gpu_smoke").main(["--device", "cpu", "--impl", impl]) == 0
    assert f"training step ok: {impl} on cpu" in capsys.readouterr().out


def test_every_file_with_device_tests_is_selected():
    """A test file that parametrizes over the impls (ALL_IMPLS, impl_params) or has GPU-only tests is in
    TEST_FILES: otherwise its CUDA and Triton ids never run, here (skipped) nor on a GPU."""
    marks = ("ALL_IMPLS", "impl_params", "_on_the_gpu")
    files = sorted(f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")
                   if p.name != "test_gpu_check.py" and any(m in p.read_text() for m in marks))
    assert files and set(files) <= set(gc.TEST_FILES), sorted(set(files) - set(gc.TEST_FILES))
