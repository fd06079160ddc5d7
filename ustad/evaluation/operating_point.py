"""Metrics at an operating point: what a production line gets from a threshold.

Beside the threshold-free AUROC and AU-PRO, :func:`operating_point_metrics` reports, at the
calibrated threshold (from good images only, :mod:`ustad.calibration`), the image-level
false-reject rate (good images called anomalous), miss rate (defective images passed),
precision, recall and F1, and pixel-level F1 and IoU of the defect masks at the pixel threshold;
and, for comparison, the F1-max *oracle*: the threshold that maximises F1 on the test labels
themselves, which no line can set in advance (marked ``uses_test_labels``).

An image (pixel) is called anomalous when its score is strictly above the threshold.
"""

from __future__ import annotations

import numpy as np


def _ratio(numerator: int, denominator: int) -> float | None:
    """``numerator / denominator``, None when undefined (JSON null, not NaN)."""
    return float(numerator / denominator) if denominator else None


def _f1(tp: int, fp: int, fn: int) -> float | None:
    return _ratio(2 * tp, 2 * tp + fp + fn)


def image_operating_point(scores, labels, threshold: float) -> dict:
    """Image-level decisions at ``threshold``.

    Args:
      scores: ``[N]`` image scores.
      labels: ``[N]`` 1 = defective, 0 = good.
      threshold: anomalous ⟺ score > threshold.

    Returns:
      ``{threshold, false_reject_rate, miss_rate, precision, recall, f1, tp, fp, fn, tn}``
      (a rate is None when its denominator is 0, e.g. no defective images).
    """
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must both be [N]")
    flagged = scores > threshold
    tp, fp = int(np.sum(flagged & labels)), int(np.sum(flagged & ~labels))
    fn, tn = int(np.sum(~flagged & labels)), int(np.sum(~flagged & ~labels))
    return {
        "threshold": float(threshold),
        "false_reject_rate": _ratio(fp, fp + tn),
        "miss_rate": _ratio(fn, tp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _f1(tp, fp, fn),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


def f1_max(scores, labels) -> dict:
    """The oracle: the threshold of the highest image F1 on these labels.

    Every cut between two distinct scores is tried (and flagging every image); the threshold
    returned lies halfway between the lowest flagged and the highest passed score, so
    ``score > threshold`` reproduces the cut.

    Returns:
      :func:`image_operating_point` at that threshold, with ``uses_test_labels: True``; None
      when there is no defective image.
    """
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    if not labels.any():
        return None
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], labels[order]
    tp, fp = np.cumsum(hits), np.cumsum(~hits)
    # A cut may only fall after the last of equal scores.
    ends = np.flatnonzero(np.append(ranked[1:] != ranked[:-1], True))
    f1 = 2 * tp[ends] / (tp[ends] + fp[ends] + labels.sum())
    best = ends[int(np.argmax(f1))]
    lowest_flagged = ranked[best]
    below = ranked[best + 1] if best + 1 < len(ranked) else None
    if below is None:
        threshold = float(np.nextafter(lowest_flagged, -np.inf))
    else:
        threshold = float((lowest_flagged + below) / 2)
        if not below < threshold < lowest_flagged:  # adjacent floats: no midpoint between
            threshold = float(below)
    return image_operating_point(scores, labels, threshold) | {"uses_test_labels": True}


def pixel_operating_point(maps, masks, threshold: float) -> dict:
    """Pixel-level F1 and IoU of ``maps > threshold`` against ``masks`` (all images' pixels).

    Args:
      maps: ``[N, H, W]`` anomaly maps.
      masks: ``[N, H, W]`` bool ground truth.

    Returns:
      ``{pixel_threshold, pixel_f1, pixel_iou, pixel_precision, pixel_recall}``.
    """
    maps, masks = np.asarray(maps), np.asarray(masks).astype(bool)
    if maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} differ in shape")
    flagged = maps > threshold
    tp = int(np.sum(flagged & masks))
    fp, fn = int(np.sum(flagged & ~masks)), int(np.sum(~flagged & masks))
    return {
        "pixel_threshold": float(threshold),
        "pixel_f1": _f1(tp, fp, fn),
        "pixel_iou": _ratio(tp, tp + fp + fn),
        "pixel_precision": _ratio(tp, tp + fp),
        "pixel_recall": _ratio(tp, tp + fn),
    }


def operating_point_metrics(scores, labels, maps=None, masks=None, calibration=None) -> dict:
    """What ``ustad evaluate`` reports at the operating point.

    Args:
      scores: ``[N]`` image scores; labels: ``[N]`` 1 = defective.
      maps, masks: ``[N, H, W]`` maps and ground truth, for the pixel metrics (optional).
      calibration: a :class:`ustad.calibration.Calibration`; None reports the oracle only.

    Returns:
      ``{"calibrated": {...} | None, "f1_max_oracle": {...} | None}``; ``calibrated`` holds
      :func:`image_operating_point` at the calibration's threshold, its ``max_fpr`` and
      ``good_images``, and with masks :func:`pixel_operating_point`.
    """
    result = {"calibrated": None, "f1_max_oracle": f1_max(scores, labels)}
    if calibration is not None:
        calibrated = image_operating_point(scores, labels, calibration.image_threshold)
        calibrated |= {"max_fpr": calibration.max_fpr, "good_images": calibration.count}
        if maps is not None and masks is not None:
            calibrated |= pixel_operating_point(maps, masks, calibration.pixel_threshold)
        result["calibrated"] = calibrated
    return result
