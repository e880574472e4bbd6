"""The example scripts run end to end (a short run each: one epoch, real data from scikit-learn)."""
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

pytest.importorskip("sklearn")


def test_digits_prints_the_table_and_saves_the_curves(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import digits

    out = tmp_path / "curves.png"
    results = digits.main(["--epochs", "2", "--methods", "sgd", "sam", "crsam", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| optimizer | test accuracy | train loss | wall time (s) | steps/s |" in printed
    assert all(digits.METHODS[m][0] in printed for m in ("sgd", "sam", "crsam"))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Two epochs on real digits already separate the classes far better than chance (10%).
    assert all(r["test_acc"] > 0.5 for r in results.values())
    assert len(results["sam"]["history"]["test_acc"]) == 2


def test_digits_rejects_bad_flags():
    import digits

    with pytest.raises(SystemExit):
        digits.main(["--epochs", "0"])
    with pytest.raises(SystemExit):
        digits.main(["--methods", "adam"])
    with pytest.raises(SystemExit):
        digits.main(["--label-noise", "0.95"])


def test_label_noise_flips_that_fraction_of_the_training_labels_only():
    import digits
    import torch

    clean, noisy = digits.load_data(torch.device("cpu"), 0.0), digits.load_data(torch.device("cpu"), 0.25)
    assert (clean[1] != noisy[1]).float().mean().item() == pytest.approx(0.25, abs=1e-3)
    assert torch.equal(clean[3], noisy[3]) and torch.equal(clean[0], noisy[0])


def test_lightning_example_automatic_and_manual_optimization_train_alike():
    """Both are the same SAM algorithm on the same batches: the closure contract (automatic) and the explicit
    loop (manual) reach the same test accuracy."""
    pytest.importorskip("lightning")
    import lightning_digits

    automatic, manual = lightning_digits.main(["--epochs", "2"]), lightning_digits.main(["--epochs", "2", "--manual"])
    assert automatic == pytest.approx(manual, abs=1 / 450) and automatic > 0.2


def test_hf_trainer_example():
    pytest.importorskip("transformers")
    import hf_trainer_digits

    assert hf_trainer_digits.main(["--epochs", "3"]) > 0.2  # chance is 0.1; 30 epochs reach about 0.95
