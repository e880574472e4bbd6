"""python -m fastsam.affect end to end on CPU: make-demo -> extract -> train -> evaluate, and its errors.

The F1 of metrics.json is recomputed here from the predictions CSV and the annotation files alone, with
counting code of this test (not fastsam.affect.metrics), so the two paths check each other.
"""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("PIL")

from fastsam.affect.cli import main  # noqa: E402
from fastsam.affect.predictions import read_predictions, write_predictions  # noqa: E402
from fastsam.affect.tasks import get_task  # noqa: E402


def run_cli(*args):
    assert main([str(a) for a in args]) == 0


def annotation_labels(ann_dir, image):
    """The label of ``video/00007.jpg`` read straight from ``<video>.txt``: line 7 after the header."""
    video, name = image.split("/")
    with open(os.path.join(ann_dir, video + ".txt")) as f:
        lines = f.read().splitlines()
    return [int(v) for v in lines[int(name[:5])].split(",")]


def f1_by_counting(pred, target, classes):
    """Per-class F1 from explicit counts; 0 for a class never predicted nor present."""
    scores = []
    for c in range(classes):
        tp = sum(p == c and t == c for p, t in zip(pred, target))
        fp = sum(p == c and t != c for p, t in zip(pred, target))
        fn = sum(p != c and t == c for p, t in zip(pred, target))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return scores


AU_COLUMNS = ["image", "AU1", "AU2", "AU4", "AU6", "AU7", "AU10", "AU12", "AU15", "AU23", "AU24", "AU25", "AU26"]


def recomputed_f1(predictions_csv, ann_dir, task):
    """F1 from the CSV read with the csv module: 13 columns (image + one 0/1 per AU) or image,expression."""
    with open(predictions_csv, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == (AU_COLUMNS if task.multilabel else ["image", "expression"])
    assert all(len(r) == len(rows[0]) for r in rows)
    per_class = []
    preds = [[int(v) for v in row[1:]] for row in rows[1:]]
    truths = [annotation_labels(ann_dir, row[0]) for row in rows[1:]]
    if task.multilabel:
        assert all(len(p) == 12 and set(p) <= {0, 1} for p in preds)
        for k in range(12):  # binary F1 of the positive class of each AU
            per_class.append(f1_by_counting([p[k] for p in preds], [t[k] for t in truths], 2)[1])
    else:
        per_class = f1_by_counting([p[0] for p in preds], [t[0] for t in truths], 8)
    return float(np.mean(per_class)), per_class, len(rows) - 1


@pytest.fixture(scope="module", params=["expr", "au"])
def pipeline(request, tmp_path_factory):
    """make-demo, extract (train, val) and a 2-epoch train through the CLI; returns the paths."""
    task = request.param
    root = tmp_path_factory.mktemp(task)
    data = root / "data"
    run_cli("make-demo", data, "--task", task, "--videos", 3, "--frames", 20)
    banks = {}
    for split in ("train", "val"):
        banks[split] = root / f"bank-{split}"
        run_cli("extract", "--images", data / "cropped_aligned", "--annotations", data / "annotations",
                "--task", task, "--split", split, "--checkpoint", data / "encoder.pt", "--out", banks[split],
                "--batch-size", 16)
    run = root / "run"
    run_cli("train", "--task", task, "--train-bank", banks["train"], "--val-bank", banks["val"], "--out", run,
            "--epochs", 2, "--batch-size", 8)
    return task, data, banks, run


def test_metrics_json_f1_equals_f1_from_predictions_and_annotations(pipeline, capsys):
    task, data, banks, run = pipeline
    predictions = run / "pred.csv"
    run_cli("evaluate", "--run", run, "--bank", banks["val"], "--predictions", predictions)
    metrics = json.loads((run / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    f1, per_class, rows = recomputed_f1(predictions, data / "annotations" / "Validation_Set", get_task(task))
    # 3 videos x 20 lines, lines 7 and 14 invalid (-1): 18 frames each.
    assert rows == 3 * 18
    assert metrics["final"]["val_f1"] == pytest.approx(f1, abs=1e-12)
    assert list(metrics["final"]["per_class"].values()) == pytest.approx(per_class, abs=1e-12)
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert evaluation["f1"] == pytest.approx(f1, abs=1e-12) and evaluation["frames"] == rows
    assert f"F1 {f1:.4f}" in capsys.readouterr().out
    for name in ("log.csv", "model.pt", "checkpoint.pt"):
        assert (run / name).is_file()


def test_predictions_read_back_in_both_layouts(pipeline, tmp_path):
    """read_predictions reads evaluate's CSV and the earlier image,label layout (AU's values in one quoted
    field) to the same arrays."""
    task, _, banks, run = pipeline
    t = get_task(task)
    current = tmp_path / "pred.csv"
    run_cli("evaluate", "--run", run, "--bank", banks["val"], "--predictions", current)
    images, pred = read_predictions(current, t)
    assert pred.dtype == np.int64 and pred.shape == ((len(images), 12) if t.multilabel else (len(images),))
    earlier = tmp_path / "earlier.csv"
    with open(earlier, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label"])
        for image, p in zip(images, pred):
            writer.writerow([image, ",".join(map(str, p)) if t.multilabel else int(p)])
    again_images, again = read_predictions(earlier, t)
    assert again_images == images
    np.testing.assert_array_equal(again, pred)
    rewritten = tmp_path / "rewritten.csv"
    write_predictions(rewritten, images, pred, t)
    assert rewritten.read_bytes() == current.read_bytes()


@pytest.mark.parametrize("text, message", [
    ("image,AU1\nv/00001.jpg,1\n", "is neither"),
    ("image,expression\nv/00001.jpg,8\n", "class index in \\[0, 8\\)"),
    ("image,expression\nv/00001.jpg,x\n", ":2: not integers"),
    ("image,expression\nv/00001.jpg,1,2\n", ":2: 2 values, expected 1"),
])
def test_read_predictions_errors_name_the_file(tmp_path, text, message):
    path = tmp_path / "p.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_predictions(path, get_task("expr"))


def test_annotations_may_be_the_split_folder(pipeline, tmp_path, capsys):
    """extract --annotations <...>/Train_Set --split train: the same bank as with the parent folder, and the
    line that says which folder was used."""
    task, data, banks, _ = pipeline
    capsys.readouterr()
    run_cli("extract", "--images", data / "cropped_aligned", "--annotations", data / "annotations" / "Train_Set",
            "--task", task, "--split", "train", "--checkpoint", data / "encoder.pt", "--out", tmp_path / "bank",
            "--batch-size", 16)
    out = capsys.readouterr().out
    assert f"annotations: {data / 'annotations' / 'Train_Set'} (the --annotations folder itself)" in out
    for name in ("features.npy", "labels.npy", "index.csv"):
        assert (tmp_path / "bank" / name).read_bytes() == (banks["train"] / name).read_bytes()
    run_cli("extract", "--images", data / "cropped_aligned", "--annotations", data / "annotations",
            "--task", task, "--split", "train", "--checkpoint", data / "encoder.pt", "--out", banks["train"])
    assert "(the Train_Set folder in --annotations)" in capsys.readouterr().out


def test_interrupted_extraction_with_workers_resumes_exactly(tmp_path):
    """extract with 2 decoding workers, killed (SIGKILL, workers too) once the manifest counts some rows; the
    same command then resumes, and the bank equals one extracted in one go, bit for bit."""
    data = tmp_path / "data"
    run_cli("make-demo", data, "--task", "expr", "--videos", 4, "--frames", 100)
    args = ["extract", "--images", data / "cropped_aligned", "--annotations", data / "annotations", "--task", "expr",
            "--split", "train", "--checkpoint", data / "encoder.pt", "--batch-size", 4, "--save-every", 0]
    run_cli(*args, "--out", tmp_path / "straight", "--workers", 0)
    out = tmp_path / "bank"
    command = [sys.executable, "-m", "fastsam.affect", *map(str, args), "--out", str(out), "--workers", "2"]
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    done = 0
    while proc.poll() is None and time.monotonic() < deadline and done == 0:
        if (out / "manifest.json").is_file():  # replaced atomically: never read half-written
            done = json.loads((out / "manifest.json").read_text())["done"]
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    manifest = json.loads((out / "manifest.json").read_text())
    assert 0 < manifest["done"] < manifest["rows"] and not manifest["complete"], manifest
    run_cli(*args, "--out", out, "--workers", 2)
    for name in ("features.npy", "labels.npy", "index.csv"):
        assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()


def test_extract_limit_makes_a_trial_bank(pipeline, tmp_path, capsys):
    task, data, banks, _ = pipeline
    run_cli("extract", "--images", data / "cropped_aligned", "--annotations", data / "annotations", "--task", task,
            "--split", "train", "--checkpoint", data / "encoder.pt", "--out", tmp_path / "trial", "--limit", 5)
    assert "the first 5 frames only" in capsys.readouterr().out
    full = np.load(banks["train"] / "features.npy")
    # the rows of the full bank, to one fp16 rounding (another batch size sums in another order)
    np.testing.assert_allclose(np.load(tmp_path / "trial" / "features.npy").astype(np.float32),
                               full[:5].astype(np.float32), rtol=1e-2, atol=1e-3)


def test_extract_counts_and_reuses_the_bank(pipeline, capsys):
    task, data, banks, _ = pipeline
    manifest = json.loads((banks["train"] / "manifest.json").read_text())
    # 3 training videos of 20 lines, lines 7 and 14 invalid in each; the first video lacks image 2.
    assert manifest["counts"] == {"videos": 3, "frames": 3 * 18 - 1, "invalid": 6, "missing": 1}
    mtime = (banks["train"] / "features.npy").stat().st_mtime_ns
    run_cli("extract", "--images", data / "cropped_aligned", "--annotations", data / "annotations", "--task", task,
            "--split", "train", "--checkpoint", data / "encoder.pt", "--out", banks["train"])
    assert (banks["train"] / "features.npy").stat().st_mtime_ns == mtime
    assert "reus" in capsys.readouterr().err


def test_paper_preset_beats_the_majority_class_on_demo_data(tmp_path):
    data = tmp_path / "data"
    run_cli("make-demo", data, "--task", "expr", "--videos", 4, "--frames", 40, "--seed", 1)
    args = ["--images", data / "cropped_aligned", "--annotations", data / "annotations", "--task", "expr",
            "--checkpoint", data / "encoder.pt"]
    run_cli("extract", *args, "--split", "train", "--out", tmp_path / "train")
    run_cli("extract", *args, "--split", "val", "--out", tmp_path / "val")
    run_cli("train", "--task", "expr", "--train-bank", tmp_path / "train", "--val-bank", tmp_path / "val",
            "--out", tmp_path / "run", "--preset", "paper")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["config"]["epochs"] == 32 and metrics["config"]["alpha"] == 0.3
    val = np.load(tmp_path / "val" / "labels.npy")
    majority = np.bincount(val, minlength=8).argmax()
    majority_f1 = f1_by_counting([majority] * len(val), list(val), 8)
    assert metrics["final"]["val_f1"] > float(np.mean(majority_f1)) + 0.2


@pytest.mark.parametrize("argv, message", [
    (["extract", "--images", "{tmp}/nope", "--annotations", "{tmp}", "--task", "expr", "--split", "train",
      "--checkpoint", "{tmp}/c.pt", "--out", "{tmp}/b"], "nope"),
    (["extract", "--images", "{data}/cropped_aligned", "--annotations", "{data}/annotations", "--task", "au",
      "--split", "train", "--checkpoint", "{data}/encoder.pt", "--out", "{tmp}/b"], "header is the EXPR header"),
    (["extract", "--images", "{data}/cropped_aligned", "--annotations", "{data}/annotations", "--task", "expr",
      "--split", "train", "--checkpoint", "{tmp}/missing.pt", "--out", "{tmp}/b"], "missing.pt"),
    (["train", "--task", "expr", "--train-bank", "{tmp}/empty", "--val-bank", "{tmp}/empty", "--out", "{tmp}/r"],
     "not a feature bank"),
    (["extract", "--images", "{data}/cropped_aligned", "--annotations", "{data}/annotations/Validation_Set",
      "--task", "expr", "--split", "train", "--checkpoint", "{data}/encoder.pt", "--out", "{tmp}/b"],
     "is the Validation_Set folder, but the split is train"),
    (["evaluate", "--run", "{tmp}/norun", "--bank", "{tmp}/empty"], "model.pt"),
    (["train", "--task", "expr", "--train-bank", "{tmp}/empty", "--val-bank", "{tmp}/empty", "--out", "{tmp}/r",
      "--cuda-graph"], "cuda_graph needs a CUDA device (--device cuda), got device 'cpu'"),
    (["train", "--task", "expr", "--train-bank", "{tmp}/empty", "--val-bank", "{tmp}/empty", "--out", "{tmp}/r",
      "--cuda-graph", "--device", "cuda", "--optimizer", "lastsam"], "optimizer 'lastsam'"),
])
def test_user_errors_are_one_line(tmp_path, capsys, argv, message):
    data = tmp_path / "data"
    run_cli("make-demo", data, "--task", "expr", "--videos", 1, "--frames", 3)
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    assert main([a.format(tmp=tmp_path, data=data) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_every_subcommand_has_help(capsys):
    for command in ("make-demo", "extract", "train", "evaluate"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        assert capsys.readouterr().out.startswith("usage: python -m fastsam.affect " + command)
    # The module entry point itself, once (a subprocess imports torch: seconds).
    out = subprocess.run([sys.executable, "-m", "fastsam.affect", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert all(command in out for command in ("make-demo", "extract", "train", "evaluate"))
