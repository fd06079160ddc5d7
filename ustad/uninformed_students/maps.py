"""Per-pixel anomaly scores of one scale and their normalisation (paper §5).

Per pixel (r, c), with μ^{S_i} the students' dense predictions and t = (y^T − μ)/σ the
normalised teacher descriptor:

* mixture mean ``μ̄ = (1/M) Σ_i μ^{S_i}``;
* regression error ``e = ||μ̄ − t||²``;
* predictive variance ``v = (1/M) Σ_i ||μ^{S_i}||² − ||μ̄||²``;
* score ``ẽ + ṽ = (e − e_μ)/e_σ + (v − v_μ)/v_σ``, with ``e_μ, e_σ, v_μ, v_σ`` the mean and
  standard deviation of e and v over every pixel of held-out anomaly-free validation images;
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
    ScoreNormalization,
    map_members,
    normalization_from_moments,
    predictive_variance,
    regression_error,
    resolve_member_strategy,
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
