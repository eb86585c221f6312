"""ICH metrics and losses against scikit-learn / optax on random inputs."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn import metrics as skm

from medjax import losses, metrics
from medjax.tasks import ich


def random_masks(seed, shape=(6, 16, 16, 1), p=0.2):
    rng = np.random.default_rng(seed)
    target = (rng.random(shape) < p).astype(np.uint8)
    pred = (rng.random(shape) < p).astype(np.uint8)
    target[0] = 0  # An empty slice, as most CT slices are.
    return pred, target


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_table_equals_sklearn(seed):
    pred, target = random_masks(seed)
    counts = {k: float(v.sum()) for k, v in metrics.confusion_counts(pred, target).items()}
    table = ich.segmentation_table(counts["tp"], counts["fp"], counts["fn"], counts["tn"])
    y, p = target.ravel(), pred.ravel()
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        y, p, labels=[0, 1], zero_division=0
    )
    for c in (0, 1):
        assert table[f"pixel_precision_{c}"] == pytest.approx(precision[c], abs=1e-6)
        assert table[f"pixel_recall_{c}"] == pytest.approx(recall[c], abs=1e-6)
        assert table[f"pixel_f1_{c}"] == pytest.approx(f1[c], abs=1e-6)
    assert table["pixel_accuracy"] == pytest.approx(skm.accuracy_score(y, p), abs=1e-6)
    assert table["iou_pooled"] == pytest.approx(skm.jaccard_score(y, p), abs=1e-6)
    assert table["dice_pooled"] == pytest.approx(skm.f1_score(y, p), abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_histogram_pixel_auc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    target = (rng.random((4, 32, 32, 1)) < 0.1).astype(np.uint8)
    # Informative but imperfect scores.
    probs = np.clip(rng.normal(0.35 + 0.3 * target, 0.15), 0, 1).astype(np.float32)
    fg, bg = metrics.score_histograms(probs, target, bins=512)
    fg, bg = np.asarray(fg), np.asarray(bg)
    assert (
        fg.shape == (4, 512) and fg.sum() == target.sum() and bg.sum() == target.size - target.sum()
    )
    auc = metrics.auc_from_histograms(fg.sum(0), bg.sum(0))
    exact = skm.roc_auc_score(target.ravel(), probs.ravel())
    assert 0.8 < exact < 0.99
    assert auc == pytest.approx(exact, abs=2e-3)


def test_histograms_of_logits_over_a_range():
    rng = np.random.default_rng(5)
    target = (rng.random((2, 16, 16, 1)) < 0.2).astype(np.uint8)
    logits = rng.normal(-4.0 + 6.0 * target, 3.0).astype(np.float32)
    fg, bg = metrics.score_histograms(logits, target, bins=1024, low=-16, high=16)
    auc = metrics.auc_from_histograms(np.asarray(fg).sum(0), np.asarray(bg).sum(0))
    assert auc == pytest.approx(skm.roc_auc_score(target.ravel(), logits.ravel()), abs=1e-3)


def test_histogram_auc_is_exact_when_scores_sit_in_distinct_bins():
    scores = np.array([0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.95], np.float32)
    labels = np.array([0, 1, 0, 0, 1, 0, 1, 1])
    fg, bg = metrics.score_histograms(scores[None, :], labels[None, :], bins=10)
    auc = metrics.auc_from_histograms(np.asarray(fg)[0], np.asarray(bg)[0])
    assert auc == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    assert np.isnan(metrics.auc_from_histograms(np.zeros(4), np.ones(4)))


def test_detection_metrics_equal_sklearn():
    rng = np.random.default_rng(3)
    labels = rng.random(50) < 0.3
    scores = np.clip(rng.normal(0.3 + 0.4 * labels, 0.2), 0, 1)
    out = ich.detection_metrics(scores, labels, threshold=0.5)
    pred = scores > 0.5
    assert out["slice_auc"] == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-6)
    assert out["slice_sensitivity"] == pytest.approx(skm.recall_score(labels, pred))
    assert out["slice_specificity"] == pytest.approx(skm.recall_score(~labels, ~pred))
    assert out["slice_accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))


def test_slice_overlap_means_conventions():
    # Slices: perfect hit, half overlap, empty target + empty prediction, empty target +
    # false positive.
    inter = np.array([10, 5, 0, 0])
    pred = np.array([10, 10, 0, 4])
    target = np.array([10, 10, 0, 0])
    out = ich.slice_overlap_means(inter, pred, target)
    assert out["dice_positive_slices"] == pytest.approx((1.0 + 0.5) / 2)
    assert out["iou_positive_slices"] == pytest.approx((1.0 + 5 / 15) / 2)
    assert out["dice_all_slices"] == pytest.approx((1.0 + 0.5 + 1.0 + 0.0) / 4)
    assert out["iou_all_slices"] == pytest.approx((1.0 + 5 / 15 + 1.0 + 0.0) / 4)


def test_patient_rows_pool_the_scan():
    rows = [
        dict(
            patient_id="049",
            label=1,
            p_hemorrhage=0.9,
            target_px=10,
            pred_px=8,
            inter_px=6,
            dice=12 / 18,
            target_area_cm2=0.5,
            pred_area_cm2=0.4,
        ),
        dict(
            patient_id="049",
            label=0,
            p_hemorrhage=0.2,
            target_px=0,
            pred_px=0,
            inter_px=0,
            dice=1.0,
            target_area_cm2=0.0,
            pred_area_cm2=0.0,
        ),
        dict(
            patient_id="050",
            label=0,
            p_hemorrhage=0.7,
            target_px=0,
            pred_px=3,
            inter_px=0,
            dice=0.0,
            target_area_cm2="",
            pred_area_cm2="",
        ),
    ]
    out = {r["patient_id"]: r for r in ich.patient_rows(rows, threshold=0.5)}
    assert out["049"]["dice_pooled"] == pytest.approx(12 / 18, abs=1e-5)
    assert out["049"]["hemorrhage_slices"] == 1 and out["049"]["detected"] == 1
    assert out["049"]["target_area_cm2"] == pytest.approx(0.5)
    assert out["050"]["has_hemorrhage"] == 0 and out["050"]["detected"] == 1
    assert out["050"]["dice_pooled"] == 0.0 and out["050"]["target_area_cm2"] == ""


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.75, 1.0), (-1.0, 2.0)])
def test_focal_loss_matches_optax(alpha, gamma):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 8, 8, 1)) * 3, jnp.float32)
    targets = jnp.asarray(rng.random((2, 8, 8, 1)) < 0.2, jnp.float32)
    expected = optax.sigmoid_focal_loss(
        logits, targets, alpha=None if alpha < 0 else alpha, gamma=gamma
    ).mean()
    got = losses.sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    # gamma 0 without alpha is plain binary cross-entropy.
    assert float(losses.sigmoid_focal_loss(logits, targets, alpha=-1, gamma=0.0)) == pytest.approx(
        float(losses.sigmoid_binary_cross_entropy(logits, targets)), rel=1e-6
    )


def test_segmentation_loss_adds_the_configured_terms():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 8, 8, 1)), jnp.float32)
    targets = jnp.asarray(rng.random((2, 8, 8, 1)) < 0.3, jnp.float32)
    cfg = dict(dice_weight=0.5, bce_weight=2.0, focal_weight=3.0, focal_alpha=0.6, focal_gamma=1.5)
    expected = (
        0.5 * losses.soft_dice_loss(logits, targets)
        + 2.0 * losses.sigmoid_binary_cross_entropy(logits, targets)
        + 3.0 * losses.sigmoid_focal_loss(logits, targets, alpha=0.6, gamma=1.5)
    )
    assert float(losses.segmentation_loss(logits, targets, cfg)) == pytest.approx(
        float(expected), rel=1e-6
    )
