"""Hand-counted checks of the ABAW F1 metrics in fastsam.affect.metrics."""
import numpy as np
import pytest
import torch

from fastsam.affect.metrics import au_f1, au_predict, expr_f1, expr_predict, f1_from_counts, score
from fastsam.affect.tasks import AU, EXPR


def test_f1_from_counts_zero_denominator():
    # tp=2 fp=1 fn=1 -> 4/6; tp=0 fp=0 fn=0 -> 0 (zero_division=0); tp=0 fp=3 fn=0 -> 0/3.
    got = f1_from_counts([2, 0, 0], [1, 0, 3], [1, 0, 0])
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, [4 / 6, 0.0, 0.0])


def test_expr_f1_hand_counted():
    target = np.array([0, 0, 1, 1, 2, 3])
    pred = np.array([0, 1, 1, 1, 0, 0])
    # class 0: tp=1 (idx0), fp=2 (idx4,5), fn=1 (idx1)   -> 2/(2+2+1) = 0.4
    # class 1: tp=2 (idx2,3), fp=1 (idx1), fn=0          -> 4/5 = 0.8
    # class 2: tp=0, fp=0, fn=1 (never predicted)         -> 0
    # class 3: tp=0, fp=0, fn=1                           -> 0
    # classes 4..7: absent from both                      -> 0 each, still averaged
    f1, per = expr_f1(pred, target)
    np.testing.assert_allclose(per, [0.4, 0.8, 0, 0, 0, 0, 0, 0])
    assert f1 == pytest.approx(1.2 / 8)


def test_expr_f1_all_correct_and_all_wrong():
    y = np.arange(8)
    f1, per = expr_f1(y, y)
    assert f1 == 1.0 and (per == 1.0).all()
    f1, per = expr_f1((y + 1) % 8, y)
    assert f1 == 0.0 and (per == 0.0).all()
    # All correct but only 2 of 8 classes present: the 6 absent classes pull the macro mean to 2/8.
    f1, _ = expr_f1(np.array([0, 1]), np.array([0, 1]))
    assert f1 == pytest.approx(0.25)


def test_expr_f1_accepts_torch():
    f1, _ = expr_f1(torch.tensor([0, 1]), torch.tensor([0, 1]), num_classes=2)
    assert f1 == 1.0


@pytest.mark.parametrize(
    "pred,target,match",
    [
        (np.array([0, 8]), np.array([0, 1]), "pred values"),
        (np.array([0, 1]), np.array([-1, 1]), "target values"),
        (np.array([0, 1, 2]), np.array([0, 1]), "shapes differ"),
        (np.array([[0, 1]]), np.array([[0, 1]]), "pred must be 1-D"),
    ],
)
def test_expr_f1_errors(pred, target, match):
    with pytest.raises(ValueError, match=match):
        expr_f1(pred, target)


def test_expr_f1_rejects_floats():
    with pytest.raises(TypeError, match="pred"):
        expr_f1(np.array([0.0, 1.0]), np.array([0, 1]))


def test_au_f1_hand_counted():
    target = np.array([[1, 0, 1], [1, 1, 0], [0, 0, 1], [0, 1, 0]])
    pred = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0]])
    # label 0: tp=1 (row0), fp=1 (row2), fn=1 (row1)   -> 2/4 = 0.5
    # label 1: tp=2 (rows1,3), fp=0, fn=0               -> 1.0
    # label 2: never predicted: tp=0, fp=0, fn=2        -> 0
    f1, per = au_f1(pred, target)
    np.testing.assert_allclose(per, [0.5, 1.0, 0.0])
    assert f1 == pytest.approx(0.5)


def test_au_f1_all_correct_all_wrong():
    y = np.array([[1, 0], [0, 1]])
    assert au_f1(y, y)[0] == 1.0
    assert au_f1(1 - y, y)[0] == 0.0


def test_au_f1_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        au_f1(np.zeros((2, 3), dtype=int), np.zeros((2, 2), dtype=int))
    with pytest.raises(ValueError, match="target must hold only 0/1"):
        au_f1(np.zeros((1, 2), dtype=int), np.array([[0, -1]]))
    with pytest.raises(ValueError, match="pred must be 2-D"):
        au_f1(np.zeros(3, dtype=int), np.zeros(3, dtype=int))


def test_au_predict_threshold():
    logits = np.array([[-1.0, 0.0, 1.0, 1000.0, -1000.0]])
    np.testing.assert_array_equal(au_predict(logits), [[0, 1, 1, 1, 0]])
    # sigmoid(1) = 0.731 < 0.75, sigmoid(1.2) = 0.769 >= 0.75
    got = au_predict(torch.tensor([1.0, 1.2]), threshold=0.75)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, [0, 1])
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="threshold"):
            au_predict(logits, threshold=bad)


def test_expr_predict():
    got = expr_predict(torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]]))
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, [1, 0])
    with pytest.raises(ValueError, match="logits must be 2-D"):
        expr_predict(np.zeros(3))


def test_score_names():
    y = np.arange(8)
    out = score(EXPR, y, y)
    assert out["f1"] == 1.0 and list(out["per_class"]) == list(EXPR.names)
    pred = np.zeros((2, 12), dtype=int)
    target = np.zeros((2, 12), dtype=int)
    target[0, 0] = pred[0, 0] = 1  # AU1 perfect: 1.0; the other 11 have no positives at all: 0
    out = score(AU, pred, target)
    assert out["per_class"]["AU1"] == 1.0 and out["per_class"]["AU26"] == 0.0
    assert out["f1"] == pytest.approx(1 / 12)
    with pytest.raises(ValueError, match="task au has 12"):
        score(AU, np.zeros((2, 3), dtype=int), np.zeros((2, 3), dtype=int))
    with pytest.raises(TypeError, match="task"):
        score("au", pred, target)


@pytest.mark.parametrize("seed", range(5))
def test_f1_agrees_with_sklearn(seed):
    """Random cases (some classes or AUs never predicted or never present) against sklearn.metrics.f1_score:
    macro over all 8 EXPR classes, binary (positive class 1) per AU, zero_division=0 as ours."""
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    target, pred = rng.integers(0, 6, n), rng.integers(1, 8, n)  # class 0 never predicted, 6-7 never present
    f1, per = expr_f1(pred, target)
    assert f1 == pytest.approx(metrics.f1_score(target, pred, labels=list(range(8)), average="macro",
                                                zero_division=0), abs=1e-12)
    np.testing.assert_allclose(per, metrics.f1_score(target, pred, labels=list(range(8)), average=None,
                                                     zero_division=0), atol=1e-12)
    au_target, au_pred = rng.integers(0, 2, (n, 12)), rng.integers(0, 2, (n, 12))
    au_pred[:, 0] = 0  # an AU never predicted
    au_target[:, 1] = 0  # an AU never present
    f1, per = au_f1(au_pred, au_target)
    expected = [metrics.f1_score(au_target[:, k], au_pred[:, k], zero_division=0) for k in range(12)]
    np.testing.assert_allclose(per, expected, atol=1e-12)
    assert f1 == pytest.approx(float(np.mean(expected)), abs=1e-12)
