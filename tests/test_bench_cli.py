"""python -m fastsam.bench: the table, the JSON record, and clear errors for bad flags."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastsam.bench.cli import parse_args
from fastsam.bench.peers import rows

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "r.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # tests/conftest.py sets it
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "fastsam.bench", "--quick", "--device", "cpu", "--shapes", "mlp",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    expected = rows("cpu")
    table = [line.split() for line in proc.stdout.splitlines()]
    labels = {cells[3] for cells in table if cells and cells[0] == "mlp"}
    assert labels >= {"loop", "foreach", "bw", *(f"fastsam:{i}" for i in expected[2:])}
    record = json.loads(out.read_text())
    assert [r["impl"] for r in record["rows"]] == expected
    assert record["shapes"]["mlp"]["params"] == 1_782_536 and record["bandwidth_GBps"] > 0
    assert all(r["median_ms"] > 0 and r["reps"] == len(r["times_ms"]) for r in record["rows"])
    assert record["rows"][0]["speedup_vs_loop"] == 1.0
    assert record["torch"] and record["date"] and record["device"] == "cpu"


@pytest.mark.parametrize("argv,word", [
    (["--shapes", "mlp,alexnet"], "alexnet"),
    (["--shapes", ","], "empty"),
    (["--dtype", "fp8"], "fp8"),
    (["--device", "tpu"], "tpu"),
    (["--impl", "cuda"], "not available on cpu"),
    (["--impl", "nope"], "nope"),
    (["--reps", "0"], "positive"),
    (["--reps", "x"], "positive"),
])
def test_bad_flags_are_argparse_errors(argv, word, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--device", "cpu", *argv] if argv[0] != "--device" else argv)
    assert exc.value.code == 2 and word in capsys.readouterr().err


def test_defaults():
    args = parse_args(["--device", "cpu", "--quick"])
    assert args.shapes == ["mlp", "resnet18"] and args.impl == rows("cpu")[2:] and args.dtype == "fp32"
    assert parse_args(["--device", "cpu", "--shapes", "vit_b16,mlp,vit_b16"]).shapes == ["vit_b16", "mlp"]
