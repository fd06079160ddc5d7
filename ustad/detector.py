"""What both families' detectors share: options, padded batches on the mesh, resize in and out,
the mean over scales, smoothing and the image-score reduction.

A family's detector (:class:`ustad.uninformed_students.score.Detector`,
:class:`ustad.stfpm.score.STFPMDetector`) subclasses :class:`MapDetector` and supplies, per
group of models trained at one size, a jitted ``fn(*params, images) -> [N, h, w]`` (the sum of
that group's maps); everything around the jitted call lives here, once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ustad import sharding as shd
from ustad.host_images import convert_channels
from ustad.tiling import DEFAULT_OVERLAP, check_overlap, extract_tiles, stitch, tile_layout

PyTree = Any
logger = logging.getLogger(__name__)


REDUCTIONS = ("max", "mean", "topk")


def check_scoring_options(reduction: str = "max", top_k: int = 100, smooth_sigma: float = 0.0):
    """Raise ``ValueError`` for an unknown reduction, ``top_k`` < 1 or a negative/non-finite σ.

    Args:
      reduction: ``"max"``, ``"mean"`` or ``"topk"``.
      top_k: pixels averaged by ``"topk"`` (checked for every reduction: a bad value is a typo).
      smooth_sigma: σ of the Gaussian smoothing in pixels; 0 = none.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or top_k < 1:
        raise ValueError(f"top_k must be an integer ≥ 1 (pixels averaged by 'topk'), got {top_k!r}")
    if not (isinstance(smooth_sigma, int | float | np.floating) and math.isfinite(smooth_sigma)):
        raise ValueError(f"smooth_sigma must be a finite number of pixels, got {smooth_sigma!r}")
    if smooth_sigma < 0:
        raise ValueError(f"smooth_sigma must be ≥ 0 pixels (0 = no smoothing), got {smooth_sigma}")


def smooth_maps(maps, sigma: float) -> np.ndarray:
    """Each ``[N, H, W]`` map blurred by a Gaussian of ``sigma`` pixels (host, SciPy).

    ``scipy.ndimage.gaussian_filter`` per map: mirrored edges (``"reflect"``), kernel truncated
    at 4σ, accumulated in float64. Not in the paper; an option of
    :class:`ustad.uninformed_students.score.Detector`.

    Args:
      maps: ``[N, H, W]`` anomaly maps.
      sigma: σ in pixels of the maps; 0 returns them unchanged (as float32).

    Returns:
      ``[N, H, W]`` float32.
    """
    check_scoring_options(smooth_sigma=sigma)
    maps = np.asarray(maps, np.float32)
    if maps.ndim != 3:
        raise ValueError(f"maps must be [N, H, W], got shape {maps.shape}")
    if not sigma:
        return maps
    from scipy import ndimage

    return ndimage.gaussian_filter(maps, sigma=(0, sigma, sigma), mode="reflect")


def combine_scales(images, scorers, count: int, *, smooth_sigma: float, reduction: str, top_k: int):
    """The detectors' multi-scale score: the mean over ``count`` scales of the maps the
    ``scorers`` sum (each resized bilinearly back to the images' H × W where it differs),
    smoothed by ``smooth_sigma`` (:func:`smooth_maps`), and the image scores by ``reduction``
    / ``top_k`` (:func:`reduce_maps`).

    Args:
      images: ``[N, H, W, C]`` (anything :func:`ustad.host_images.as_unit_float` takes).
      scorers: callables, each ``[N, H, W, C]`` float in [0, 1] → ``[N, h, w]`` maps (the
        sum of the maps of the scales it scores).
      count: how many scales the scorers score in all.

    Returns:
      ``(maps [N, H, W] float32, scores [N] float32)`` as NumPy arrays.
    """
    from ustad.host_images import as_unit_float

    images = as_unit_float(images)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
    # NaN passes the range check and would come back as NaN maps and scores, unremarked.
    bad = np.flatnonzero(~np.isfinite(images.reshape(len(images), -1)).all(axis=1))
    if bad.size:
        raise ValueError(
            f"images {bad[:10].tolist()}{' …' if bad.size > 10 else ''} (of {len(images)}) hold "
            f"NaN or inf values; images must be finite floats in [0, 1]"
        )
    shape = images.shape[:3]
    total = np.zeros(shape, np.float32)
    for scorer in scorers:
        maps = scorer(images)
        if maps.shape != shape:
            maps = np.asarray(jax.image.resize(maps, shape, "linear"))
        total += maps
    maps = smooth_maps(total / count, smooth_sigma)
    return maps, np.asarray(reduce_maps(jnp.asarray(maps), reduction, top_k))


def scoring_settings(
    reduction: str, top_k: int, smooth_sigma: float, tile_overlap: float | None = None
) -> dict:
    """The scoring options, JSON-ready (recorded next to what ``ustad score`` writes);
    ``tile_overlap`` (scoring by tiles, :mod:`ustad.tiling`) adds ``"tile": {"overlap": …}``,
    so a calibration made without tiles never decides on tiled maps and vice versa."""
    settings = {"reduction": reduction, "top_k": int(top_k), "smooth_sigma": smooth_sigma}
    if tile_overlap is not None:
        settings["tile"] = {"overlap": float(tile_overlap)}
    return settings


def reduce_maps(maps: jax.Array, reduction: str = "max", top_k: int = 100) -> jax.Array:
    """Image scores from anomaly maps.

    Args:
      maps: ``[N, H, W]``.
      reduction: ``"max"`` (default), ``"mean"`` or ``"topk"`` (mean of the ``top_k`` highest
        pixels, less sensitive to a single noisy pixel than the max).
      top_k: pixels averaged by ``"topk"`` (≥ 1; beyond H·W it is clipped to H·W, which
        makes the score the map's mean, and a warning says so once per map size).

    Returns:
      ``[N]``.
    """
    check_scoring_options(reduction, top_k)
    flat = maps.reshape(maps.shape[0], -1)
    if reduction == "topk" and top_k > flat.shape[1]:
        warn_top_k_clipped(top_k, maps.shape[1:])
    if reduction == "max":
        return jnp.max(flat, axis=1)
    if reduction == "mean":
        return jnp.mean(flat, axis=1)
    return jnp.mean(jax.lax.top_k(flat, min(int(top_k), flat.shape[1]))[0], axis=1)


_CLIPPED_TOP_K: set[tuple] = set()  # (top_k, H, W) already warned about


def warn_top_k_clipped(top_k: int, map_hw) -> None:
    """Once per ``(top_k, H, W)``: a warning that ``--top_k`` exceeds the map's pixels, so the
    "top k" image score is the map's mean."""
    key = (int(top_k), *(int(s) for s in map_hw))
    if key in _CLIPPED_TOP_K:
        return
    _CLIPPED_TOP_K.add(key)
    pixels = key[1] * key[2]
    logger.warning(
        "--top_k=%d is more than the %d pixels of a %d×%d map: the image score of such maps "
        "is their mean (--reduction=mean); use --top_k ≤ %d for a top-k score",
        top_k, pixels, key[1], key[2], pixels,
    )  # fmt: skip


def resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[N, H, W, C]`` images resized to ``size`` = (H', W') as the training images were (PIL's
    antialiased bilinear resize); returned unchanged when already that size."""
    if tuple(images.shape[1:3]) == tuple(size):
        return images
    from ustad.data.images import resize_image

    return np.stack([resize_image(image, tuple(size)) for image in images])


def score_in_batches(fn, params: tuple, images: np.ndarray, batch_size: int, mesh=None):
    """``fn(*params, chunk)`` over ``images`` in chunks of ``batch_size``; the last chunk is
    padded with copies of its last image so a detector compiles once per input size.

    Args:
      fn: jitted ``(*params, [B, H, W, C]) -> [B, ...]``.
      params: its leading arguments, already on the device(s).
      images: ``[N, H, W, C]`` float32.
      batch_size: B (a multiple of the mesh's data axis when ``mesh`` is given).
      mesh: split each chunk over the mesh's ``"data"`` axis; ``None`` = default device.

    Returns:
      ``[N, ...]`` NumPy.
    """
    outputs = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        real = len(chunk)
        if real < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - real, axis=0)])
        chunk = jnp.asarray(chunk) if mesh is None else shd.shard_batch(chunk, mesh)
        outputs.append(shd.to_host(fn(*params, chunk))[:real])
    return np.concatenate(outputs)


def score_with_progress(detector, images: np.ndarray, name: str):
    """``detector.score(images)`` chunk by chunk under a progress bar named ``name``."""
    from ustad.metric_writer import progress

    maps, scores = [], []
    with progress(len(images), desc=f"scoring {name}", unit="img") as bar:
        for start in range(0, len(images), detector.batch_size):
            chunk_maps, chunk_scores = detector.score(images[start : start + detector.batch_size])
            maps.append(chunk_maps)
            scores.append(chunk_scores)
            bar.update(len(chunk_maps))
    return np.concatenate(maps), np.concatenate(scores)


def score_sets(
    make_detector: Callable,
    models: Sequence,
    names: Sequence[str],
    average: str,
    images: np.ndarray,
):
    """Maps and image scores of each model alone and, with several, of their average: what
    ``ustad evaluate`` reports.

    Args:
      make_detector: ``list of models -> detector``.
      models: trained models of one family.
      names: a name per model (repeats get ``_<i>``).
      average: the name of the average of all models (e.g. ``"multiscale"``).
      images: ``[N, H, W, C]`` float32 in [0, 1].

    Returns:
      ``({name: [N, H, W] maps}, {name: [N] scores})``.
    """
    score_maps, image_scores = {}, {}
    for i, (model, name) in enumerate(zip(models, names, strict=True)):
        name = name if name not in score_maps else f"{name}_{i}"
        score_maps[name], image_scores[name] = score_with_progress(
            make_detector([model]), images, name
        )
    if len(models) > 1:
        maps, scores = score_with_progress(make_detector(list(models)), images, average)
        score_maps[average], image_scores[average] = maps, scores
    return score_maps, image_scores


class MapDetector:
    """The part of a detector that knows no family: see the module docstring.

    Args:
      models: the trained models (scales) the final map averages, each a ``model_type``.
      model_type: the family's trained-model class (a detector averages one family's models).
      family: the family's name, for the errors.
      reduction: image score from the map, ``"max"`` (default), ``"mean"`` or ``"topk"`` (the
        mean of the ``top_k`` highest pixels).
      top_k: pixels averaged by ``"topk"`` (≥ 1).
      smooth_sigma: σ in pixels of a Gaussian over each final map (at the input images' size)
        before the image score; 0 = none.
      batch_size: images per jitted call; rounded up to a multiple of the mesh's data axis.
      mesh: a :func:`ustad.sharding.make_mesh` mesh to split batches over ``"data"``
        (parameters replicated); ``None`` runs on the default device.
      tile: score each image at its own resolution by tiles of each model's training size
        (:mod:`ustad.tiling`: overlapping tiles, the last flush with the border, maps stitched
        by a trimmed mean) instead of resizing it; images smaller than a tile raise.
      tile_overlap: the least overlap of neighbouring tiles, a fraction of the tile in [0, 1).

    A subclass fills ``self._groups``: ``(size (H, W), channels, multiple, fn, params)`` per
    group of models scored by one jitted call, ``multiple`` being the size's required stride
    (for the warning on squashed images).
    """

    def __init__(
        self,
        models: Sequence,
        model_type: type,
        family: str,
        *,
        reduction="max",
        top_k=100,
        smooth_sigma=0.0,
        batch_size=8,
        mesh=None,
        tile=False,
        tile_overlap=DEFAULT_OVERLAP,
    ):
        if not models:
            raise ValueError(f"a {family} detector needs at least one trained model")
        other = [type(m).__name__ for m in models if not isinstance(m, model_type)]
        if other:
            raise ValueError(
                f"cannot average {family} models with {', '.join(other)} (another family): "
                f"score each family's workdirs separately"
            )
        count = len(models)
        check_scoring_options(reduction, top_k, smooth_sigma)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer ≥ 1, got {batch_size!r}")
        self.count = count
        self.reduction, self.top_k, self.smooth_sigma = reduction, top_k, float(smooth_sigma)
        self.mesh = mesh
        self.batch_size = batch_size
        if not isinstance(tile, bool | np.bool_):
            raise ValueError(f"tile must be True or False, got {tile!r}")
        self.tile, self.tile_overlap = bool(tile), check_overlap(tile_overlap)
        if mesh is not None:
            ways = shd.data_size(mesh)
            self.batch_size = -(-batch_size // ways) * ways
        self._groups: list[tuple] = []
        self._warned: set[tuple] = set()  # (input size, training size) pairs warned about

    def place(self, params):
        """``params`` on the device, or replicated over the mesh."""
        return (
            jax.device_put(params) if self.mesh is None else shd.put_replicated(params, self.mesh)
        )

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Anomaly maps and image scores.

        Args:
          images: ``[N, H, W, C]`` float in [0, 1] (or uint8 / uint16, scaled to [0, 1]; other
            ranges raise, see :func:`ustad.host_images.as_unit_float`), any size (resized to
            each model's training size and the maps resized back; a warning when that changes
            the aspect ratio by more than 1.5×; with ``tile``, cut into tiles at their own
            resolution instead, so at least a tile's size) and 1 or 3 channels.

        Returns:
          ``(maps [N, H, W] float32, image_scores [N] float32)``; with ``smooth_sigma`` the maps
          are the smoothed ones and the scores are reduced from them.
        """

        def scorer(size, channels, multiple, fn, params):
            def score(images):
                if self.tile:
                    return self._score_tiles(images, size, channels, fn, params)
                self._warn_if_squashed(images.shape[1:3], size, multiple)
                inputs = resize_images(convert_channels(images, channels), size)
                return score_in_batches(fn, params, inputs, self.batch_size, self.mesh)

            return score

        return combine_scales(
            images, [scorer(*group) for group in self._groups], self.count,
            smooth_sigma=self.smooth_sigma, reduction=self.reduction, top_k=self.top_k,
        )  # fmt: skip

    def _score_tiles(self, images, size, channels, fn, params) -> np.ndarray:
        """``[N, H, W]`` maps of one group of models: the images cut into tiles of ``size`` at
        their own resolution, scored, and the tile maps stitched (:mod:`ustad.tiling`)."""
        layout = tile_layout(images.shape[1:3], size, self.tile_overlap)
        tiles = extract_tiles(convert_channels(images, channels), layout)
        maps = score_in_batches(fn, params, tiles, self.batch_size, self.mesh)
        if maps.shape[1:] != tuple(size):
            maps = np.asarray(jax.image.resize(maps, (len(maps), *size), "linear"))
        return stitch(maps, layout)

    def predict(self, images: np.ndarray, calibration=None):
        """:meth:`score` with the decisions of a calibration.

        Args:
          images: as :meth:`score`.
          calibration: a :class:`ustad.calibration.Calibration` (e.g.
            ``ustad.calibration_files.find_calibration(workdirs, detector.settings)[0]``);
            None gives the raw maps and scores only.

        Returns:
          A :class:`ustad.decisions.Prediction`: ``scores [N]``, ``maps [N, H, W]`` and, with a
          calibration, ``threshold``, ``normalized [N]`` (0.5 at the threshold),
          ``is_anomalous [N]``, ``masks [N, H, W]``, ``defect_area [N]`` and ``regions [N]``.
        """
        from ustad.decisions import decide

        maps, scores = self.score(images)
        return decide(maps, scores, calibration)

    @property
    def input_sizes(self) -> list[tuple[int, int]]:
        """The ``(H, W)`` each group of models scores at (images are resized to each)."""
        return [tuple(int(s) for s in group[0]) for group in self._groups]

    @property
    def settings(self) -> dict:
        """The scoring options, JSON-ready (recorded next to what ``ustad score`` writes)."""
        overlap = self.tile_overlap if self.tile else None
        return scoring_settings(self.reduction, self.top_k, self.smooth_sigma, overlap)

    def _warn_if_squashed(self, image_hw, size, multiple) -> None:
        """Once per input size: a warning when scoring at ``size`` squashes the images."""
        size = tuple(size)
        if (image_hw, size) in self._warned:
            return
        self._warned.add((image_hw, size))
        from ustad.data.images import SQUASH_WARNING_RATIO, aspect_change, fit_size

        change = aspect_change(image_hw, size)
        if change > SQUASH_WARNING_RATIO:
            keep = fit_size(image_hw, min(size), keep_aspect=True, multiple=multiple)
            logger.warning(
                "images of %d×%d (H×W) are scored at the model's training size %d×%d, which "
                "changes their aspect ratio by %.2f× and distorts small defects; to keep it, "
                "train with --config.keep_aspect=True (the short side becomes "
                "--config.image_size) or --config.image_size='(%d, %d)', or score them at "
                "their own resolution by tiles (--tile; best with --config.train_tiles=True)",
                *image_hw, *size, change, *keep,
            )  # fmt: skip
