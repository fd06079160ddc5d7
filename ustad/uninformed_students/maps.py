"""Per-pixel anomaly scores of one scale and their normalisation (paper §5).

Per pixel (r, c), with μ^{S_i} the students' dense predictions and t = (y^T − μ)/σ the
normalised teacher descriptor:

* mixture mean ``μ̄ = (1/M) Σ_i μ^{S_i}``;
* regression error ``e = ||μ̄ − t||²``;
* predictive variance ``v = (1/M) Σ_i ||μ^{S_i}||² − ||μ̄||²``;
* score ``ẽ + ṽ = (e − e_μ)/e_σ + (v − v_μ)/v_σ``, with ``e_μ, e_σ, v_μ, v_σ`` the mean and
  standard deviation of e and v over every pixel of held-out anomaly-free validation images
  (the paper's; new workdirs use the median and a robust spread instead,
  :func:`compute_score_statistics`, so a heavy tail of a few pixels cannot set e's or v's weight);
* several receptive fields: the plain average of the per-scale scores.

The paper defines no image-level score for MVTec AD; the map's maximum is the common choice and
the default here (mean and top-k mean are options). Nor does it smooth the maps; a Gaussian of σ
pixels over the final map (:func:`smooth_maps`) is an option, off by default.

Pure functions of arrays and networks, shared by training (the students' step, the score
normalisation) and :class:`ustad.uninformed_students.score.Detector`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ustad import sharding as shd
from ustad.ensemble import (
    MAX_STATISTIC_PIXELS,
    ScoreNormalization,
    ScoreStatistics,
    map_members,
    normalization_from_moments,
    normalized_score,
    predictive_variance,
    regression_error,
    resolve_member_strategy,
    sample_pixels,
    score_statistics,
)
from ustad.stats import batch_moments, empty_moments, merge_moments
from ustad.uninformed_students.dense import dense_apply
from ustad.uninformed_students.nets import PatchNet

PyTree = Any


def teacher_targets(
    teacher: PatchNet, teacher_variables: PyTree, mean, std, images, *, padding="reflect"
) -> jax.Array:
    """Normalised, frozen teacher descriptors ``(y^T − μ)/σ``.

    Args:
      teacher: the teacher network.
      teacher_variables: its variables (never trained here: wrapped in ``stop_gradient``).
      mean, std: ``[D]`` target statistics.
      images: ``[N, H, W, C]``.

    Returns:
      ``[N, H, W, D]`` float32.
    """
    descriptors = dense_apply(teacher, teacher_variables, images, padding=padding)
    targets = (descriptors.astype(jnp.float32) - mean) / std
    return jax.lax.stop_gradient(targets)


def error_and_variance(
    teacher: PatchNet,
    student: PatchNet,
    params: PyTree,
    images: jax.Array,
    padding="reflect",
    member_strategy: str = "vmap",
) -> tuple[jax.Array, jax.Array]:
    """e and v maps of one scale (trace-friendly).

    Args:
      teacher, student: networks (same architecture, possibly different compute dtypes).
      params: ``{"teacher": vars, "students": stacked vars [M, ...], "mean": [D], "std": [D]}``.
      images: ``[N, H, W, C]``.
      padding: dense-extraction padding.
      member_strategy: ``"vmap"`` or ``"sequential"`` over the students (:func:`map_members`).

    Returns:
      ``(error, variance)``, each ``[N, H, W]`` float32.
    """
    targets = teacher_targets(
        teacher, params["teacher"], params["mean"], params["std"], images, padding=padding
    )
    outputs = map_members(
        lambda v, x: dense_apply(student, v, x, padding=padding),
        params["students"],
        images,
        strategy=member_strategy,
    )
    return regression_error(outputs, targets), predictive_variance(outputs)


@functools.lru_cache(maxsize=16)
def _error_variance_moments_fn(teacher, student, padding, strategy):
    def moments_of(params, images):
        error, variance = error_and_variance(teacher, student, params, images, padding, strategy)
        return batch_moments(jnp.stack([error, variance], axis=-1))

    return jax.jit(moments_of)


def compute_normalization(
    teacher: PatchNet,
    student: PatchNet,
    params: PyTree,
    images: np.ndarray,
    *,
    batch_size: int,
    padding: str = "reflect",
    put=None,
    member_strategy: str = "auto",
    progress: Callable[[int], None] | None = None,
) -> ScoreNormalization:
    """e_μ, e_σ, v_μ, v_σ over every pixel of ``images`` (streamed, Chan merge in float64).

    Args:
      teacher, student, params: as for :func:`error_and_variance`.
      images: ``[N, H, W, C]`` anomaly-free validation images (host array).
      batch_size: images per jitted call.
      padding: dense-extraction padding.
      put: places a host batch on the devices (default ``jnp.asarray``).
      member_strategy: see :func:`resolve_member_strategy`.
      progress: called with the number of images done after each batch.
    """
    put = put or jnp.asarray
    strategy = resolve_member_strategy(member_strategy)
    moments_of = _error_variance_moments_fn(teacher, student, padding, strategy)
    total = None
    for start in range(0, len(images), batch_size):
        moments = shd.to_host(moments_of(params, put(images[start : start + batch_size])))
        total = moments if total is None else merge_moments(total, moments)
        if progress is not None:
            progress(len(images[start : start + batch_size]))
    if total is None:
        raise ValueError("compute_normalization needs at least one image")
    return normalization_from_moments(merge_moments(empty_moments(2), total))


@functools.lru_cache(maxsize=16)
def _error_variance_maps_fn(teacher, student, padding, strategy):
    def maps_of(params, images):
        error, variance = error_and_variance(teacher, student, params, images, padding, strategy)
        stacked = jnp.stack([error, variance], axis=-1)
        return stacked, batch_moments(stacked)

    return jax.jit(maps_of)


def compute_score_statistics(
    teacher: PatchNet,
    student: PatchNet,
    params: PyTree,
    images: np.ndarray,
    *,
    batch_size: int,
    kind: str = "quantile",
    padding: str = "reflect",
    put=None,
    member_strategy: str = "auto",
    max_pixels: int = MAX_STATISTIC_PIXELS,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> ScoreStatistics:
    """e and v statistics of held-out good images: the mean and σ over every pixel (the
    paper's) and the median and robust spread (:data:`ustad.ensemble.ROBUST_QUANTILE`) exact
    over at most ``max_pixels`` of them, the same number from each image, chosen by ``seed``.

    Args:
      teacher, student, params: as for :func:`error_and_variance`.
      images: ``[N, H, W, C]`` anomaly-free validation images (host array).
      batch_size: images per jitted call.
      kind: which statistics normalise the scores, ``"quantile"`` or ``"moments"``.
      padding, put, member_strategy, progress: as for :func:`compute_normalization`.
      max_pixels: the most pixels the quantiles are computed over.
      seed: seeds the choice of those pixels.
    """
    if not len(images):
        raise ValueError("compute_score_statistics needs at least one image")
    put = put or jnp.asarray
    strategy = resolve_member_strategy(member_strategy)
    maps_of = _error_variance_maps_fn(teacher, student, padding, strategy)
    per_image = max(1, int(max_pixels) // len(images))
    total, samples = empty_moments(2), []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        maps, moments = shd.to_host(maps_of(params, put(chunk)))
        total = merge_moments(total, moments)
        samples.append(sample_pixels(maps, start, per_image, seed))
        if progress is not None:
            progress(len(chunk))
    sample = np.concatenate(samples)
    return score_statistics(total, sample, len(images), kind=kind, seed=seed)


# Planted defects of the pseudo-anomaly check, in turn ("foreign" needs a second texture).
PSEUDO_DEFECTS = ("scratch", "stain", "hole")


@functools.lru_cache(maxsize=16)
def _image_score_fn(teacher, student, padding, strategy):
    def image_scores(params, normalization, images):
        error, variance = error_and_variance(teacher, student, params, images, padding, strategy)
        score = normalized_score(error, variance, normalization)
        return jnp.max(score.reshape(score.shape[0], -1), axis=1)

    return jax.jit(image_scores)


def pseudo_defects(images: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Good images and the same images with one procedural defect each.

    Args:
      images: ``[N, H, W, C]`` float in [0, 1], anomaly-free.
      seed: with an image's index, seeds its defect (kinds :data:`PSEUDO_DEFECTS` in turn).

    Returns:
      ``(good, defective, kinds)``: both ``[N, H, W, C]`` float32, quantised to 8 bits alike
      (so quantisation is no difference between them), and the defect kind of each image
      (``"scratch"`` for all without scikit-image, which draws the blobs).
    """
    from ustad.data.images import to_uint8
    from ustad.data.synthetic import add_defect

    good, defective, kinds = [], [], []
    for i, image in enumerate(images):
        kind = PSEUDO_DEFECTS[i % len(PSEUDO_DEFECTS)]
        pixels = to_uint8(image)
        try:
            planted, _ = add_defect(pixels, kind, np.random.default_rng([seed, i]))
        except ImportError:
            # The blobs are drawn by scikit-image, which a plain install lacks (training must
            # not need it): scratches only, and the record says so.
            kind = "scratch"
            planted, _ = add_defect(pixels, kind, np.random.default_rng([seed, i]))
        good.append(pixels)
        defective.append(planted)
        kinds.append(kind)
    unit = np.float32(1 / 255)
    return np.stack(good).astype(np.float32) * unit, np.stack(defective) * unit, kinds


def pseudo_anomaly_auroc(
    teacher: PatchNet,
    student: PatchNet,
    params: PyTree,
    normalization: ScoreNormalization,
    images: np.ndarray,
    *,
    batch_size: int,
    padding: str = "reflect",
    put=None,
    member_strategy: str = "auto",
    max_images: int = 16,
    seed: int = 0,
) -> dict:
    """How one scale ranks held-out good images below the same images with a planted defect:
    the image AUROC (scores: the max of the normalised map at the training size, as the
    detector's default), a check that needs good images only. Below 0.5 the scale ranks
    defects *lower* than good images, and :class:`ustad.uninformed_students.score.Detector`
    leaves it out of the multi-scale mean.

    Args:
      teacher, student, params: as for :func:`error_and_variance`.
      normalization: the scale's score statistics.
      images: ``[N, H, W, C]`` anomaly-free images; the first ``max_images`` are used.
      batch_size: images per jitted call (the last chunk is padded: one compilation).
      padding, put, member_strategy: as for :func:`compute_normalization`.
      seed: seeds the defects (:func:`pseudo_defects`).

    Returns:
      ``{"image_auroc", "good_images", "defective_images", "defects", "seed", "reduction"}``.
    """
    from ustad.evaluation.metrics import image_auroc

    good, defective, kinds = pseudo_defects(np.asarray(images[:max_images]), seed)
    if not len(good):
        raise ValueError("pseudo_anomaly_auroc needs at least one good image")
    put = put or jnp.asarray
    fn = _image_score_fn(teacher, student, padding, resolve_member_strategy(member_strategy))
    norm = jnp.asarray(np.asarray(normalization, np.float32))
    both = np.concatenate([good, defective])
    scores = []
    for start in range(0, len(both), batch_size):
        chunk = both[start : start + batch_size]
        real = len(chunk)
        if real < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - real, axis=0)])
        scores.append(shd.to_host(fn(params, norm, put(chunk)))[:real])
    scores = np.concatenate(scores)
    labels = np.repeat([0, 1], len(good))
    return {
        "image_auroc": float(image_auroc(scores, labels)),
        "good_images": len(good),
        "defective_images": len(defective),
        "defects": sorted(set(kinds)),
        "seed": int(seed),
        "reduction": "max",
    }
