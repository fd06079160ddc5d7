"""Thresholds from good images only, and the decisions they give (both families, exported files).

A production line has many good images and few or no defects, so the operating point comes from
held-out good images alone:

* **Image threshold** ``t``: the split-conformal quantile of the good images' scores, the
  ``k = ⌈(n + 1)(1 − α)⌉``-th smallest of ``n`` scores, ``α`` = ``max_fpr`` (default
  :data:`DEFAULT_MAX_FPR` = 1 % of good images rejected). For a new good image drawn like the
  calibration images, ``P(score > t) ≤ α`` (exchangeability); this needs ``k ≤ n``, i.e.
  ``n ≥ 1/α − 1`` images (99 for 1 %), and never fewer than :data:`MIN_GOOD_IMAGES`
  (:func:`required_good_images`); fewer raise :class:`TooFewGoodImages`.
* **Pixel threshold**: the same quantile of the good images' *maximum pixel*. A quantile over all
  good pixels (1 % of pixels) would mark 1 % of every good image as defect, so every good image
  would show defect regions; the max-pixel quantile keeps good images free of regions at the
  same rate ``α`` as the image decision. With the default image score (the map's maximum) the two
  thresholds are equal and an image has a defect region exactly when it is called anomalous.
* **Normalised score** in [0, 1]: ``1 / (1 + exp(−ln 9 · (s − t) / (t − m)))`` with ``m`` the
  good images' median score: exactly 0.5 at the threshold, 0.1 at the typical good image, 0.9 at
  ``t + (t − m)``; strictly increasing, so it ranks as the raw score does.
* **Colour scale** of overlays: from the good pixels' mean (dark) to ``2 t_pixel − mean``, so the
  threshold sits in the middle of the colour bar whatever else is scored with it.
* **Defect regions**: the pixels above the pixel threshold, 8-connected
  (``scipy.ndimage.label``; a diagonal chain of pixels is one defect).

Where calibrations are filed (``<workdir>/calibration.json``): :mod:`ustad.calibration_files`; the
decisions they give: :mod:`ustad.decisions`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_MAX_FPR = 0.01
# Below this many good images even the coarsest quantile (their maximum) says little.
MIN_GOOD_IMAGES = 5
QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)
_LN9 = math.log(9.0)
# The record's key of the F1-optimal threshold: its name says that it used defect labels.
LABELLED_KEY = "f1_optimal_uses_defect_labels"


class TooFewGoodImages(ValueError):
    """Too few good images for a meaningful quantile at the requested false-reject rate."""


def check_max_fpr(max_fpr: float) -> float:
    """``max_fpr`` as a float in (0, 0.5]; raises ``ValueError`` naming it otherwise."""
    if isinstance(max_fpr, bool) or not isinstance(max_fpr, int | float | np.floating):
        raise ValueError(f"max_fpr must be a number in (0, 0.5], got {max_fpr!r}")
    if not (math.isfinite(max_fpr) and 0 < max_fpr <= 0.5):
        raise ValueError(
            f"max_fpr must be the share of good images rejected, in (0, 0.5], got {max_fpr!r} "
            f"(0.01 = 1 %)"
        )
    return float(max_fpr)


def required_good_images(max_fpr: float) -> int:
    """The fewest good images whose conformal ``(1 − max_fpr)`` quantile exists:
    ``max(MIN_GOOD_IMAGES, ⌈1/α − 1⌉)`` (99 for α = 0.01, 19 for 0.05)."""
    alpha = check_max_fpr(max_fpr)
    return max(MIN_GOOD_IMAGES, math.ceil(1.0 / alpha - 1.0 - 1e-9))


def _rank(count: int, max_fpr: float) -> int:
    """1-based rank of the threshold among ``count`` sorted scores (conformal quantile)."""
    return math.ceil((count + 1) * (1.0 - max_fpr) - 1e-9)


def conformal_threshold(sorted_scores: np.ndarray, max_fpr: float) -> float:
    """The ``⌈(n + 1)(1 − α)⌉``-th smallest of ``n`` sorted scores.

    Raises:
      TooFewGoodImages: fewer than :func:`required_good_images` scores.
    """
    needed = required_good_images(max_fpr)
    if len(sorted_scores) < needed:
        raise TooFewGoodImages(
            f"{len(sorted_scores)} good images cannot calibrate a false-reject rate of "
            f"{max_fpr:g}: that quantile needs at least {needed} (give more good images, or a "
            f"larger --max_fpr ≥ {coarsest_max_fpr(len(sorted_scores)):.3g})"
        )
    return float(sorted_scores[_rank(len(sorted_scores), max_fpr) - 1])


def coarsest_max_fpr(count: int) -> float:
    """The smallest false-reject rate ``count`` good images can calibrate, ``1/(count + 1)``
    (the threshold is then their maximum); 0.5 cap."""
    return min(0.5, 1.0 / (count + 1))


def describe(values: np.ndarray) -> dict:
    """``{count, mean, std, min, max, quantiles}`` of a ``[N]`` array, JSON-ready."""
    values = np.asarray(values, np.float64)
    return {
        "count": len(values),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
        "quantiles": {f"{q:g}": float(np.quantile(values, q)) for q in QUANTILES},
    }


@dataclasses.dataclass(frozen=True)
class Calibration:
    """An operating point from good images: see the module docstring.

    Attributes:
      image_threshold: an image is anomalous when its score is above it.
      pixel_threshold: a pixel is defect when its map value is above it.
      max_fpr: the false-reject rate the thresholds are set for.
      image_scores: the good images' scores, sorted (``[n]``; thresholds at another rate come
        from them).
      pixel_maxima: each good image's maximum map value, sorted (``[n]``).
      pixel_mean, pixel_std: mean and σ over every pixel of every good map.
      settings: the scoring options it holds for (``reduction``, ``top_k``, ``smooth_sigma``).
      models: the workdirs' folder names it holds for (sorted; empty = unnamed).
      source: where the good images came from.
      requested_max_fpr: what was asked, when fewer images forced a coarser ``max_fpr``.
      labelled: the F1-optimal threshold on labelled defects (``ustad calibrate --data``), for
        comparison only: it uses defect labels and is never used to decide.
    """

    image_threshold: float
    pixel_threshold: float
    max_fpr: float | None
    image_scores: tuple[float, ...]
    pixel_maxima: tuple[float, ...]
    pixel_mean: float
    pixel_std: float
    settings: dict = dataclasses.field(default_factory=dict)
    models: tuple[str, ...] = ()
    source: str = ""
    requested_max_fpr: float | None = None
    labelled: dict | None = None

    @property
    def count(self) -> int:
        return len(self.image_scores)

    @property
    def median(self) -> float:
        """The good images' median score (the threshold itself when set by hand without any)."""
        return float(np.median(self.image_scores)) if self.image_scores else self.image_threshold

    def normalize(self, scores) -> np.ndarray:
        """``[N]`` raw scores → ``[N]`` float32 in [0, 1], 0.5 exactly at the threshold."""
        scores = np.asarray(scores, np.float64)
        spread = max(self.image_threshold - self.median, 1e-6 * max(1.0, abs(self.image_threshold)))
        z = np.clip(_LN9 * (scores - self.image_threshold) / spread, -700.0, 700.0)
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)

    def colour_scale(self) -> tuple[float, float]:
        """``(vmin, vmax)`` of overlays: the pixel threshold in the middle."""
        low = min(self.pixel_mean, self.pixel_threshold)
        high = 2.0 * self.pixel_threshold - low
        return (low, high) if high > low else (low, low + 1e-6)

    def at(self, max_fpr: float) -> Calibration:
        """The thresholds of the same good images at another false-reject rate.

        Raises:
          TooFewGoodImages: too few images for ``max_fpr``.
        """
        return dataclasses.replace(
            self,
            max_fpr=check_max_fpr(max_fpr),
            image_threshold=conformal_threshold(np.asarray(self.image_scores), max_fpr),
            pixel_threshold=conformal_threshold(np.asarray(self.pixel_maxima), max_fpr),
            requested_max_fpr=None,
        )

    def with_threshold(self, threshold: float) -> Calibration:
        """A user's image threshold; with the maximum as image score the pixel threshold
        follows it (regions ⟺ anomalous), otherwise the calibrated one stays.

        Raises:
          ValueError: a non-finite threshold, or one below every good score (it would reject
            them all).
        """
        threshold = check_threshold(threshold, self.image_scores)
        pixel = threshold if self.settings.get("reduction", "max") == "max" else None
        return dataclasses.replace(
            self,
            image_threshold=threshold,
            pixel_threshold=self.pixel_threshold if pixel is None else pixel,
            max_fpr=_share_above(np.asarray(self.image_scores), threshold),
            requested_max_fpr=None,
            source=f"{self.source} (threshold set by hand)",
        )

    def record(self) -> dict:
        """The JSON record of ``calibration.json`` (thresholds, distributions, what it used)."""
        scores = np.asarray(self.image_scores)
        maxima = np.asarray(self.pixel_maxima)
        record = {
            "models": list(self.models),
            "settings": dict(self.settings),
            "source": self.source,
            "max_fpr": self.max_fpr,
            "image_threshold": self.image_threshold,
            "pixel_threshold": self.pixel_threshold,
            "good_images": self.count,
            "achieved_false_reject_rate": _share_above(scores, self.image_threshold),
            "achieved_pixel_false_reject_rate": _share_above(maxima, self.pixel_threshold),
            "rule": "conformal quantile: the ceil((n+1)(1-max_fpr))-th smallest good score; "
            "pixel threshold from the good images' maximum pixel",
            "image_score_distribution": describe(scores) if len(scores) else None,
            "pixel_max_distribution": describe(maxima) if len(maxima) else None,
            "pixels": {"mean": self.pixel_mean, "std": self.pixel_std},
            "image_scores": [float(s) for s in scores],
            "pixel_maxima": [float(s) for s in maxima],
        }
        if self.requested_max_fpr is not None:
            record["requested_max_fpr"] = self.requested_max_fpr
        if self.labelled is not None:
            record[LABELLED_KEY] = self.labelled
        return record

    @classmethod
    def from_record(cls, record: dict, where: str = "calibration") -> Calibration:
        """Read back :meth:`record`; ``ValueError`` naming ``where`` and the key when broken."""
        try:
            return cls(
                image_threshold=float(record["image_threshold"]),
                pixel_threshold=float(record["pixel_threshold"]),
                max_fpr=None if record["max_fpr"] is None else float(record["max_fpr"]),
                image_scores=tuple(float(s) for s in record["image_scores"]),
                pixel_maxima=tuple(float(s) for s in record["pixel_maxima"]),
                pixel_mean=float(record["pixels"]["mean"]),
                pixel_std=float(record["pixels"]["std"]),
                settings=dict(record.get("settings", {})),
                models=tuple(record.get("models", ())),
                source=str(record.get("source", "")),
                requested_max_fpr=record.get("requested_max_fpr"),
                labelled=record.get(LABELLED_KEY),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"{where}: not a ustad calibration ({error!r} missing or bad)"
            ) from None


def _share_above(values: np.ndarray, threshold: float) -> float | None:
    return float(np.mean(values > threshold)) if len(values) else None


def manual_calibration(threshold, settings: dict | None = None) -> Calibration:
    """A threshold set by hand for a model without a calibration: image and pixel threshold
    both ``threshold``; with no good images to scale it, the normalised score is 0 below, 0.5
    at and 1 above the threshold."""
    threshold = check_threshold(threshold)
    return Calibration(
        image_threshold=threshold,
        pixel_threshold=threshold,
        max_fpr=None,
        image_scores=(),
        pixel_maxima=(),
        pixel_mean=threshold,
        pixel_std=0.0,
        settings=dict(settings or {}),
        source="threshold set by hand (no calibration)",
    )


def check_threshold(threshold, good_scores: Sequence[float] = ()) -> float:
    """``threshold`` as a finite float, not below every good score when those are known."""
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number, got {threshold!r}") from None
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    if len(good_scores) and threshold < min(good_scores):
        raise ValueError(
            f"threshold {threshold:g} is below every calibration image's score (they range over "
            f"[{min(good_scores):.4g}, {max(good_scores):.4g}]): it would call every good "
            f"image anomalous"
        )
    return threshold


class GoodStatistics:
    """What a calibration needs from good images' maps, accumulated batch by batch (so a large
    folder is never held in memory): image scores, maximum pixels, pixel mean and σ."""

    def __init__(self):
        self.scores: list[float] = []
        self.maxima: list[float] = []
        self._sum = self._sum_sq = 0.0
        self._pixels = 0

    def add(self, maps: Iterable[np.ndarray], scores: Iterable[float]) -> None:
        """Add ``[H, W]`` maps (any sizes) and their image scores."""
        for anomaly_map, score in zip(maps, scores, strict=True):
            values = np.asarray(anomaly_map, np.float64)
            if not (np.isfinite(values).all() and math.isfinite(float(score))):
                raise ValueError("a good image's map or score is NaN or inf: cannot calibrate")
            self.scores.append(float(score))
            self.maxima.append(float(values.max()))
            self._sum += float(values.sum())
            self._sum_sq += float(np.square(values).sum())
            self._pixels += values.size

    def calibration(self, max_fpr=DEFAULT_MAX_FPR, *, coarsen=False, **info) -> Calibration:
        """The :class:`Calibration` at ``max_fpr``; ``coarsen`` uses the smallest rate the
        images allow instead of raising (a warning says so). ``info``: settings, models,
        source."""
        max_fpr = check_max_fpr(max_fpr)
        count = len(self.scores)
        requested = None
        if coarsen and MIN_GOOD_IMAGES <= count < required_good_images(max_fpr):
            requested, max_fpr = max_fpr, coarsest_max_fpr(count)
            logger.warning(
                "calibrated on %d good images (%s): too few for a %g false-reject rate, so "
                "the threshold is their maximum (expected false-reject rate ≤ %.3g); run "
                "`ustad calibrate --good <folder>` with ≥ %d good images for %g",
                count, info.get("source", ""), requested, max_fpr,
                required_good_images(requested), requested,
            )  # fmt: skip
        scores, maxima = np.sort(self.scores), np.sort(self.maxima)
        mean = self._sum / max(self._pixels, 1)
        return Calibration(
            image_threshold=conformal_threshold(scores, max_fpr),
            pixel_threshold=conformal_threshold(maxima, max_fpr),
            max_fpr=max_fpr,
            image_scores=tuple(float(s) for s in scores),
            pixel_maxima=tuple(float(s) for s in maxima),
            pixel_mean=float(mean),
            pixel_std=float(math.sqrt(max(self._sum_sq / max(self._pixels, 1) - mean**2, 0.0))),
            settings=dict(info.get("settings", {})),
            models=tuple(sorted(info.get("models", ()))),
            source=str(info.get("source", "")),
            requested_max_fpr=requested,
        )


def calibrate(image_scores, pixel_maps, *, max_fpr=DEFAULT_MAX_FPR, coarsen=False, **info):
    """A :class:`Calibration` from held-out good images' scores and maps.

    Args:
      image_scores: ``[N]`` image scores of good images.
      pixel_maps: ``[N, H, W]`` their anomaly maps (or a sequence of ``[H_i, W_i]`` maps).
      max_fpr: the share of good images to reject (default 1 %).
      coarsen: with too few images, calibrate at the smallest rate they allow (a warning and
        ``requested_max_fpr`` in the record) instead of raising.
      **info: ``settings`` (the scoring options), ``models`` (workdir names), ``source``.

    Raises:
      TooFewGoodImages: fewer than :func:`required_good_images` (always below
        :data:`MIN_GOOD_IMAGES`).
      ValueError: a bad ``max_fpr``, mismatched lengths, NaN or inf.
    """
    scores = np.asarray(image_scores, np.float64).reshape(-1)
    if len(scores) != len(pixel_maps):
        raise ValueError(f"{len(scores)} image scores but {len(pixel_maps)} maps")
    stats = GoodStatistics()
    stats.add(pixel_maps, scores)
    return stats.calibration(max_fpr, coarsen=coarsen, **info)


def calibrate_detector(detector, batches, *, max_fpr=DEFAULT_MAX_FPR, coarsen=False, **info):
    """Score good images with ``detector`` and calibrate on them (one batch in memory at a time).

    Args:
      detector: anything with ``score(images) -> (maps [N, H, W], scores [N])`` (a family's
        detector, an exported model).
      batches: ``[N, H, W, C]`` good images, or an iterable of such arrays.
      max_fpr, coarsen, info: as :func:`calibrate`; ``settings`` defaults to
        ``detector.settings``.
    """
    if isinstance(batches, np.ndarray):
        batches = [batches]
    info.setdefault("settings", dict(getattr(detector, "settings", {})))
    stats = GoodStatistics()
    for images in batches:
        maps, scores = detector.score(images)
        stats.add(maps, scores)
    return stats.calibration(max_fpr, coarsen=coarsen, **info)
