"""The decisions of a calibration (:mod:`ustad.calibration`) for anomaly maps and image scores:
pass/fail, normalised scores, defect masks and their 8-connected regions.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ustad.calibration import Calibration


@dataclasses.dataclass(frozen=True, eq=False)
class Prediction:
    """Decisions for ``N`` images of one size (:func:`decide`).

    Attributes:
      scores: ``[N]`` float32 raw image scores.
      maps: ``[N, H, W]`` float32 anomaly maps.
      threshold: the image threshold, or None without a calibration.
      pixel_threshold: the pixel threshold, or None.
      normalized: ``[N]`` float32 in [0, 1] (0.5 at the threshold), or None.
      is_anomalous: ``[N]`` bool, or None.
      masks: ``[N, H, W]`` bool, the pixels above the pixel threshold, or None.
      defect_area: ``[N]`` int64 pixels in ``masks``, or None.
      regions: ``[N]`` int64 8-connected regions in ``masks``, or None.
    """

    scores: np.ndarray
    maps: np.ndarray
    threshold: float | None = None
    pixel_threshold: float | None = None
    normalized: np.ndarray | None = None
    is_anomalous: np.ndarray | None = None
    masks: np.ndarray | None = None
    defect_area: np.ndarray | None = None
    regions: np.ndarray | None = None


def count_regions(masks: np.ndarray) -> np.ndarray:
    """``[N]`` int64: 8-connected regions in each ``[N, H, W]`` bool mask."""
    from scipy import ndimage

    structure = np.ones((3, 3), bool)
    return np.array([ndimage.label(mask, structure)[1] for mask in masks], np.int64)


def decide(maps, scores, calibration: Calibration | None) -> Prediction:
    """The decisions of ``calibration`` for ``[N, H, W]`` maps and ``[N]`` scores; without a
    calibration only the raw values."""
    maps = np.asarray(maps, np.float32)
    scores = np.asarray(scores, np.float32)
    if calibration is None:
        return Prediction(scores=scores, maps=maps)
    masks = maps > calibration.pixel_threshold
    return Prediction(
        scores=scores,
        maps=maps,
        threshold=calibration.image_threshold,
        pixel_threshold=calibration.pixel_threshold,
        normalized=calibration.normalize(scores),
        is_anomalous=scores > calibration.image_threshold,
        masks=masks,
        defect_area=masks.reshape(len(masks), -1).sum(axis=1).astype(np.int64),
        regions=count_regions(masks),
    )
