"""Segmentation, classification and keypoint metrics as pure, jit-able `jax.numpy` functions.

All functions are batch-first: inputs have shape (B, ...) and per-sample results have
shape (B,). Masks may be boolean, 0/1 integers, or floats (thresholded at > 0.5).

Per-sample scores follow MONAI's ``DiceMetric`` conventions for empty targets:

* ``ignore_empty=True``: a sample whose target is empty scores NaN, so it is left out of
  `nan_mean` / `sum_and_count`.
* ``ignore_empty=False``: a sample whose target is empty scores 1.0 if the prediction is
  also empty, else 0.0.

For evaluation over many batches, accumulate ``sum_and_count(per_sample)`` pairs (or the
summed `confusion_counts`) on the host and divide once at the end.

Classification (`binary_confusion`, `roc_auc`) and `pck` pool over the whole batch and
return scalars. They take an optional ``valid`` mask so that padding rows of a fixed-size
batch are ignored. Unlike `precision_recall_f1`, an undefined classification ratio (no
positives for `sensitivity`, one class only for `roc_auc`, nothing counted for `pck`) is
NaN rather than 0. `point_errors` is per sample and per keypoint, (B, K).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "dice_score",
    "iou_score",
    "confusion_counts",
    "precision_recall_f1",
    "nan_mean",
    "sum_and_count",
    "binary_confusion",
    "accuracy",
    "sensitivity",
    "specificity",
    "roc_auc",
    "score_histograms",
    "auc_from_histograms",
    "point_errors",
    "pck",
]


def _binarize(x: jnp.ndarray) -> jnp.ndarray:
    """Turns a mask into a boolean array.

    Args:
      x: array of booleans, 0/1 integers or floats.

    Returns:
      Boolean array of the same shape: ``x`` itself for booleans, else ``x > 0.5``.
    """
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        return x
    return x > 0.5


def _check_shapes(pred: jnp.ndarray, target: jnp.ndarray) -> None:
    """Raises if prediction and target shapes differ or lack a batch axis.

    Args:
      pred: predicted mask, shape (B, ...).
      target: reference mask, shape (B, ...).

    Returns:
      None.

    Raises:
      ValueError: if the shapes differ or the arrays are 0-dimensional.
    """
    if jnp.shape(pred) != jnp.shape(target):
        raise ValueError(f"pred and target shapes differ: {jnp.shape(pred)} vs {jnp.shape(target)}")
    if jnp.ndim(pred) < 1:
        raise ValueError("pred and target need a leading batch axis, got a scalar")


def _per_sample_sums(pred: jnp.ndarray, target: jnp.ndarray):
    """Per-sample intersection and foreground sizes of two binary masks.

    Args:
      pred: predicted mask, shape (B, ...).
      target: reference mask, shape (B, ...).

    Returns:
      Tuple (intersection, pred_size, target_size), each float32 of shape (B,).
    """
    _check_shapes(pred, target)
    p = _binarize(pred)
    t = _binarize(target)
    axes = tuple(range(1, p.ndim))
    inter = jnp.sum(p & t, axis=axes, dtype=jnp.float32)
    p_sum = jnp.sum(p, axis=axes, dtype=jnp.float32)
    t_sum = jnp.sum(t, axis=axes, dtype=jnp.float32)
    return inter, p_sum, t_sum


def _empty_target_rule(score, p_sum, t_sum, ignore_empty: bool):
    """Applies the MONAI empty-target convention to per-sample scores.

    Args:
      score: per-sample score computed assuming a non-empty target, shape (B,).
      p_sum: per-sample prediction foreground size, shape (B,).
      t_sum: per-sample target foreground size, shape (B,).
      ignore_empty: if True empty targets give NaN; else 1.0 when the prediction is
        also empty and 0.0 otherwise.

    Returns:
      float32 array of shape (B,).
    """
    if ignore_empty:
        empty_value = jnp.full_like(score, jnp.nan)
    else:
        empty_value = jnp.where(p_sum > 0, 0.0, 1.0).astype(score.dtype)
    return jnp.where(t_sum > 0, score, empty_value)


def dice_score(pred, target, *, ignore_empty: bool = True) -> jnp.ndarray:
    """Per-sample Dice coefficient 2|P∩T| / (|P| + |T|) of binary masks.

    Args:
      pred: predicted mask, shape (B, ...): bool, 0/1 ints, or floats (> 0.5 is
        foreground).
      target: reference mask with the same shape and conventions.
      ignore_empty: MONAI semantics for samples with an empty target: True gives NaN
        (left out of `nan_mean`); False gives 1.0 if the prediction is also empty,
        else 0.0.

    Returns:
      float32 array of shape (B,).
    """
    inter, p_sum, t_sum = _per_sample_sums(pred, target)
    denom = p_sum + t_sum
    score = 2.0 * inter / jnp.where(denom > 0, denom, 1.0)
    return _empty_target_rule(score, p_sum, t_sum, ignore_empty)


def iou_score(pred, target, *, ignore_empty: bool = True) -> jnp.ndarray:
    """Per-sample intersection over union |P∩T| / |P∪T| of binary masks.

    Args:
      pred: predicted mask, shape (B, ...): bool, 0/1 ints, or floats (> 0.5 is
        foreground).
      target: reference mask with the same shape and conventions.
      ignore_empty: same empty-target rule as `dice_score`.

    Returns:
      float32 array of shape (B,).
    """
    inter, p_sum, t_sum = _per_sample_sums(pred, target)
    union = p_sum + t_sum - inter
    score = inter / jnp.where(union > 0, union, 1.0)
    return _empty_target_rule(score, p_sum, t_sum, ignore_empty)


def confusion_counts(pred, target) -> dict[str, jnp.ndarray]:
    """Per-sample pixel confusion counts of binary masks.

    Counts are float32 so they can be summed and divided directly; float32 holds
    integers exactly up to 2**24 (about 16.7M) pixels, so sum large evaluations on the
    host in float64 / int64.

    Args:
      pred: predicted mask, shape (B, ...): bool, 0/1 ints, or floats (> 0.5 is
        foreground).
      target: reference mask with the same shape and conventions.

    Returns:
      Dict with keys ``"tp"``, ``"fp"``, ``"fn"``, ``"tn"``, each float32 of shape (B,).
    """
    _check_shapes(pred, target)
    p = _binarize(pred)
    t = _binarize(target)
    axes = tuple(range(1, p.ndim))

    def count(m):
        return jnp.sum(m, axis=axes, dtype=jnp.float32)

    return {
        "tp": count(p & t),
        "fp": count(p & ~t),
        "fn": count(~p & t),
        "tn": count(~p & ~t),
    }


def _safe_div(num, den):
    """Divides, returning 0.0 where the denominator is 0 (no NaN, no inf, safe grads).

    Args:
      num: numerator array.
      den: denominator array, broadcastable with ``num``.

    Returns:
      float32 array ``num / den`` with 0.0 where ``den == 0``.
    """
    num = jnp.asarray(num, jnp.float32)
    den = jnp.asarray(den, jnp.float32)
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1.0), 0.0)


def precision_recall_f1(tp, fp, fn) -> dict[str, jnp.ndarray]:
    """Precision, recall and F1 from (usually summed) confusion counts.

    Matches scikit-learn with ``zero_division=0``: a ratio whose denominator is 0 is
    0.0. F1 is computed as 2tp / (2tp + fp + fn), which equals the harmonic mean of
    precision and recall whenever that is defined.

    Args:
      tp: true positives (any shape; scalars or per-sample arrays).
      fp: false positives, same shape as ``tp``.
      fn: false negatives, same shape as ``tp``.

    Returns:
      Dict with keys ``"precision"``, ``"recall"``, ``"f1"``, float32 arrays of the
      broadcast shape of the inputs.
    """
    tp = jnp.asarray(tp, jnp.float32)
    fp = jnp.asarray(fp, jnp.float32)
    fn = jnp.asarray(fn, jnp.float32)
    return {
        "precision": _safe_div(tp, tp + fp),
        "recall": _safe_div(tp, tp + fn),
        "f1": _safe_div(2.0 * tp, 2.0 * tp + fp + fn),
    }


def nan_mean(x) -> jnp.ndarray:
    """Mean over all elements, ignoring NaNs.

    Args:
      x: array of any shape (e.g. per-sample scores with NaN for ignored samples).

    Returns:
      float32 scalar; NaN if every element is NaN (or ``x`` is empty).
    """
    total, count = sum_and_count(x)
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), jnp.nan)


def sum_and_count(x) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Sum of the non-NaN elements and how many there are, for streaming means.

    Accumulate the pairs over batches and divide once: ``mean = sum(s) / sum(c)``.

    Args:
      x: array of any shape (e.g. per-sample scores from `dice_score`).

    Returns:
      Tuple ``(nansum, count)`` of float32 scalars.
    """
    x = jnp.asarray(x, jnp.float32)
    valid = ~jnp.isnan(x)
    total = jnp.sum(jnp.where(valid, x, 0.0))
    count = jnp.sum(valid, dtype=jnp.float32)
    return total, count


# ----------------------------------------------------------------------------------------
# Classification (one label and one score per sample).
# ----------------------------------------------------------------------------------------


def _valid_mask(valid, shape) -> jnp.ndarray:
    """Broadcasts an optional validity mask over the trailing axes of ``shape``.

    Args:
      valid: None (everything valid), or a boolean-like array whose shape is a prefix of
        ``shape`` (e.g. (B,) for (B, K) data).
      shape: shape of the data the mask applies to.

    Returns:
      Boolean array of shape ``shape``.
    """
    if valid is None:
        return jnp.ones(shape, jnp.bool_)
    valid = jnp.asarray(valid).astype(jnp.bool_)
    valid = jnp.reshape(valid, valid.shape + (1,) * (len(shape) - valid.ndim))
    return jnp.broadcast_to(valid, shape)


def _nan_div(num, den) -> jnp.ndarray:
    """Divides, returning NaN where the denominator is 0 (the ratio is undefined).

    Args:
      num: numerator array.
      den: denominator array, broadcastable with ``num``.

    Returns:
      float32 array ``num / den`` with NaN where ``den == 0``.
    """
    num = jnp.asarray(num, jnp.float32)
    den = jnp.asarray(den, jnp.float32)
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1.0), jnp.nan)


def binary_confusion(pred_labels, labels, valid=None) -> dict[str, jnp.ndarray]:
    """Confusion counts of binary classification, pooled over every (valid) element.

    Sum the counts over batches, then get ratios from `accuracy`, `sensitivity` and
    `specificity`. Counts are float32 (exact up to 2**24 elements).

    Args:
      pred_labels: predicted labels, shape (B,) or (B, ...): bool, 0/1 ints, or floats
        (> 0.5 is positive; threshold probabilities yourself for another cut-off).
      labels: reference labels, same shape and conventions.
      valid: optional boolean mask of shape (B,) (or any prefix of the label shape); False
        elements, e.g. padding rows, are not counted.

    Returns:
      Dict with keys ``"tp"``, ``"fp"``, ``"fn"``, ``"tn"``, each a float32 scalar.
    """
    _check_shapes(pred_labels, labels)
    p = _binarize(pred_labels)
    t = _binarize(labels)
    keep = _valid_mask(valid, p.shape)

    def count(m):
        return jnp.sum(m & keep, dtype=jnp.float32)

    return {
        "tp": count(p & t),
        "fp": count(p & ~t),
        "fn": count(~p & t),
        "tn": count(~p & ~t),
    }


def accuracy(tp, fp, fn, tn) -> jnp.ndarray:
    """Share of correct decisions, (tp + tn) / (tp + fp + fn + tn).

    Args:
      tp: true positives (scalar or array, e.g. from `binary_confusion`).
      fp: false positives, same shape.
      fn: false negatives, same shape.
      tn: true negatives, same shape.

    Returns:
      float32 array of the broadcast shape; NaN where all counts are 0.
    """
    return _nan_div(jnp.add(tp, tn), jnp.add(jnp.add(tp, fp), jnp.add(fn, tn)))


def sensitivity(tp, fn) -> jnp.ndarray:
    """Sensitivity (recall of positives, true positive rate), tp / (tp + fn).

    Matches scikit-learn's ``recall_score(..., zero_division=np.nan)``.

    Args:
      tp: true positives (scalar or array).
      fn: false negatives, same shape.

    Returns:
      float32 array of the broadcast shape; NaN where there is no positive label.
    """
    return _nan_div(tp, jnp.add(tp, fn))


def specificity(tn, fp) -> jnp.ndarray:
    """Specificity (recall of negatives, true negative rate), tn / (tn + fp).

    Args:
      tn: true negatives (scalar or array).
      fp: false positives, same shape.

    Returns:
      float32 array of the broadcast shape; NaN where there is no negative label.
    """
    return _nan_div(tn, jnp.add(tn, fp))


def roc_auc(scores, labels, valid=None) -> jnp.ndarray:
    """Exact area under the ROC curve, the Mann–Whitney U statistic with ties counted 1/2.

    AUC = P(score of a positive > score of a negative) + P(equal) / 2 over all valid
    (positive, negative) pairs, which equals scikit-learn's ``roc_auc_score``. Computed by
    sorting the negatives' scores and binary-searching each positive's score, O(N log N)
    with fixed shapes, so it runs under jit with padded batches.

    Args:
      scores: real-valued scores (higher means positive), shape (N,) or any shape (it is
        flattened). Infinite scores are allowed; a NaN score in a valid element makes the
        result NaN.
      labels: binary labels of the same shape (bool, 0/1 ints, or floats > 0.5).
      valid: optional boolean mask of the same shape (or a prefix of it); False elements
        are ignored.

    Returns:
      float32 scalar AUC in [0, 1]; NaN when the valid elements hold only one class.
    """
    _check_shapes(scores, labels)
    keep = _valid_mask(valid, jnp.shape(scores)).ravel()
    s = jnp.asarray(scores, jnp.float32).ravel()
    t = _binarize(labels).ravel()
    pos = keep & t
    neg = keep & ~t
    n_pos = jnp.sum(pos, dtype=jnp.int32)
    n_neg = jnp.sum(neg, dtype=jnp.int32)
    # Non-negatives become +inf and sort after every negative; clipping the search counts
    # to n_neg stops them being counted even against a positive scored +inf.
    neg_sorted = jnp.sort(jnp.where(neg, s, jnp.inf))
    below = jnp.minimum(jnp.searchsorted(neg_sorted, s, side="left"), n_neg)
    at_or_below = jnp.minimum(jnp.searchsorted(neg_sorted, s, side="right"), n_neg)
    # Each positive's share of negatives it beats (ties 1/2), averaged over positives;
    # each term is in [0, 1], so the float32 mean stays accurate for large N.
    wins = (below + at_or_below).astype(jnp.float32) / (2.0 * jnp.maximum(n_neg, 1))
    auc = jnp.sum(jnp.where(pos, wins, 0.0)) / jnp.maximum(n_pos, 1)
    has_nan = jnp.any(keep & jnp.isnan(s))
    return jnp.where((n_pos > 0) & (n_neg > 0) & ~has_nan, auc, jnp.nan)


def score_histograms(
    scores, target, *, bins: int = 1024, low: float = 0.0, high: float = 1.0
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-sample histograms of pixel scores, for foreground and background pixels.

    A split has far too many pixels to keep every score for an exact ROC AUC; summed over
    the split, these histograms give it to within the binning (`auc_from_histograms`).
    Pass logits with a wide range (e.g. -16..16) rather than probabilities: probabilities
    crowd the many confident pixels into the end bins, where their order is lost.

    Args:
      scores: scores, shape (B, ...); values outside [low, high] go to the end bins.
      target: reference mask of the same shape (bool, 0/1, or floats > 0.5).
      bins: number of equal-width bins over [low, high].
      low, high: the binned score range.

    Returns:
      Tuple (foreground counts, background counts), float32 arrays of shape (B, bins).
    """
    _check_shapes(scores, target)
    b = jnp.shape(scores)[0]
    s = jnp.asarray(scores, jnp.float32).reshape(b, -1)
    t = _binarize(target).reshape(b, -1).astype(jnp.float32)
    position = (s - low) / (high - low) * bins
    index = jnp.clip(jnp.floor(position).astype(jnp.int32), 0, bins - 1)
    one_hot_sum = jax.vmap(lambda i, w: jnp.zeros(bins, jnp.float32).at[i].add(w))
    return one_hot_sum(index, t), one_hot_sum(index, 1.0 - t)


def auc_from_histograms(positive_counts, negative_counts) -> float:
    """ROC AUC from binned scores: the Mann-Whitney statistic with a bin's pairs tied.

    Pairs in different bins are ordered exactly; pairs within one bin count 1/2, so the
    result differs from the exact AUC by at most half the share of (positive, negative)
    pairs that share a bin.

    Args:
      positive_counts: counts of positive elements per bin (bins ordered by score), (bins,).
      negative_counts: counts of negative elements per bin, same shape.

    Returns:
      float AUC; NaN when either class is absent.
    """
    pos = np.asarray(positive_counts, np.float64)
    neg = np.asarray(negative_counts, np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    below = np.cumsum(neg) - neg
    return float(np.sum(pos * (below + 0.5 * neg)) / (n_pos * n_neg))


# ----------------------------------------------------------------------------------------
# Keypoints.
# ----------------------------------------------------------------------------------------


def point_errors(pred_xy, true_xy) -> jnp.ndarray:
    """Euclidean distance between predicted and reference keypoints, per sample and point.

    Multiply by a per-sample pixel spacing, ``errors * spacing[:, None]``, for millimetres.

    Args:
      pred_xy: predicted (x, y), shape (B, K, 2).
      true_xy: reference (x, y), shape (B, K, 2); NaN coordinates (a missing point) give
        a NaN error.

    Returns:
      float32 array of shape (B, K), in the coordinates' unit (pixels).
    """
    _check_shapes(pred_xy, true_xy)
    diff = jnp.asarray(pred_xy, jnp.float32) - jnp.asarray(true_xy, jnp.float32)
    return jnp.sqrt(jnp.sum(diff * diff, axis=-1))


def pck(errors, threshold, valid=None) -> jnp.ndarray:
    """Percentage of correct keypoints, as a fraction: share of errors <= ``threshold``.

    Args:
      errors: keypoint errors of any shape, e.g. (B, K) from `point_errors` (in mm after
        scaling by the pixel spacing). NaN errors are left out.
      threshold: the largest error that counts as correct, in the errors' unit (a scalar,
        or an array broadcastable to ``errors``, e.g. per-sample thresholds of shape
        (B, 1)).
      valid: optional boolean mask of ``errors``'s shape or a prefix of it (e.g. (B,));
        False elements are left out.

    Returns:
      float32 scalar in [0, 1]; NaN when no error is counted.
    """
    errors = jnp.asarray(errors, jnp.float32)
    counted = _valid_mask(valid, errors.shape) & ~jnp.isnan(errors)
    correct = jnp.sum(counted & (errors <= threshold), dtype=jnp.float32)
    return _nan_div(correct, jnp.sum(counted, dtype=jnp.float32))
