"""python -m fastsam.bench: the table, the JSON record, and clear errors for bad flags."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastsam.bench import cli
from fastsam.bench.cli import parse_args
from fastsam.bench.cvar_peers import cvar_rows
from fastsam.bench.methods import METHODS
from fastsam.bench.peers import rows
from fastsam.bench.report import format_table

ROOT = Path(__file__).resolve().parents[1]


def _bench(tmp_path, *argv):
    out = tmp_path / "r.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # tests/conftest.py sets it
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "fastsam.bench", "--quick", "--device", "cpu", "--shapes", "mlp",
                           "--out", str(out), *argv], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    table = [line.split() for line in proc.stdout.splitlines()]
    return table, json.loads(out.read_text())


def test_quick_run_prints_the_table_and_writes_json(tmp_path):
    """All tables by default: SAM's, CVaR's and the affect one's (tests/test_bench_cvar.py and
    tests/test_bench_affect.py check the latter two's contents)."""
    table, record = _bench(tmp_path, "--methods", "sam", "--cvar-rows", "32")
    expected = rows("cpu")
    labels = {cells[4] for cells in table if cells and cells[0] == "mlp"}
    assert labels >= {"loop", "foreach", "bw", *(f"fastsam:{i}" for i in expected[2:])}
    assert [r["impl"] for r in record["rows"]] == expected
    assert record["shapes"]["mlp"]["params"] == 1_782_536 and record["bandwidth_GBps"] > 0
    assert all(r["median_ms"] > 0 and r["reps"] == len(r["times_ms"]) for r in record["rows"])
    assert record["rows"][0]["speedup_vs_loop"] == 1.0
    assert record["torch"] and record["date"] and record["device"] == "cpu"
    # the fields of the SAM-only record are still there, with SAM's meaning
    mlp = record["shapes"]["mlp"]
    assert record["bytes_per_param"] == 40 and mlp["loop_ms"] == record["rows"][0]["median_ms"]
    assert mlp["limit_ms"] == pytest.approx(record["rows"][0]["median_ms"] / record["rows"][0]["x_limit"])
    assert record["tables"] == ["sam", "cvar", "affect"]
    assert [(r["n"], r["impl"]) for r in record["cvar"]["rows"]] == [(32, r) for r in cvar_rows("cpu")]
    assert ["CVaR", "losses:"] in [cells[:2] for cells in table]
    assert [r["impl"] for r in record["affect"]["rows"]] == rows("cpu")
    assert ["Affect", "MLP"] in [cells[:2] for cells in table]


def test_methods_flag_adds_a_block_per_method(tmp_path, monkeypatch, capsys):
    """--quick --methods, in process on a small shape set (the plumbing, not the timings: a few seconds)."""
    monkeypatch.setitem(cli.SHAPES, "tiny", [("w", (64, 32)), ("b", (64,)), ("c", (8, 4, 3, 3))])
    monkeypatch.setattr(cli, "copy_bandwidth", lambda device, reps=7: 10e9)
    methods = [m for m in METHODS if m != "sam"]
    out = tmp_path / "r.json"
    assert cli.main(["--quick", "--device", "cpu", "--tables", "sam", "--shapes", "tiny",
                     "--methods", ",".join(methods), "--reps", "2", "--threads", str(torch.get_num_threads()),
                     "--out", str(out)]) == 0
    table = [line.split() for line in capsys.readouterr().out.splitlines()]
    record = json.loads(out.read_text())
    expected = rows("cpu")
    printed = [(cells[3], cells[4]) for cells in table if cells and cells[0] == "tiny"]
    labels = ["loop", "foreach", *(f"fastsam:{i}" for i in expected[2:]), "bw"]
    assert printed == [(m, label) for m in methods for label in labels]
    assert [(r["method"], r["impl"]) for r in record["rows"]] == [(m, r) for m in methods for r in expected]
    assert "loop_ms" not in record["shapes"]["tiny"]  # SAM did not run
    for m in methods:
        block = [r for r in record["rows"] if r["method"] == m]
        per = record["shapes"]["tiny"]["methods"][m]
        assert block[0]["speedup_vs_loop"] == 1.0 and per["loop_ms"] == block[0]["median_ms"]
        assert record["methods"][m]["bytes_per_param"] == 4 * METHODS[m].words_per_param
        assert per["limit_ms"] == pytest.approx(1e3 * 4 * METHODS[m].words_per_param * (2048 + 64 + 288) / 10e9)
        assert per["limit_ms"] == pytest.approx(block[0]["median_ms"] / block[0]["x_limit"])
        assert all(r["reps"] == 2 and r["median_ms"] > 0 for r in block)
    assert record["methods"]["crsam"]["steps"] == ["first_step", "second_step", "third_step"]


def test_sam_only_records_still_print():
    """A record written before --methods existed (no "method" fields) prints as SAM."""
    row = dict(shapes="mlp", impl="loop", kind="peer", reps=3, median_ms=20.0, speedup_vs_loop=1.0, x_limit=5.0)
    record = dict(device="cpu", device_name="x", threads=1, dtype="fp32", torch="2.x", bandwidth_GBps=20.0,
                  bytes_per_param=40, load_avg_before=0.0, load_avg_after=0.0,
                  shapes={"mlp": dict(params=1_782_536, tensors=14, limit_ms=4.0, loop_ms=20.0)},
                  rows=[row, dict(row, impl="cpu", kind="fastsam", median_ms=4.0, speedup_vs_loop=5.0, x_limit=1.0)])
    lines = [line.split() for line in format_table(record).splitlines()]
    assert [cells[3:5] for cells in lines if cells and cells[0] == "mlp"] == [
        ["sam", "loop"], ["sam", "fastsam:cpu"], ["sam", "bw"]]


@pytest.mark.parametrize("argv,word", [
    (["--shapes", "mlp,alexnet"], "alexnet"),
    (["--shapes", ","], "empty"),
    (["--methods", "sam,gsam"], "gsam"),
    (["--dtype", "fp8"], "fp8"),
    (["--device", "tpu"], "tpu"),
    (["--impl", "cuda"], "not available on cpu"),
    (["--impl", "nope"], "nope"),
    (["--reps", "0"], "positive"),
    (["--reps", "x"], "positive"),
    (["--tables", "sam,loss"], "loss"),
    (["--cvar-rows", "32,0"], "positive"),
    (["--cvar-rows", "x"], "positive"),
    (["--cvar-rows", ","], "empty"),
    (["--cvar-alpha", "0"], "(0, 1]"),
    (["--cvar-alpha", "1.5"], "(0, 1]"),
])
def test_bad_flags_are_argparse_errors(argv, word, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--device", "cpu", *argv] if argv[0] != "--device" else argv)
    assert exc.value.code == 2 and word in capsys.readouterr().err


def test_defaults():
    args = parse_args(["--device", "cpu", "--quick"])
    assert args.shapes == ["mlp", "resnet18"] and args.impl == rows("cpu")[2:] and args.dtype == "fp32"
    assert args.methods == list(METHODS) == ["sam", "friendly_sam", "crsam", "lastsam", "lastsam_orthogonal"]
    assert parse_args(["--device", "cpu", "--shapes", "vit_b16,mlp,vit_b16"]).shapes == ["vit_b16", "mlp"]
    assert parse_args(["--device", "cpu", "--methods", "crsam,sam,crsam"]).methods == ["crsam", "sam"]
