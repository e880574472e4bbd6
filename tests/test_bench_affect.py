"""The affect table of python -m fastsam.bench: every row trains the same step, and the command line prints
and stores the table."""
import json

import pytest
import torch

from fastsam.bench import affect_peers, cli
from fastsam.bench.cvar_peers import authors_cvar_cross_entropy, composite_cvar_cross_entropy
from fastsam.bench.peers import PEERS


def _one_step(row):
    """The model after one step of ``row``, and the grads (at w + e) its base optimizer stepped with."""
    model, opt, loss_fn, x, y = affect_peers.make_row(row)
    second_step, seen = opt.second_step, {}

    def spy(*args, **kwargs):
        seen.update({n: p.grad.clone() for n, p in model.named_parameters()})
        second_step(*args, **kwargs)

    opt.second_step = spy
    torch.manual_seed(1)  # the same dropout masks in every row
    affect_peers.step_fn(model, opt, loss_fn, x, y)()
    return model, seen


@pytest.mark.parametrize("impl", ["cpu", "torch"])
def test_fastsam_row_trains_as_the_foreach_row(impl):
    if impl not in affect_peers.affect_rows("cpu"):
        pytest.skip(f"impl {impl} not built")
    # Both compute the exact top-k CVaR and the same SAM perturbation: the grads of the second pass agree.
    # (The weights after Adam's first step are lr * g / (|g| + eps): nearly sign(g), which would hide errors
    # in g and magnify rounding noise in the zero-mean grads of the Linear biases before BatchNorm.)
    (got, got_g), (want, want_g) = _one_step(impl), _one_step("foreach")
    assert set(got_g) == {n for n, _ in got.named_parameters()}
    torch.testing.assert_close(got_g, want_g, rtol=1e-4, atol=1e-6)  # atol: the fp32 standard (TOL)
    # BatchNorm statistics moved once (pass 1 only), and the step moved the weights.
    torch.testing.assert_close(dict(got.named_buffers()), dict(want.named_buffers()), rtol=1e-5, atol=1e-6)
    assert all(int(b) == 1 for n, b in got.named_buffers() if n.endswith("num_batches_tracked"))
    assert not torch.equal(got.head.weight, affect_peers.make_row(impl)[0].head.weight)


def test_loop_row_is_the_authors_loss():
    model, _, loss_fn, x, y = affect_peers.make_row("loop")
    assert loss_fn is authors_cvar_cross_entropy
    logits = model(x)
    want = composite_cvar_cross_entropy(logits, y, affect_peers.ALPHA)
    torch.testing.assert_close(loss_fn(logits, y, affect_peers.ALPHA), want, rtol=1e-4, atol=1e-5)


def test_quick_affect_table_is_printed_and_stored(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli.main(["--quick", "--device", "cpu", "--tables", "affect", "--reps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    rows = affect_peers.affect_rows("cpu")
    assert "Affect MLP training step" in printed and "CVaR alpha 0.3" in printed
    labels = [r if r in PEERS else f"fastsam:{r}" for r in rows]
    assert [line.split()[0] for line in printed.splitlines() if line.split()[:1] and line.split()[0] in labels] \
        == labels
    affect = record["affect"]
    assert record["tables"] == ["affect"] and affect["batch"] == 32 and affect["dim"] == 768
    assert [r["impl"] for r in affect["rows"]] == rows
    by_row = {r["impl"]: r for r in affect["rows"]}
    for r in affect["rows"]:
        assert r["reps"] == len(r["times_ms"]) == 2 and r["steps_per_s"] == pytest.approx(1e3 / r["median_ms"])
        for peer in PEERS:
            assert r[f"speedup_vs_{peer}"] == pytest.approx(by_row[peer]["median_ms"] / r["median_ms"])
