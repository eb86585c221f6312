"""Evaluation plots drawn with OpenCV only (no matplotlib): Bland–Altman, scatter, ROC, curves.

Each function takes paired measurements, drops pairs where either value is NaN or
infinite, writes a PNG (creating missing parent folders) and returns summary statistics
as plain Python numbers for a JSON report. Text is drawn with OpenCV's Hershey font,
which has ASCII characters only (others show as '?').
"""

from __future__ import annotations

import math
import os

import cv2
import numpy as np

__all__ = ["bland_altman_png", "scatter_png", "roc_png", "curve_png"]

_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)
_GREY = (150, 150, 150)
_POINT = (180, 90, 20)  # BGR: blue.
_LINE = (40, 40, 210)  # BGR: red.
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_SMALL = 0.42
_LARGE = 0.6


def _clean_pairs(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Flattens two paired arrays and drops pairs where either value is not finite.

    Args:
      a: first values, any shape.
      b: second values, same number of elements.

    Returns:
      Two float64 1-D arrays of equal length.

    Raises:
      ValueError: if the sizes differ.
    """
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if a.size != b.size:
        raise ValueError(f"paired inputs differ in size: {a.size} vs {b.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def _nice_ticks(low: float, high: float, count: int = 6) -> np.ndarray:
    """Round tick values (steps of 1, 2 or 5 times a power of ten) covering a range.

    Args:
      low: smallest value to cover.
      high: largest value to cover (>= low).
      count: about how many intervals to use.

    Returns:
      Sorted float64 ticks whose first is <= low and last >= high.
    """
    if high <= low:
        pad = max(abs(low) * 0.1, 1.0)
        low, high = low - pad, high + pad
    raw_step = (high - low) / count
    power = 10.0 ** math.floor(math.log10(raw_step))
    step = next(m * power for m in (1.0, 2.0, 5.0, 10.0) if m * power >= raw_step)
    first = math.floor(low / step + 1e-9)
    last = math.ceil(high / step - 1e-9)
    return np.arange(first, last + 1) * step


def _tick_label(value: float, ticks: np.ndarray) -> str:
    """Formats a tick with just enough decimals for the tick spacing.

    Args:
      value: the tick value.
      ticks: all ticks of the axis (their spacing sets the decimals).

    Returns:
      The label, without a "-0".
    """
    step = ticks[1] - ticks[0]
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{round(value, decimals) + 0.0:.{decimals}f}"


def _put_text(image, text: str, x: float, y: float, *, scale=_SMALL, align="left", color=_BLACK):
    """Draws text with its baseline at y, aligned left, centre or right of x.

    Args:
      image: BGR canvas, drawn on in place.
      text: ASCII text.
      x: anchor x in pixels.
      y: baseline y in pixels.
      scale: font scale.
      align: "left", "centre" or "right".
      color: BGR colour.

    Returns:
      None.
    """
    (width, _), _ = cv2.getTextSize(text, _FONT, scale, 1)
    shift = {"left": 0, "centre": width // 2, "right": width}[align]
    cv2.putText(
        image, text, (int(round(x)) - shift, int(round(y))), _FONT, scale, color, 1, cv2.LINE_AA
    )


def _put_vertical_text(image, text: str, x: int, y_centre: int) -> None:
    """Draws text turned 90 degrees counter-clockwise, centred vertically on y_centre.

    Args:
      image: BGR canvas, drawn on in place.
      text: ASCII text.
      x: left edge of the turned text in pixels.
      y_centre: vertical centre in pixels.

    Returns:
      None.
    """
    (width, height), baseline = cv2.getTextSize(text, _FONT, _SMALL, 1)
    strip = np.full((height + baseline + 2, width + 2, 3), 255, np.uint8)
    cv2.putText(strip, text, (1, height + 1), _FONT, _SMALL, _BLACK, 1, cv2.LINE_AA)
    turned = cv2.rotate(strip, cv2.ROTATE_90_COUNTERCLOCKWISE)
    top = max(0, y_centre - turned.shape[0] // 2)
    bottom = min(image.shape[0], top + turned.shape[0])
    right = min(image.shape[1], x + turned.shape[1])
    image[top:bottom, x:right] = turned[: bottom - top, : right - x]


def _dashed_line(image, start, end, color, dash: int = 8) -> None:
    """Draws a dashed straight line.

    Args:
      image: BGR canvas, drawn on in place.
      start: (x, y) start in pixels.
      end: (x, y) end in pixels.
      color: BGR colour.
      dash: dash and gap length in pixels.

    Returns:
      None.
    """
    start = np.asarray(start, np.float64)
    end = np.asarray(end, np.float64)
    length = float(np.hypot(*(end - start)))
    for offset in np.arange(0.0, length, 2 * dash):
        a = start + (end - start) * offset / length
        b = start + (end - start) * min(offset + dash, length) / length
        cv2.line(
            image,
            tuple(int(round(v)) for v in a),
            tuple(int(round(v)) for v in b),
            color,
            1,
            cv2.LINE_AA,
        )


class _Axes:
    """A plot box on a canvas mapping data (x, y) to pixels, with ticks and labels."""

    def __init__(self, image, box, x_values, y_values):
        """Chooses round tick ranges covering the data and remembers the box.

        Args:
          image: BGR canvas the axes draw on.
          box: (left, top, right, bottom) of the plot area in pixels.
          x_values: values the x axis must cover (may be empty).
          y_values: values the y axis must cover (may be empty).
        """
        self.image = image
        self.left, self.top, self.right, self.bottom = box
        self.x_ticks = _nice_ticks(*self._span(x_values))
        self.y_ticks = _nice_ticks(*self._span(y_values))

    @staticmethod
    def _span(values) -> tuple[float, float]:
        """(min, max) of the values, or (0, 1) when there are none.

        Args:
          values: 1-D array-like of finite numbers.

        Returns:
          Tuple (low, high).
        """
        values = np.asarray(values, np.float64)
        if values.size == 0:
            return 0.0, 1.0
        return float(values.min()), float(values.max())

    def to_pixels(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """Maps data coordinates to pixel coordinates (y up on screen).

        Args:
          x: data x values (scalar or array).
          y: data y values, same shape.

        Returns:
          Tuple of float64 pixel x and y arrays.
        """
        x0, x1 = self.x_ticks[0], self.x_ticks[-1]
        y0, y1 = self.y_ticks[0], self.y_ticks[-1]
        px = self.left + (np.asarray(x, np.float64) - x0) / (x1 - x0) * (self.right - self.left)
        py = self.bottom - (np.asarray(y, np.float64) - y0) / (y1 - y0) * (self.bottom - self.top)
        return px, py

    def draw_frame(self, title: str, xlabel: str, ylabel: str) -> None:
        """Draws the box, ticks with labels, axis labels and the title.

        Args:
          title: text above the box.
          xlabel: text below the x tick labels.
          ylabel: text left of the y tick labels, turned 90 degrees.

        Returns:
          None.
        """
        cv2.rectangle(self.image, (self.left, self.top), (self.right, self.bottom), _BLACK, 1)
        xs, _ = self.to_pixels(self.x_ticks, np.zeros_like(self.x_ticks))
        for value, px in zip(self.x_ticks, xs):
            px = int(round(px))
            cv2.line(self.image, (px, self.bottom), (px, self.bottom + 5), _BLACK, 1)
            _put_text(
                self.image, _tick_label(value, self.x_ticks), px, self.bottom + 20, align="centre"
            )
        _, ys = self.to_pixels(np.zeros_like(self.y_ticks), self.y_ticks)
        for value, py in zip(self.y_ticks, ys):
            py = int(round(py))
            cv2.line(self.image, (self.left - 5, py), (self.left, py), _BLACK, 1)
            _put_text(
                self.image, _tick_label(value, self.y_ticks), self.left - 8, py + 5, align="right"
            )
        _put_text(
            self.image, xlabel, (self.left + self.right) / 2, self.bottom + 45, align="centre"
        )
        _put_vertical_text(self.image, ylabel, 8, (self.top + self.bottom) // 2)
        _put_text(
            self.image,
            title,
            (self.left + self.right) / 2,
            self.top - 18,
            scale=_LARGE,
            align="centre",
        )

    def draw_points(self, x, y) -> None:
        """Draws filled circles at data points.

        Args:
          x: data x values, 1-D.
          y: data y values, 1-D.

        Returns:
          None.
        """
        px, py = self.to_pixels(x, y)
        for u, v in zip(px, py):
            cv2.circle(self.image, (int(round(u)), int(round(v))), 3, _POINT, -1, cv2.LINE_AA)


def _save_png(path: str, image: np.ndarray) -> None:
    """Writes a PNG, creating missing parent folders.

    Args:
      path: output file path ending in .png.
      image: BGR uint8 image.

    Returns:
      None.

    Raises:
      OSError: if OpenCV cannot write the file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if not cv2.imwrite(path, image):
        raise OSError(f"could not write {path}")


def _spread_labels(positions, gap: float) -> list[float]:
    """Moves label baselines apart so neighbours are at least ``gap`` pixels apart.

    Args:
      positions: desired y positions, in any order.
      gap: minimum distance between consecutive labels.

    Returns:
      Adjusted positions, in the input order.
    """
    order = np.argsort(positions)
    placed = [float(positions[i]) for i in order]
    for i in range(1, len(placed)):
        placed[i] = max(placed[i], placed[i - 1] + gap)
    out = [0.0] * len(placed)
    for rank, i in enumerate(order):
        out[i] = placed[rank]
    return out


def _with_units(text: str, units: str) -> str:
    """Appends " (units)" when units are given.

    Args:
      text: label text.
      units: unit name, possibly empty.

    Returns:
      The label.
    """
    return f"{text} ({units})" if units else text


def bland_altman_png(path: str, reference, measured, *, title: str, units: str = "") -> dict:
    """Bland–Altman plot: difference (measured - reference) against the pair's mean.

    Draws the points, a solid line at the mean difference (bias) and dashed lines at the
    limits of agreement, mean +- 1.96 SD (sample SD, ddof=1), each labelled with its
    value at the right of the plot.

    Args:
      path: PNG file to write.
      reference: reference values (e.g. manual CRL), any shape.
      measured: measured values (e.g. model CRL), same number of elements. Pairs with a
        NaN or infinite value on either side are dropped.
      title: plot title (ASCII).
      units: unit for the axis labels, e.g. "mm"; empty for none.

    Returns:
      Dict of floats ``mean_diff``, ``sd_diff``, ``loa_low``, ``loa_high`` and the int
      ``n`` of pairs used. With n = 1 the SD and limits are NaN; with n = 0 everything
      but n is NaN (the plot is still written, with empty axes).
    """
    ref, meas = _clean_pairs(reference, measured)
    means = (ref + meas) / 2.0
    diffs = meas - ref
    n = int(diffs.size)
    mean_diff = float(diffs.mean()) if n else math.nan
    sd_diff = float(diffs.std(ddof=1)) if n > 1 else math.nan
    stats = {
        "mean_diff": mean_diff,
        "sd_diff": sd_diff,
        "loa_low": mean_diff - 1.96 * sd_diff,
        "loa_high": mean_diff + 1.96 * sd_diff,
        "n": n,
    }

    image = np.full((480, 680, 3), 255, np.uint8)
    lines = [
        ("mean", stats["mean_diff"], False),
        ("+1.96 SD", stats["loa_high"], True),
        ("-1.96 SD", stats["loa_low"], True),
    ]
    lines = [line for line in lines if math.isfinite(line[1])]
    axes = _Axes(
        image, (80, 50, 540, 410), means, np.concatenate([diffs, [v for _, v, _ in lines]])
    )
    axes.draw_frame(
        title,
        _with_units("Mean of reference and measured", units),
        _with_units("Measured - reference", units),
    )
    _put_text(image, f"n = {n}", axes.left + 8, axes.top + 18)
    if lines:
        _, line_ys = axes.to_pixels(np.zeros(len(lines)), np.array([v for _, v, _ in lines]))
        for (_, _, dashed), py in zip(lines, line_ys):
            start, end = (axes.left, int(round(py))), (axes.right, int(round(py)))
            if dashed:
                _dashed_line(image, start, end, _LINE)
            else:
                cv2.line(image, start, end, _LINE, 1, cv2.LINE_AA)
        for (name, value, _), py in zip(lines, _spread_labels(line_ys + 4, 16)):
            _put_text(image, f"{name} {value:.3g}", axes.right + 8, py, color=_LINE)
    axes.draw_points(means, diffs)
    _save_png(path, image)
    return stats


def scatter_png(path: str, x, y, *, title: str, xlabel: str, ylabel: str) -> dict:
    """Scatter of predicted (y) against true (x) values with the identity line y = x.

    Both axes share one range so the identity line is the box's diagonal.

    Args:
      path: PNG file to write.
      x: true / reference values, any shape.
      y: predicted values, same number of elements. Pairs with a NaN or infinite value
        on either side are dropped.
      title: plot title (ASCII).
      xlabel: x-axis label.
      ylabel: y-axis label.

    Returns:
      Dict with the int ``n`` of pairs used and floats ``mae`` (mean |y - x|, NaN when
      n = 0) and ``pearson_r`` (NaN when n < 2 or either side is constant).
    """
    x, y = _clean_pairs(x, y)
    n = int(x.size)
    mae = float(np.mean(np.abs(y - x))) if n else math.nan
    pearson_r = math.nan
    if n > 1 and np.std(x) > 0 and np.std(y) > 0:
        pearson_r = float(np.corrcoef(x, y)[0, 1])

    image = np.full((560, 560, 3), 255, np.uint8)
    both = np.concatenate([x, y])
    axes = _Axes(image, (80, 50, 530, 500), both, both)
    axes.draw_frame(title, xlabel, ylabel)
    lo, hi = axes.x_ticks[0], axes.x_ticks[-1]
    px, py = axes.to_pixels(np.array([lo, hi]), np.array([lo, hi]))
    _dashed_line(image, (px[0], py[0]), (px[1], py[1]), _GREY)
    _put_text(
        image, f"n = {n}   MAE = {mae:.3g}   r = {pearson_r:.3f}", axes.left + 8, axes.top + 18
    )
    axes.draw_points(x, y)
    _save_png(path, image)
    return {"n": n, "mae": mae, "pearson_r": pearson_r}


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct score threshold (high score = positive).

    Args:
      scores: real scores, 1-D.
      labels: 0/1 (or bool) labels, same length; both classes must be present.

    Returns:
      (fpr, tpr), each starting at 0 and ending at 1.
    """
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_tie = np.r_[np.diff(scores) != 0, True]
    tps = np.cumsum(labels)[last_of_tie]
    fps = np.cumsum(~labels)[last_of_tie]
    positives, negatives = max(int(labels.sum()), 1), max(int((~labels).sum()), 1)
    return np.r_[0.0, fps / negatives], np.r_[0.0, tps / positives]


def roc_png(path: str, scores, labels, *, title: str) -> dict:
    """ROC curve of `scores` for binary `labels` (high score = positive class), with its AUC.

    Args:
      path: PNG file to write.
      scores: real scores, any shape; NaN scores are dropped.
      labels: 0/1 labels, same number of elements.
      title: plot title (ASCII).

    Returns:
      Dict with ``n`` (int) and ``auc`` (trapezoidal area; NaN when a class is missing).
    """
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels).ravel()
    keep = np.isfinite(scores)
    scores, labels = scores[keep], labels[keep]
    n = int(scores.size)
    auc = math.nan
    fpr, tpr = np.array([0.0, 1.0]), np.array([0.0, 1.0])
    if 0 < labels.sum() < n:
        fpr, tpr = roc_curve(scores, labels)
        auc = float(np.trapezoid(tpr, fpr))
    image = np.full((560, 560, 3), 255, np.uint8)
    axes = _Axes(image, (80, 50, 530, 500), [0.0, 1.0], [0.0, 1.0])
    axes.draw_frame(title, "false positive rate", "true positive rate")
    px, py = axes.to_pixels(np.array([0.0, 1.0]), np.array([0.0, 1.0]))
    _dashed_line(image, (px[0], py[0]), (px[1], py[1]), _GREY)
    px, py = axes.to_pixels(fpr, tpr)
    points = np.stack([px, py], axis=1).round().astype(np.int32)
    cv2.polylines(image, [points], False, _LINE, 2, cv2.LINE_AA)
    _put_text(image, f"n = {n}   AUC = {auc:.3f}", axes.left + 8, axes.top + 18)
    _save_png(path, image)
    return {"n": n, "auc": auc}


def curve_png(path: str, y, *, marks=(), title: str, xlabel: str, ylabel: str) -> dict:
    """A line plot of `y` against its index, with vertical dashed lines at `marks`.

    Args:
      path: PNG file to write.
      y: 1-D values (e.g. the LV area per frame).
      marks: indices to mark (e.g. detected end-systoles).
      title, xlabel, ylabel: ASCII labels.

    Returns:
      Dict with ``n`` (points) and ``num_marks``.
    """
    y = np.asarray(y, np.float64).ravel()
    x = np.arange(y.size, dtype=np.float64)
    image = np.full((420, 760, 3), 255, np.uint8)
    axes = _Axes(image, (80, 50, 730, 360), x, y[np.isfinite(y)])
    axes.draw_frame(title, xlabel, ylabel)
    for mark in marks:
        px, _ = axes.to_pixels(np.array([float(mark)]), np.array([0.0]))
        _dashed_line(image, (px[0], axes.top), (px[0], axes.bottom), _LINE)
    if y.size > 1:
        px, py = axes.to_pixels(x, np.nan_to_num(y))
        points = np.stack([px, py], axis=1).round().astype(np.int32)
        cv2.polylines(image, [points], False, _POINT, 2, cv2.LINE_AA)
    _save_png(path, image)
    return {"n": int(y.size), "num_marks": len(marks)}


def group_scatter_png(
    path: str, coords, groups, *, names, colours, title: str, xlabel: str, ylabel: str
) -> None:
    """A scatter of (N, 2) points coloured by group index (-1: unknown, grey), with a legend.

    Args:
      path: PNG file to write.
      coords: (N, 2) points.
      groups: (N,) ints indexing `names` and `colours` (BGR tuples), or -1.
      title, xlabel, ylabel: ASCII text.
    """
    coords = np.asarray(coords, np.float64)
    groups = np.asarray(groups, np.int64)
    image = np.full((560, 640, 3), 255, np.uint8)
    axes = _Axes(image, (80, 50, 500, 480), coords[:, 0], coords[:, 1])
    axes.draw_frame(title, xlabel, ylabel)
    px, py = axes.to_pixels(coords[:, 0], coords[:, 1])
    for x, y, group in zip(px, py, groups):
        colour = colours[group] if group >= 0 else _GREY
        cv2.circle(image, (int(round(x)), int(round(y))), 5, colour, -1, cv2.LINE_AA)
    legend = list(zip(names, colours))
    if np.any(groups < 0):
        legend.append(("unknown", _GREY))
    for i, (name, colour) in enumerate(legend):
        y = 70 + 22 * i
        cv2.circle(image, (515, y - 4), 5, colour, -1, cv2.LINE_AA)
        _put_text(image, name, 526, y)
    _save_png(path, image)


def confusion_png(path: str, matrix, names, *, title: str) -> None:
    """The confusion matrix (rows true, columns predicted) as a grid of counts, each cell
    shaded by its share of the row: green on the diagonal, red off it."""
    matrix = np.asarray(matrix, np.int64)
    k = len(names)
    cell, left, top = 110, 150, 90
    image = np.full((top + k * cell + 40, left + k * cell + 30, 3), 255, np.uint8)
    rows = np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    for i in range(k):
        for j in range(k):
            shade = int(round(255 - 180 * matrix[i, j] / rows[i, 0]))
            x0, y0 = left + j * cell, top + i * cell
            colour = (shade, 255, shade) if i == j else (shade, shade, 255)  # BGR.
            cv2.rectangle(image, (x0, y0), (x0 + cell, y0 + cell), colour, -1)
            cv2.rectangle(image, (x0, y0), (x0 + cell, y0 + cell), _BLACK, 1)
            _put_text(
                image,
                str(matrix[i, j]),
                x0 + cell / 2,
                y0 + cell / 2 + 6,
                scale=_LARGE,
                align="centre",
            )
        _put_text(image, names[i][:18], left - 6, top + i * cell + cell / 2 + 4, align="right")
        _put_text(image, names[i][:18], left + i * cell + cell / 2, top - 8, align="centre")
    _put_text(image, "predicted", left + k * cell / 2, top - 32, align="centre")
    _put_text(image, title, (left + k * cell) / 2, 22, scale=_LARGE, align="centre")
    _put_vertical_text(image, "true", 10, top + k * cell // 2)
    _save_png(path, image)
