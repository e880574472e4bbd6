"""Feature bank extraction (create, reuse, resume, refusal, worker processes, dtypes) and load_bank's errors."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from fastsam.affect import bank as bank_mod  # noqa: E402
from fastsam.affect.bank import extract_bank, load_bank  # noqa: E402
from fastsam.affect.data import Frame, scan_split  # noqa: E402
from fastsam.affect.encoder import load_clip_visual, random_clip_state_dict  # noqa: E402
from fastsam.affect.preprocess import load_image  # noqa: E402
from fastsam.affect.tasks import AU, EXPR  # noqa: E402

BATCH = 4
EXPR_HEADER = ",".join(EXPR.names)


def _write_video(images, name, n, rng, size=(40, 48)):
    os.makedirs(images / name)
    for i in range(1, n + 1):
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / name / f"{i:05d}.jpg")


@pytest.fixture
def dataset(tmp_path):
    """Two videos, 10 labelled lines: vidA has one invalid frame, vidB_left one missing image -> 8 frames."""
    rng = np.random.default_rng(0)
    images, ann = tmp_path / "images", tmp_path / "ann"
    _write_video(images, "vidA", 5, rng)
    _write_video(images, "vidB_left", 4, rng, size=(48, 40))
    (ann / "Train_Set").mkdir(parents=True)
    (ann / "Train_Set" / "vidA.txt").write_text(EXPR_HEADER + "\n0\n3\n-1\n7\n1\n")
    (ann / "Train_Set" / "vidB_left.txt").write_text(EXPR_HEADER + "\n2\n2\n5\n6\n4\n")  # line 5: no image
    frames, stats = scan_split(images, ann, EXPR, "train")
    return images, frames, stats


def _checkpoint(path, seed=0):
    torch.save(random_clip_state_dict(width=64, layers=2, patch_size=8, resolution=32, output_dim=16, seed=seed), path)
    return str(path)


@pytest.fixture
def ckpt(tmp_path):
    return _checkpoint(tmp_path / "clip.pt")


def _extract(dataset, ckpt, out, **kw):
    images, frames, stats = dataset
    kw = {"save_every": 0, **kw}  # the manifest follows every batch unless a test says otherwise
    return extract_bank(frames, stats, EXPR, "train", images, ckpt, out, batch_size=BATCH, progress=False, **kw)


def _same_run(manifest):
    """A manifest without its timing."""
    return {k: v for k, v in manifest.items() if k != "frames_per_second"}


def _counting_load_image(monkeypatch, fail_at=None):
    """Patch the bank's load_image to count calls, raising KeyboardInterrupt at call number ``fail_at``."""
    calls = []

    def wrapped(path, resolution):
        calls.append(path)
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        return load_image(path, resolution)

    monkeypatch.setattr(bank_mod, "load_image", wrapped)
    return calls


def test_extract_rows_labels_index_manifest(dataset, ckpt, tmp_path):
    images, frames, stats = dataset
    assert len(frames) == 8
    b = _extract(dataset, ckpt, tmp_path / "bank")

    encoder = load_clip_visual(ckpt).eval()
    with torch.inference_mode():
        want = np.concatenate([
            encoder(torch.stack([load_image(images / f.image, 32) for f in frames[s:s + BATCH]])).numpy()
            for s in range(0, len(frames), BATCH)
        ]).astype(np.float16)
    assert isinstance(b.features, np.memmap) and b.features.dtype == np.float16
    np.testing.assert_array_equal(np.asarray(b.features), want)
    assert len(b) == 8 and b.dim == 16 and b.task == EXPR
    np.testing.assert_array_equal(b.labels, [0, 3, 7, 1, 2, 2, 5, 6])
    assert b.labels.dtype == np.int64
    assert b.images == [f.image for f in frames] and b.images[0] == "vidA/00001.jpg"
    assert b.videos == ["vidA"] * 4 + ["vidB_left"] * 4
    np.testing.assert_array_equal(b.frames, [1, 2, 4, 5, 1, 2, 3, 4])
    with open(tmp_path / "bank" / "index.csv") as f:
        assert f.readline().strip() == "image,video,frame"
        assert f.readline().strip() == "vidA/00001.jpg,vidA,1"

    m = json.loads((tmp_path / "bank" / "manifest.json").read_text())
    assert m["format"] == 1 and m["task"] == "expr" and m["split"] == "train"
    assert m["counts"] == {"videos": 2, "frames": 8, "invalid": 1, "missing": 1}
    assert m["done"] == 8 and m["complete"] is True and m["dim"] == 16
    assert m["encoder"]["checkpoint"] == os.path.abspath(ckpt) and len(m["encoder"]["sha256"]) == 64
    assert m["encoder"]["resolution"] == 32 and m["encoder"]["output_dim"] == 16 and m["encoder"]["width"] == 64
    assert m["preprocessing"]["resolution"] == 32 and m["preprocessing"]["crop"] == "center"
    assert m["frames_sha256"] == bank_mod.frames_sha256(frames)
    assert not (tmp_path / "bank" / "manifest.json.tmp").exists()


def test_au_bank_labels(dataset, ckpt, tmp_path):
    images, frames, stats = dataset
    au_frames = [Frame(f.video, f.frame, tuple((i + j) % 2 for j in range(12))) for i, f in enumerate(frames)]
    b = extract_bank(au_frames, stats, AU, "val", images, ckpt, tmp_path / "au", batch_size=3, progress=False)
    assert b.labels.shape == (8, 12) and b.labels.dtype == np.int64 and b.task == AU
    np.testing.assert_array_equal(b.labels[1], [1, 0] * 6)
    with pytest.raises(ValueError, match="holds au features, but --task is expr"):
        load_bank(tmp_path / "au", EXPR)


def test_complete_bank_is_reused_without_computing(dataset, ckpt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "bank"
    first = _extract(dataset, ckpt, out)
    before = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)}

    def boom(*args, **kwargs):
        raise AssertionError("a reused bank must not load the encoder or any image")

    monkeypatch.setattr(bank_mod, "load_clip_visual", boom)
    monkeypatch.setattr(bank_mod, "load_image", boom)
    again = _extract(dataset, ckpt, out)
    assert "reusing" in capsys.readouterr().err
    assert {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)} == before
    np.testing.assert_array_equal(np.asarray(again.features), np.asarray(first.features))


def test_interrupted_extraction_resumes_bit_for_bit(dataset, ckpt, tmp_path, monkeypatch):
    reference = _extract(dataset, ckpt, tmp_path / "ref")
    out = tmp_path / "bank"
    calls = _counting_load_image(monkeypatch, fail_at=BATCH + 2)  # inside the 2nd batch
    with pytest.raises(KeyboardInterrupt):
        _extract(dataset, ckpt, out)
    m = json.loads((out / "manifest.json").read_text())
    assert m["done"] == BATCH and m["complete"] is False
    with pytest.raises(ValueError, match=r"interrupted at 4/8 rows; rerun the same extract command"):
        load_bank(out)

    calls = _counting_load_image(monkeypatch)
    resumed = _extract(dataset, ckpt, out)
    assert len(calls) == 8 - BATCH  # only the rows after "done" were encoded
    assert calls[0].endswith(dataset[1][BATCH].image.replace("/", os.sep))
    np.testing.assert_array_equal(np.asarray(resumed.features).view(np.uint16),
                                  np.asarray(reference.features).view(np.uint16))
    np.testing.assert_array_equal(resumed.labels, reference.labels)
    assert resumed.images == reference.images
    assert _same_run(resumed.manifest) == _same_run(reference.manifest)


def test_worker_processes_give_the_same_bank(dataset, ckpt, tmp_path):
    """Images decoded in 2 DataLoader worker processes: the same rows, in order, bit for bit; the manifest says
    how fast it went."""
    reference = _extract(dataset, ckpt, tmp_path / "ref")
    with_workers = _extract(dataset, ckpt, tmp_path / "workers", workers=2, save_every=30.0)
    np.testing.assert_array_equal(np.asarray(with_workers.features).view(np.uint16),
                                  np.asarray(reference.features).view(np.uint16))
    assert _same_run(with_workers.manifest) == _same_run(reference.manifest)
    assert with_workers.manifest["frames_per_second"] > 0


def test_bfloat16_encoder_is_its_own_bank(dataset, ckpt, tmp_path):
    """dtype="bfloat16": features within bf16 rounding of the float32 ones; recorded, so a float32 bank in the
    same folder is refused rather than mixed. float16 needs a GPU."""
    reference = _extract(dataset, ckpt, tmp_path / "ref")
    bf16 = _extract(dataset, ckpt, tmp_path / "bf16", dtype="bfloat16")
    assert bf16.manifest["encoder"]["dtype"] == "bfloat16" and reference.manifest["encoder"]["dtype"] == "float32"
    np.testing.assert_allclose(np.asarray(bf16.features, dtype=np.float32),
                               np.asarray(reference.features, dtype=np.float32), rtol=0.1, atol=0.1)
    assert not np.array_equal(np.asarray(bf16.features), np.asarray(reference.features))
    with pytest.raises(ValueError, match="encoder dtype bfloat16 instead of float32"):
        _extract(dataset, ckpt, tmp_path / "bf16")
    with pytest.raises(ValueError, match="float16 needs a GPU"):
        _extract(dataset, ckpt, tmp_path / "fp16", dtype="float16")


def test_refuses_a_bank_of_other_inputs(dataset, ckpt, tmp_path):
    images, frames, stats = dataset
    out = tmp_path / "bank"
    _extract(dataset, ckpt, out)
    other = _checkpoint(tmp_path / "other.pt", seed=1)
    with pytest.raises(ValueError, match="encoder checkpoint.*choose another --out or delete"):
        _extract(dataset, other, out)
    with pytest.raises(ValueError, match="frames_sha256.*choose another --out"):
        extract_bank(frames[:-1], stats, EXPR, "train", images, ckpt, out, progress=False)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a feature bank.*'notes.txt'"):
        _extract(dataset, ckpt, stray)


def test_argument_errors(dataset, ckpt, tmp_path):
    images, frames, stats = dataset
    out = tmp_path / "bank"
    with pytest.raises(ValueError, match="no frames to extract.*--images/--annotations/--split"):
        extract_bank([], stats, EXPR, "train", images, ckpt, out, progress=False)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            extract_bank(frames, stats, EXPR, "train", images, ckpt, out, batch_size=bad, progress=False)
    for name, bad in (("workers", -1), ("workers", 1.5), ("save_every", -1), ("dtype", "half")):
        with pytest.raises(ValueError, match=name):
            extract_bank(frames, stats, EXPR, "train", images, ckpt, out, progress=False, **{name: bad})
    assert not out.exists()


def test_load_bank_errors(dataset, ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_bank(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="is not a feature bank: no manifest.json.*fastsam.affect extract"):
        load_bank(tmp_path)
    out = tmp_path / "bank"
    _extract(dataset, ckpt, out)
    assert load_bank(out, "expr").task == EXPR
    with pytest.raises(ValueError, match="holds expr features, but --task is au"):
        load_bank(out, AU)

    labels = np.load(out / "labels.npy")
    np.save(out / "labels.npy", labels[:-1])
    with pytest.raises(ValueError, match="inconsistent: labels.npy"):
        load_bank(out)
    np.save(out / "labels.npy", labels)
    with open(out / "index.csv", "a") as f:
        f.write("vidX/00001.jpg,vidX,1\n")
    with pytest.raises(ValueError, match="inconsistent: index.csv"):
        load_bank(out)

    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**m, "rows": 0}))
    with pytest.raises(ValueError, match="empty"):
        load_bank(out)
