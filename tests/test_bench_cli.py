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
from fastsam.bench.methods import METHODS, SAM_PEERS, GradReset
from fastsam.bench.peers import rows

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
    table, record = _bench(tmp_path, "--methods", "sam", "--cvar-rows", "32", "--affect-rows", "64")
    expected = [r for r in METHODS["sam"].rows("cpu") if r != "torch"]  # the reference: only if --impl names it
    assert expected[:3] == ["loop", "foreach", "compiled"] and "fastsam:torch" not in {c[4] for c in table if len(c) > 4}
    labels = {cells[4] for cells in table if cells and cells[0] == "mlp"}
    assert labels == {"bw", *(r if r in SAM_PEERS else f"fastsam:{r}" for r in expected)}
    assert [r["impl"] for r in record["rows"]] == expected
    mlp = record["shapes"]["mlp"]
    assert mlp["params"] == 1_782_536 and mlp["dtype"] == "fp32" and record["dtype"] is None
    sam = mlp["methods"]["sam"]
    assert set(sam["stream_GBps"]) == {"read", "copy", "triad", "mix"} == set(record["stream_kernels"])
    assert sam["bandwidth_GBps"] == max(sam["stream_GBps"].values()) > 0
    assert all(r["median_ms"] > 0 and r["reps"] == len(r["times_ms"]) for r in record["rows"])
    assert record["rows"][0]["speedup_vs_loop"] == 1.0 and record["rows"][2]["speedup_vs_compiled"] == 1.0
    by_impl = {r["impl"]: r for r in record["rows"]}
    assert by_impl["compiled"]["compile_s"] > 0 and by_impl["loop"]["compile_s"] is None
    assert all(r["launches"] is None for r in record["rows"])  # no GPU launches on the CPU
    assert record["torch"] and record["date"] and record["device"] == "cpu"
    assert sam["loop_ms"] == record["rows"][0]["median_ms"]
    assert sam["limit_ms"] == pytest.approx(1e3 * 10 * 4 * 1_782_536 / (1e9 * sam["bandwidth_GBps"]))
    assert sam["limit_ms"] == pytest.approx(record["rows"][0]["median_ms"] / record["rows"][0]["x_limit"])
    assert record["tables"] == ["sam", "cvar", "affect"]
    assert [(r["n"], r["impl"]) for r in record["cvar"]["rows"]] == [(32, r) for r in cvar_rows("cpu")]
    assert ["CVaR", "losses:"] in [cells[:2] for cells in table]
    assert [r["impl"] for r in record["affect"]["rows"]] == rows("cpu")
    assert ["Affect", "MLP"] in [cells[:2] for cells in table]


def test_methods_flag_adds_a_block_per_method(tmp_path, monkeypatch, capsys):
    """--quick --methods, in process on a small shape set (the plumbing, not the timings)."""
    monkeypatch.setitem(cli.SHAPES, "tiny", [("w", (64, 32)), ("b", (64,)), ("c", (8, 4, 3, 3))])
    monkeypatch.setitem(cli.SHAPE_DTYPES, "tiny", "bf16")
    streams = dict(read=10e9, copy=5e9, triad=6e9, mix=8e9)
    monkeypatch.setattr(cli.stream, "bandwidths", lambda nbytes, seconds: streams)
    methods = ["crsam", "lastsam_orthogonal"]  # no pytorch_optimizer row; SAM and Friendly SAM have one
    written = []  # the record is rewritten after each method, so a run stopped part-way leaves what it measured
    write_json = cli.write_json
    monkeypatch.setattr(cli, "write_json", lambda r, p: written.append((r["complete"], len(r["rows"]))) or
                        write_json(r, p))
    out = tmp_path / "r.json"
    assert cli.main(["--quick", "--device", "cpu", "--tables", "sam", "--shapes", "tiny",
                     "--methods", ",".join(methods), "--reps", "2", "--threads", str(torch.get_num_threads()),
                     "--out", str(out)]) == 0
    table = [line.split() for line in capsys.readouterr().out.splitlines()]
    record = json.loads(out.read_text())
    expected = ["loop", "foreach", "compiled", *(i for i in rows("cpu")[2:] if i != "torch")]
    assert written == [(False, len(expected)), (False, 2 * len(expected)), (True, 2 * len(expected))]
    assert record["complete"] is True
    printed = [(cells[3], cells[4]) for cells in table if cells and cells[0] == "tiny"]
    labels = ["loop", "foreach", "compiled", *(f"fastsam:{i}" for i in expected[3:]), "bw"]
    assert printed == [(m, label) for m in methods for label in labels]
    assert [(r["method"], r["impl"]) for r in record["rows"]] == [(m, r) for m in methods for r in expected]
    tiny = record["shapes"]["tiny"]
    assert tiny["dtype"] == "bf16" and tiny["element_size"] == 2
    for m in methods:
        block = [r for r in record["rows"] if r["method"] == m]
        per = tiny["methods"][m]
        assert per["bandwidth_GBps"] == 10.0 and per["stream_GBps"]["mix"] == 8.0
        assert block[0]["speedup_vs_loop"] == 1.0 and per["loop_ms"] == block[0]["median_ms"]
        assert record["methods"][m]["words_per_param"] == METHODS[m].words_per_param
        # the best of the STREAM kernels, and the set's own dtype (bf16: 2 bytes a word)
        assert per["limit_ms"] == pytest.approx(1e3 * 2 * METHODS[m].words_per_param * (2048 + 64 + 288) / 10e9)
        assert per["limit_ms"] == pytest.approx(block[0]["median_ms"] / block[0]["x_limit"])
        assert all(r["reps"] == 2 and r["median_ms"] > 0 for r in block)
        compiled = next(r for r in block if r["impl"] == "compiled")
        assert all(r["speedup_vs_compiled"] == pytest.approx(compiled["median_ms"] / r["median_ms"]) for r in block)
    assert record["methods"]["crsam"]["steps"] == ["first_step", "second_step", "third_step"]


def test_looksam_rows_are_per_step_of_a_cycle(tmp_path, monkeypatch, capsys):
    """LookSAM's timed call is a cycle of k steps: its times, limit ratio and compile time are per step, every row
    shares one grad reset as its prepare, and the table names the cycle (timings faked: the plumbing)."""
    monkeypatch.setitem(cli.SHAPES, "tiny", [("w", (64, 32)), ("b", (64,))])
    monkeypatch.setitem(cli.SHAPE_DTYPES, "tiny", "fp32")
    monkeypatch.setattr(cli.stream, "bandwidths", lambda nbytes, seconds: dict(read=10e9, copy=5e9, triad=6e9,
                                                                               mix=8e9))
    prepares = {}

    def paired(fns, device, **timing):  # each call 10 ms, the first 1 s
        prepares.update({name: getattr(fn, "prepare", None) for name, fn in fns.items()})
        return {name: dict(first_s=1.0, times=[0.010, 0.010]) for name in fns}
    monkeypatch.setattr(cli, "time_paired", paired)
    out = tmp_path / "r.json"
    assert cli.main(["--quick", "--device", "cpu", "--tables", "sam", "--shapes", "tiny", "--methods", "looksam",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    method = METHODS["looksam"]
    assert method.cycle == 5 and record["methods"]["looksam"]["steps_per_call"] == 5
    assert record["methods"]["looksam"]["passes_per_100_steps"] == 120
    rows_ = record["rows"]
    assert [r["impl"] for r in rows_] == [r for r in method.rows("cpu") if r != "torch"]
    assert ("pytorch_optimizer" in method.rows("cpu")) == cli.po_peers.available()  # its LookSAM class
    assert all(r["median_ms"] == pytest.approx(2.0) and r["first_call_ms"] == pytest.approx(1000.0) for r in rows_)
    compiled = next(r for r in rows_ if r["impl"] == "compiled")
    assert compiled["compile_s"] == pytest.approx(1.0 - 0.010)
    limit = 1e3 * 4 * method.words_per_param * (2048 + 64) / 10e9  # per step, fp32
    assert record["shapes"]["tiny"]["methods"]["looksam"]["limit_ms"] == pytest.approx(limit)
    assert rows_[0]["x_limit"] == pytest.approx(2.0 / limit)
    reset = prepares["loop"]
    assert isinstance(reset, GradReset)
    assert all(p is reset for name, p in prepares.items() if not name.startswith(cli.STREAM))
    assert "looksam: (first_step + second_step + 4 x step) / 5" in printed and "looksam 8.6" in printed


@pytest.mark.parametrize("argv,word", [
    (["--shapes", "mlp,alexnet"], "alexnet"),
    (["--shapes", ","], "empty"),
    (["--methods", "sam,bsam"], "bsam"),
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
    assert args.shapes == ["mlp", "resnet18"] and args.impl == rows("cpu")[2:] and args.dtype is None
    assert args.sam_impl == [i for i in args.impl if i != "torch"]
    assert parse_args(["--device", "cpu", "--impl", "torch"]).sam_impl == ["torch"]
    assert parse_args(["--device", "cpu"]).shapes == ["mlp", "resnet18", "vit_b16"]  # GPT-2: only when named
    assert parse_args(["--device", "cpu", "--shapes", "gpt2_medium"]).shapes == ["gpt2_medium"]
    assert args.methods == list(METHODS) == ["sam", "friendly_sam", "crsam", "lastsam", "lastsam_orthogonal", "gsam",
                                             "wsam", "looksam"]
    assert parse_args(["--device", "cpu", "--shapes", "vit_b16,mlp,vit_b16"]).shapes == ["vit_b16", "mlp"]
    assert parse_args(["--device", "cpu", "--methods", "crsam,sam,crsam"]).methods == ["crsam", "sam"]
