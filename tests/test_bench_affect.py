"""The affect tables of python -m fastsam.bench: every training row trains the same step over the bank as
``fastsam.affect train`` feeds it, the extraction rows time the command's own extraction, and the command line
prints and stores both tables."""
import json

import numpy as np
import pytest
import torch

from fastsam.affect.train import batch_order
from fastsam.bench import affect_extraction, affect_peers, cli
from fastsam.bench.cvar_peers import authors_cvar_cross_entropy, composite_cvar_cross_entropy
from fastsam.bench.peers import PEERS


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(affect_peers.BATCH, affect_peers.DIM, generator=gen),
            torch.randint(0, affect_peers.CLASSES, (affect_peers.BATCH,), generator=gen))


def _one_step(row):
    """The model after one step of ``row``, the loss it returned, and the grads (at w + e) its base optimizer
    stepped with."""
    model, opt, loss_fn = affect_peers.make_row(row)
    second_step, seen = opt.second_step, {}

    def spy(*args, **kwargs):
        seen.update({n: p.grad.clone() for n, p in model.named_parameters()})
        second_step(*args, **kwargs)

    opt.second_step = spy
    torch.manual_seed(1)  # the same dropout masks in every row
    loss = affect_peers.step_fn(model, opt, loss_fn)(*_batch())
    return model, loss, seen


@pytest.mark.parametrize("impl", ["cpu", "torch"])
def test_fastsam_row_trains_as_the_foreach_row(impl):
    if impl not in affect_peers.affect_rows("cpu"):
        pytest.skip(f"impl {impl} not built")
    # Both compute the exact top-k CVaR and the same SAM perturbation: the grads of the second pass agree.
    # (The weights after Adam's first step are lr * g / (|g| + eps): nearly sign(g), which would hide errors
    # in g and magnify rounding noise in the zero-mean grads of the Linear biases before BatchNorm.)
    (got, got_loss, got_g), (want, want_loss, want_g) = _one_step(impl), _one_step("foreach")
    assert set(got_g) == {n for n, _ in got.named_parameters()}
    torch.testing.assert_close(got_g, want_g, rtol=1e-4, atol=1e-6)  # atol: the fp32 standard (TOL)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert got_loss.dim() == 0 and not got_loss.requires_grad
    # BatchNorm statistics moved once (pass 1 only), and the step moved the weights.
    torch.testing.assert_close(dict(got.named_buffers()), dict(want.named_buffers()), rtol=1e-5, atol=1e-6)
    assert all(int(b) == 1 for n, b in got.named_buffers() if n.endswith("num_batches_tracked"))
    assert not torch.equal(got.head.weight, affect_peers.make_row(impl)[0].head.weight)


def test_loop_row_is_the_authors_loss():
    model, _, loss_fn = affect_peers.make_row("loop")
    assert loss_fn is authors_cvar_cross_entropy
    x, y = _batch()
    logits = model(x)
    want = composite_cvar_cross_entropy(logits, y, affect_peers.ALPHA)
    torch.testing.assert_close(loss_fn(logits, y, affect_peers.ALPHA), want, rtol=1e-4, atol=1e-5)


def test_bank_steps_feed_the_batches_of_training():
    # 70 rows at batch 32: batches of 32, 32 and 6 rows an epoch, as train's batch_order draws them.
    features, labels = affect_peers.make_bank(70, seed=3)
    assert features.dtype == torch.float16 and features.shape == (70, affect_peers.DIM)
    assert labels.dtype == torch.int64 and int(labels.min()) >= 0 and int(labels.max()) < affect_peers.CLASSES
    seen = []

    def step(x, y):
        seen.append((x, y))
        return torch.tensor(float(len(seen)))

    run = affect_peers.BankSteps(step, features, labels, steps=2, seed=5)
    assert run.steps_per_epoch == 3
    for _ in range(3):  # 6 steps: two epochs
        run()
    gen = torch.Generator().manual_seed(5)
    want = [batch_order(70, 32, gen, torch.device("cpu")) for _ in range(2)]
    batches = [order[a:b] for order, spans in want for a, b in spans]
    assert len(seen) == len(batches) == 6
    assert not torch.equal(want[0][0], want[1][0])  # a new shuffle for the second epoch
    for (x, y), idx in zip(seen, batches):
        assert x.dtype == torch.float32 and torch.equal(x, features[idx].float()) and torch.equal(y, labels[idx])
    assert run.total.dtype == torch.float64 and float(run.total) == sum(range(1, 7))


def test_quick_affect_tables_are_printed_and_stored(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(affect_peers, "STEPS_PER_CALL", 2)  # the table's shape, not its figures, is under test
    out = tmp_path / "r.json"
    argv = ["--quick", "--device", "cpu", "--tables", "affect", "--reps", "2", "--affect-rows", "100",
            "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    rows = affect_peers.affect_rows("cpu")
    assert "Affect MLP training" in printed and "CVaR alpha 0.3" in printed and "100 x 768 fp16 rows" in printed
    labels = [r if r in PEERS else f"fastsam:{r}" for r in rows]
    assert [line.split()[0] for line in printed.splitlines() if line.split()[:1] and line.split()[0] in labels] \
        == labels
    affect = record["affect"]
    assert record["tables"] == ["affect"] and affect["batch"] == 32 and affect["dim"] == 768
    assert affect["bank_rows"] == 100 and affect["steps_per_epoch"] == 4 and affect["steps_per_call"] == 2
    assert [r["impl"] for r in affect["rows"]] == rows
    by_row = {r["impl"]: r for r in affect["rows"]}
    for r in affect["rows"]:
        assert r["reps"] == len(r["times_ms"]) == 2 and r["steps_per_s"] == pytest.approx(1e3 / r["median_ms"])
        assert r["epoch_s"] == pytest.approx(4 * r["median_ms"] / 1e3)
        for peer in PEERS:
            assert r[f"speedup_vs_{peer}"] == pytest.approx(by_row[peer]["median_ms"] / r["median_ms"])
    # The extraction rows: 1, 2 and all workers, each timed once in a quick run.
    ext = affect["extraction"]
    assert [r["workers"] for r in ext["rows"]] == affect_extraction.worker_counts()
    assert {1, 2} <= {r["workers"] for r in ext["rows"]} and ext["dtype"] == "float32" and ext["frames"] > 0
    for r in ext["rows"]:
        assert len(r["runs"]) == 1 and r["frames_per_s"] == r["runs"][0] > 0
        assert r["speedup_vs_1"] == pytest.approx(r["frames_per_s"] / ext["rows"][0]["frames_per_s"])
        assert r["all"] == (r["workers"] == ext["default_workers"])
    assert "Affect feature extraction" in printed and "vs 1 worker" in printed
    assert any(line.split()[:2] == [str(ext["default_workers"]), "(all)"] for line in printed.splitlines())


def test_extraction_rows_report_what_extract_measured(monkeypatch, tmp_path):
    # Each row's figures are the manifests' frames/s of its runs, in interleaved rounds; the median is the row's.
    calls = []

    def fake_extract(frames, stats, task, split, images, checkpoint, out, **kw):
        calls.append(kw["workers"])
        rate = {1: [100.0, 130.0, 90.0], 2: [180.0, 150.0, 210.0]}[kw["workers"]][calls.count(kw["workers"]) - 1]
        return type("Bank", (), {"manifest": {"frames_per_second": rate}})()

    monkeypatch.setattr(affect_extraction, "extract_bank", fake_extract)
    monkeypatch.setattr(affect_extraction, "default_workers", lambda: 2)
    monkeypatch.setattr(affect_extraction, "make_demo", lambda *a, **k: dict(images="i", annotations="a",
                                                                            checkpoint="c"))
    monkeypatch.setattr(affect_extraction, "scan_split", lambda *a: ([object()] * 7, None))
    ext = affect_extraction.run_extraction("cpu", rounds=3)
    assert calls == [1, 2, 2, 1, 1, 2]  # rotated each round
    assert [(r["workers"], r["all"], r["frames_per_s"], r["runs"]) for r in ext["rows"]] == \
        [(1, False, 100.0, [100.0, 130.0, 90.0]), (2, True, 180.0, [180.0, 150.0, 210.0])]
    assert ext["rows"][1]["speedup_vs_1"] == pytest.approx(1.8) and ext["frames"] == 7
    assert affect_extraction.dtype_for("cuda") == "float16" and affect_extraction.dtype_for("cpu") == "float32"
