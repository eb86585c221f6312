"""Tests for medjax.metrics: hand-computed values and scikit-learn cross-checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import (
    confusion_matrix,
    f1_score,
    jaccard_score,
    precision_recall_fscore_support,
    recall_score,
    roc_auc_score,
)

from medjax import metrics


def _masks():
    """Returns a hand-made batch of 4 (2, 3) masks (pred, target) with known scores.

    Returns:
      Tuple (pred, target) of int32 arrays, shape (4, 2, 3).
    """
    pred = np.array(
        [
            [[1, 1, 0], [0, 0, 0]],  # tp=1 fp=1 fn=2 -> dice 2/5, iou 1/4
            [[1, 1, 1], [0, 0, 0]],  # identical to target -> 1, 1
            [[0, 0, 0], [0, 0, 0]],  # empty pred, empty target
            [[0, 1, 0], [0, 0, 0]],  # non-empty pred, empty target
        ],
        np.int32,
    )
    target = np.array(
        [
            [[1, 0, 0], [1, 1, 0]],
            [[1, 1, 1], [0, 0, 0]],
            [[0, 0, 0], [0, 0, 0]],
            [[0, 0, 0], [0, 0, 0]],
        ],
        np.int32,
    )
    return pred, target


def test_dice_iou_hand_values_ignore_empty():
    """Empty targets give NaN and are skipped by nan_mean."""
    pred, target = _masks()
    dice = np.asarray(metrics.dice_score(pred, target))
    iou = np.asarray(metrics.iou_score(pred, target))
    assert dice.shape == (4,) and dice.dtype == np.float32
    np.testing.assert_allclose(dice[:2], [0.4, 1.0], rtol=1e-6)
    np.testing.assert_allclose(iou[:2], [0.25, 1.0], rtol=1e-6)
    assert np.isnan(dice[2:]).all() and np.isnan(iou[2:]).all()
    assert float(metrics.nan_mean(dice)) == pytest.approx(0.7)
    assert float(metrics.nan_mean(iou)) == pytest.approx(0.625)


def test_dice_iou_hand_values_keep_empty():
    """Empty target: 1.0 when the prediction is empty too, else 0.0."""
    pred, target = _masks()
    dice = np.asarray(metrics.dice_score(pred, target, ignore_empty=False))
    iou = np.asarray(metrics.iou_score(pred, target, ignore_empty=False))
    np.testing.assert_allclose(dice, [0.4, 1.0, 1.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(iou, [0.25, 1.0, 1.0, 0.0], rtol=1e-6)


def test_input_dtypes_are_thresholded_alike():
    """Bool, 0/1 int and float (> 0.5) masks give the same scores."""
    pred, target = _masks()
    ref = np.asarray(metrics.dice_score(pred, target, ignore_empty=False))
    as_bool = metrics.dice_score(pred.astype(bool), target.astype(bool), ignore_empty=False)
    # 0.6 counts as foreground, 0.5 and 0.4 do not.
    soft_pred = np.where(pred == 1, 0.6, 0.5).astype(np.float32)
    soft_target = np.where(target == 1, 1.0, 0.4).astype(np.float32)
    as_float = metrics.dice_score(soft_pred, soft_target, ignore_empty=False)
    np.testing.assert_array_equal(np.asarray(as_bool), ref)
    np.testing.assert_array_equal(np.asarray(as_float), ref)


def test_shape_mismatch_raises():
    """Different shapes are an error, with both shapes in the message."""
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        metrics.dice_score(np.zeros((2, 3)), np.zeros((2, 4)))


def test_against_sklearn_on_random_masks():
    """Counts, precision/recall/F1 and Jaccard agree with scikit-learn."""
    rng = np.random.default_rng(0)
    pred = rng.random((5, 7, 9, 1)) > 0.6
    target = rng.random((5, 7, 9, 1)) > 0.5
    counts = metrics.confusion_counts(pred, target)
    for b in range(5):
        p, t = pred[b].ravel(), target[b].ravel()
        assert float(counts["tp"][b]) == np.sum(p & t)
        assert float(counts["fp"][b]) == np.sum(p & ~t)
        assert float(counts["fn"][b]) == np.sum(~p & t)
        assert float(counts["tn"][b]) == np.sum(~p & ~t)
        assert float(metrics.iou_score(pred, target)[b]) == pytest.approx(
            jaccard_score(t, p), rel=1e-6
        )
        assert float(metrics.dice_score(pred, target)[b]) == pytest.approx(f1_score(t, p), rel=1e-6)
    # Pooled ("micro") scores from summed counts.
    summed = {k: jnp.sum(v) for k, v in counts.items()}
    prf = metrics.precision_recall_f1(summed["tp"], summed["fp"], summed["fn"])
    ref_p, ref_r, ref_f, _ = precision_recall_fscore_support(
        target.ravel(), pred.ravel(), average="binary"
    )
    assert float(prf["precision"]) == pytest.approx(ref_p, rel=1e-6)
    assert float(prf["recall"]) == pytest.approx(ref_r, rel=1e-6)
    assert float(prf["f1"]) == pytest.approx(ref_f, rel=1e-6)


def test_precision_recall_f1_zero_division():
    """Zero denominators give 0.0 like sklearn's zero_division=0."""
    out = metrics.precision_recall_f1(
        jnp.array([0.0, 0.0, 0.0]), jnp.array([0.0, 3.0, 0.0]), jnp.array([0.0, 0.0, 2.0])
    )
    cases = [
        (np.zeros(4, int), np.zeros(4, int)),  # nothing at all
        (np.zeros(4, int), np.array([1, 1, 1, 0])),  # only false positives
        (np.array([1, 1, 0, 0]), np.zeros(4, int)),  # only false negatives
    ]
    for i, (y_true, y_pred) in enumerate(cases):
        ref = precision_recall_fscore_support(y_true, y_pred, average="binary", zero_division=0)
        for key, value in zip(("precision", "recall", "f1"), ref[:3]):
            assert float(out[key][i]) == value == 0.0
    assert all(np.isfinite(np.asarray(v)).all() for v in out.values())


def test_sum_and_count_streaming_mean():
    """Accumulating (sum, count) over batches equals the mean of all non-NaN values."""
    batches = [jnp.array([0.5, jnp.nan, 1.0]), jnp.array([jnp.nan]), jnp.array([0.0])]
    total, count = 0.0, 0.0
    for b in batches:
        s, c = metrics.sum_and_count(b)
        total, count = total + float(s), count + float(c)
    assert count == 3.0
    assert total / count == pytest.approx(0.5)
    assert np.isnan(float(metrics.nan_mean(jnp.array([jnp.nan, jnp.nan]))))


def test_jit():
    """All metrics trace under jax.jit and give the eager values."""
    pred, target = _masks()

    @jax.jit
    def f(p, t):
        c = metrics.confusion_counts(p, t)
        return (
            metrics.dice_score(p, t),
            metrics.iou_score(p, t, ignore_empty=False),
            metrics.precision_recall_f1(c["tp"], c["fp"], c["fn"])["f1"],
            metrics.nan_mean(metrics.dice_score(p, t)),
        )

    dice, iou, f1, mean = f(jnp.asarray(pred), jnp.asarray(target))
    np.testing.assert_allclose(np.asarray(dice)[:2], [0.4, 1.0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(iou), [0.25, 1.0, 1.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(f1), [0.4, 1.0, 0.0, 0.0], rtol=1e-6)
    assert float(mean) == pytest.approx(0.7)


def _ratios(counts):
    """accuracy, sensitivity and specificity of a `binary_confusion` dict, as floats."""
    return (
        float(metrics.accuracy(counts["tp"], counts["fp"], counts["fn"], counts["tn"])),
        float(metrics.sensitivity(counts["tp"], counts["fn"])),
        float(metrics.specificity(counts["tn"], counts["fp"])),
    )


def test_binary_confusion_hand_values():
    """Pooled counts and ratios; the padded last row is ignored through ``valid``."""
    pred = np.array([1, 1, 0, 0, 1, 0, 1])
    labels = np.array([1, 0, 1, 0, 1, 0, 0])
    valid = np.array([True] * 6 + [False])
    out = metrics.binary_confusion(pred, labels, valid)
    assert sorted(out) == ["fn", "fp", "tn", "tp"]
    # Rows 0..5: tp at 0 and 4, fp at 1, fn at 2, tn at 3 and 5.
    assert [float(out[k]) for k in ("tp", "fp", "fn", "tn")] == [2.0, 1.0, 1.0, 2.0]
    # accuracy (2 + 2) / 6, sensitivity 2 / (2 + 1), specificity 2 / (2 + 1).
    np.testing.assert_allclose(_ratios(out), [4 / 6, 2 / 3, 2 / 3], rtol=1e-6)


def test_binary_confusion_against_sklearn():
    """Random labels with a validity mask agree with confusion_matrix and recall_score."""
    rng = np.random.default_rng(1)
    pred = rng.random(50) > 0.4
    labels = rng.random(50) > 0.6
    valid = rng.random(50) > 0.2
    out = jax.jit(metrics.binary_confusion)(pred, labels, valid)
    tn, fp, fn, tp = confusion_matrix(labels[valid], pred[valid], labels=[0, 1]).ravel()
    assert [float(out[k]) for k in ("tp", "fp", "fn", "tn")] == [tp, fp, fn, tn]
    acc, sens, spec = _ratios(out)
    assert acc == pytest.approx((tp + tn) / valid.sum(), rel=1e-6)
    assert sens == pytest.approx(recall_score(labels[valid], pred[valid]), rel=1e-6)
    # Specificity is the recall of the negative class.
    assert spec == pytest.approx(recall_score(labels[valid], pred[valid], pos_label=0), rel=1e-6)


def test_ratios_zero_division_is_nan():
    """No positive labels: sensitivity NaN like sklearn zero_division=nan; nothing valid:
    every ratio NaN; per-element arrays broadcast."""
    labels = np.zeros(4, int)
    pred = np.array([0, 1, 0, 0])
    out = metrics.binary_confusion(pred, labels)
    assert np.isnan(recall_score(labels, pred, zero_division=np.nan))
    acc, sens, spec = _ratios(out)
    assert acc == pytest.approx(0.75) and np.isnan(sens) and spec == pytest.approx(0.75)
    none_valid = metrics.binary_confusion(pred, labels, np.zeros(4, bool))
    assert float(none_valid["tn"]) == 0.0
    assert all(np.isnan(r) for r in _ratios(none_valid))
    np.testing.assert_allclose(
        np.asarray(metrics.sensitivity(jnp.array([3.0, 0.0]), jnp.array([1.0, 0.0]))),
        [0.75, np.nan],
    )


def test_roc_auc_hand_values():
    """Two small cases worked out pair by pair."""
    # Positives 0.35, 0.8 vs negatives 0.1, 0.4: 0.35 beats 0.1 only, 0.8 beats both
    # -> 3 of 4 pairs = 0.75.
    auc = metrics.roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    assert float(auc) == pytest.approx(0.75)
    # Positives 1, 3 vs negatives 1, 2: (1, 1) tie = 1/2, (1, 2) = 0, (3, 1) = 1,
    # (3, 2) = 1 -> 2.5 / 4 = 0.625.
    auc = metrics.roc_auc(np.array([1.0, 1.0, 2.0, 3.0]), np.array([0, 1, 0, 1]))
    assert float(auc) == pytest.approx(0.625)


def test_roc_auc_against_sklearn_with_ties_and_padding():
    """Scores rounded to 1 decimal (many ties), padded rows masked, under jit."""
    rng = np.random.default_rng(2)
    auc_fn = jax.jit(metrics.roc_auc)
    for _ in range(5):
        labels = rng.random(200) > 0.7
        scores = np.round(rng.random(200) * 0.6 + 0.3 * labels, 1).astype(np.float32)
        valid = rng.random(200) > 0.25
        # Padding rows carry garbage that would change the AUC if counted.
        scores_padded = np.where(valid, scores, 100.0 * ~labels)
        ref = roc_auc_score(labels[valid], scores[valid])
        assert float(auc_fn(scores_padded, labels, valid)) == pytest.approx(ref, abs=1e-6)
        assert float(auc_fn(scores, labels, None)) == pytest.approx(
            roc_auc_score(labels, scores), abs=1e-6
        )


def test_roc_auc_edge_cases():
    """One class gives NaN; infinite scores are ranked; a valid NaN score gives NaN."""
    assert np.isnan(float(metrics.roc_auc(np.array([0.2, 0.5]), np.array([1, 1]))))
    only_negatives_valid = metrics.roc_auc(
        np.array([0.2, 0.5, 0.9]), np.array([0, 0, 1]), np.array([True, True, False])
    )
    assert np.isnan(float(only_negatives_valid))
    # Positives inf, 0 vs negatives inf, -inf: (inf, inf) tie 1/2, (inf, -inf) 1,
    # (0, inf) 0, (0, -inf) 1 -> 2.5 / 4.
    inf = np.inf
    auc = metrics.roc_auc(np.array([inf, 0.0, inf, -inf]), np.array([1, 1, 0, 0]))
    assert float(auc) == pytest.approx(0.625)
    nan_score = metrics.roc_auc(np.array([np.nan, 0.1, 0.9]), np.array([1, 0, 1]))
    assert np.isnan(float(nan_score))
    masked_nan = metrics.roc_auc(
        np.array([np.nan, 0.1, 0.9]), np.array([1, 0, 1]), np.array([False, True, True])
    )
    assert float(masked_nan) == 1.0


def test_point_errors_and_pck():
    """Euclidean errors per sample and point; PCK skips NaN and masked entries."""
    pred = np.array([[[3.0, 4.0], [1.0, 1.0]], [[0.0, 0.0], [2.0, 2.0]]])
    true = np.array([[[0.0, 0.0], [1.0, 2.0]], [[6.0, 8.0], [np.nan, np.nan]]])
    errors = jax.jit(metrics.point_errors)(pred, true)
    assert errors.shape == (2, 2)
    # 3-4-5 triangle, 1 px, 6-8-10 triangle, missing point.
    np.testing.assert_allclose(np.asarray(errors[0]), [5.0, 1.0])
    assert float(errors[1, 0]) == pytest.approx(10.0) and np.isnan(float(errors[1, 1]))
    # Counted: 5, 1, 10 -> <= 5 (inclusive): 5 and 1 -> 2 / 3.
    assert float(metrics.pck(errors, 5.0)) == pytest.approx(2 / 3)
    assert float(metrics.pck(errors, 4.9)) == pytest.approx(1 / 3)
    # Only sample 0 valid: 5 and 1 are both <= 5.
    assert float(metrics.pck(errors, 5.0, np.array([True, False]))) == 1.0
    assert np.isnan(float(metrics.pck(errors, 5.0, np.array([False, False]))))
    # Per-sample thresholds (B, 1): sample 0 at 2 (only the 1 passes), sample 1 at 10.
    per_sample = metrics.pck(errors, np.array([[2.0], [10.0]]))
    assert float(per_sample) == pytest.approx(2 / 3)
