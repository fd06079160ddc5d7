"""Checks that an exported file scores as the students it came from: on random images after
every export (:func:`check_export`), and on the user's own images with its stored calibration
(:func:`verify_export`, ``ustad export --verify``)."""

from __future__ import annotations

import json
import os

import numpy as np

from ustad.deploy.runtime import load

# The largest |exported − Detector.score| accepted by the checks, relative to
# max(1, max |map|): float32 rounding of the same arithmetic in another order.
CHECK_TOLERANCE = 1e-4


def check_export(scales, path: str | os.PathLike, *, count: int = 2, seed: int = 0) -> dict:
    """Compare an exported file with :meth:`ustad.uninformed_students.score.Detector.score` on
    random images.

    Args:
      scales: the scales that were exported.
      path: the exported file.
      count: random images ``[count, H, W, C]``, uniform in [0, 1].
      seed: their seed.

    Returns:
      ``{"max_abs_map", "max_abs_score", "max_abs_reference", "tolerance"}``.

    Raises:
      ValueError: a difference beyond :data:`CHECK_TOLERANCE` × max(1, max |map|).
    """
    detector = load(path)
    meta = detector.header
    shape = (count, *meta["image_size"], meta["channels"])
    images = np.random.default_rng(seed).uniform(size=shape).astype(np.float32)
    reference = _reference(scales, images, meta["reduction"], meta["top_k"])
    maps, scores = detector(images)
    result = {
        "max_abs_map": float(np.abs(maps - reference[0]).max()),
        "max_abs_score": float(np.abs(scores - reference[1]).max()),
        "max_abs_reference": float(np.abs(reference[0]).max()),
    }
    result["tolerance"] = CHECK_TOLERANCE * max(1.0, result["max_abs_reference"])
    worst = max(result["max_abs_map"], result["max_abs_score"])
    if not worst <= result["tolerance"]:
        raise ValueError(
            f"{path} scores differently from Detector.score: max |Δ| {worst:.3g} on maps of "
            f"up to {result['max_abs_reference']:.3g} (tolerance {result['tolerance']:.3g})"
        )
    return result


def _reference(scales, images: np.ndarray, reduction: str, top_k: int):
    """What the exported graph computes, by :class:`Detector`: each scale scores the images
    resized (in JAX, antialiased bilinear, as the graph does) to its training size, its map is
    resized back (bilinear), and the maps are averaged and reduced. At the training size this is
    ``Detector(scales).score(images)``."""
    import jax
    import jax.numpy as jnp

    from ustad.detector import reduce_maps
    from ustad.uninformed_students.score import Detector

    shape = images.shape
    if all(tuple(scale.image_size) == shape[1:3] for scale in scales):
        return Detector(scales, reduction=reduction, top_k=top_k).score(images)
    total = np.zeros(shape[:3], np.float32)
    for scale in scales:
        size = tuple(scale.image_size)
        inputs = images
        if size != shape[1:3]:
            inputs = np.asarray(jax.image.resize(images, (shape[0], *size, shape[3]), "linear"))
        maps = Detector([scale]).score(inputs)[0]
        if maps.shape[1:] != shape[1:3]:
            maps = np.asarray(jax.image.resize(maps, shape[:3], "linear"))
        total += maps
    total /= len(scales)
    return total, np.asarray(reduce_maps(jnp.asarray(total), reduction, top_k))


def verify_export(scales, path: str | os.PathLike, images, calibration=None) -> dict:
    """Compare an exported file with the students on the user's own images, and its stored
    calibration with ``calibration`` (both must hold the same thresholds and good scores).

    Args:
      scales: the scales that were exported (at their training size).
      path: the exported file.
      images: ``[N, H, W, C]`` float32 in [0, 1], any size, or an iterable of such batches.
      calibration: the :class:`ustad.calibration.Calibration` the file should hold, or None.

    Returns:
      ``{"images", "max_abs_map", "max_abs_score", "max_abs_reference", "tolerance",
      "decisions_differ"}``.

    Raises:
      ValueError: a map or score beyond :data:`CHECK_TOLERANCE` × max(1, max |map|), another
        calibration in the file, or a file exported for another size than the training size.
    """
    from ustad.uninformed_students.score import Detector

    detector = load(path)
    meta = detector.header
    if any(list(scale.image_size) != meta["image_size"] for scale in scales):
        raise ValueError(
            f"{path} was exported for {meta['image_size']}, not the students' training size: "
            f"it resizes inside the model and cannot be verified to float tolerance"
        )
    stored = json.dumps(meta.get("calibration"), sort_keys=True)
    expected = json.dumps(None if calibration is None else calibration.record(), sort_keys=True)
    if stored != expected:
        held = "none" if stored == "null" else "another"
        raise ValueError(
            f"{path} holds {held} calibration in its header, not the workdirs' "
            f"({'none' if expected == 'null' else 'calibration.json'}): export again"
        )
    reference = Detector(scales, reduction=meta["reduction"], top_k=meta["top_k"])
    batches = [images] if isinstance(images, np.ndarray) else images
    result = {"images": 0, "max_abs_map": 0.0, "max_abs_score": 0.0, "max_abs_reference": 0.0}
    differ = 0
    for batch in batches:
        want_maps, want_scores = reference.score(batch)
        maps, scores = detector.score(batch)
        result["images"] += len(batch)
        result["max_abs_map"] = max(result["max_abs_map"], float(np.abs(maps - want_maps).max()))
        result["max_abs_score"] = max(
            result["max_abs_score"], float(np.abs(scores - want_scores).max())
        )
        result["max_abs_reference"] = max(
            result["max_abs_reference"], float(np.abs(want_maps).max())
        )
        if calibration is not None:
            threshold = calibration.image_threshold
            differ += int(np.sum((scores > threshold) != (want_scores > threshold)))
    result["tolerance"] = CHECK_TOLERANCE * max(1.0, result["max_abs_reference"])
    result["decisions_differ"] = differ
    worst = max(result["max_abs_map"], result["max_abs_score"])
    if not worst <= result["tolerance"]:
        raise ValueError(
            f"{path} scores the {result['images']} images differently from the students: max "
            f"|Δ| {worst:.3g} on maps of up to {result['max_abs_reference']:.3g} (tolerance "
            f"{result['tolerance']:.3g})"
        )
    return result
