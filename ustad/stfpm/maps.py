"""STFPM (Wang et al., BMVC 2021): student–teacher feature-pyramid matching, the maths.

A frozen ImageNet teacher and a student of the same architecture (randomly initialised) give
feature maps F_t^l, F_s^l at pyramid levels l = 1..L (:mod:`ustad.stfpm.nets`). At every
position each C-dim feature vector is L2-normalised (F̂ = F / max(‖F‖₂, 1e-12), PyTorch's
``F.normalize``), and:

* loss (the paper's Eq. 1, as anomalib transcribes it):
  ``ℓ_l = 1/(h_l w_l) Σ_ij ½ ‖F̂_t^l − F̂_s^l‖²``, ``L = Σ_l α_l ℓ_l`` with α_l = 1; the
  paper is silent on the reduction over images: the mean over the batch here (the authors'
  code; anomalib sums, i.e. B/2 × a larger gradient at the same learning rate);
* anomaly map: per level ``Ω_l = ½ ‖F̂_t^l − F̂_s^l‖²``, upsampled bilinearly to the image
  (half-pixel centres, PyTorch ``align_corners=False``; straight to the image size as
  anomalib, where the authors' code first goes to level 1's size), combined over levels by
  their **product** (the paper, the authors' code and anomalib) or their sum/mean (an
  option: the ranking of sum and mean is the same); image score: the map's maximum.

Beyond the paper, with Uninformed Students' ensemble scoring (:mod:`ustad.ensemble`): M
students ŝ_1..ŝ_M (normalised) give per level the regression error of their mean and their
predictive variance,

* ``e_l = ½ ‖F̂_t − (1/M) Σ_m ŝ_m‖²`` (for M = 1 exactly Ω_l),
* ``v_l = ½ (1/M) Σ_m ‖ŝ_m − (1/M) Σ_k ŝ_k‖²``,

and score ``"error"`` uses e_l alone (any combination), score ``"error_variance"`` the
normalised ``(e_l − e_μ)/e_σ + (v_l − v_μ)/v_σ`` with each level's statistics over the pixels
of held-out anomaly-free images, averaged (or summed) over levels: a product of these
z-scores, which are negative on most normal pixels, would rank nothing, so it is refused.

Pure functions of arrays; the networks' side is in :mod:`ustad.stfpm.score` and
:mod:`ustad.stfpm.train`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ustad.ensemble import (
    map_members,
    predictive_variance,
    regression_error,
)
from ustad.stfpm import maps as stfpm

PyTree = Any


def level_scores(
    network: nn.Module, params: PyTree, images: jax.Array, member_strategy: str = "vmap"
) -> tuple[list[jax.Array], list[jax.Array]]:
    """Per level, e_l and v_l of the students (trace-friendly).

    Args:
        network: the pyramid network.
        params: as :attr:`STFPMModel.params`.
        images: ``[N, H, W, 3]`` in [0, 1].
        member_strategy: ``"vmap"`` or ``"sequential"`` over the students.

    Returns:
        ``(errors, variances)``: lists of ``[N, h_l, w_l]`` float32.
    """
    teacher_maps = jax.lax.stop_gradient(network.apply(params["teacher"], images))
    student_maps = map_members(
        lambda variables, x: network.apply(variables, x),
        params["students"],
        images,
        strategy=member_strategy,
    )
    return stfpm.ensemble_level_scores(teacher_maps, student_maps)


__all__ = [
    "COMBINATIONS",
    "FAMILY",
    "FORMAT",
    "SCORES",
    "anomaly_map",
    "combine_levels",
    "ensemble_level_scores",
    "level_distance",
    "normalize_channels",
    "stfpm_loss",
    "upsample",
]


FAMILY = "stfpm"


FORMAT = "ustad.stfpm/1"


COMBINATIONS = ("product", "sum", "mean")


SCORES = ("error", "error_variance")


# PyTorch's F.normalize floor: a zero feature vector stays zero instead of NaN.
NORM_EPS = 1e-12


def normalize_channels(features: jax.Array) -> jax.Array:
    """``[..., C] → [..., C]``: every feature vector divided by ``max(‖·‖₂, 1e-12)``."""
    features = features.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(features), axis=-1, keepdims=True))
    return features / jnp.maximum(norm, NORM_EPS)


def level_distance(teacher_map: jax.Array, student_map: jax.Array) -> jax.Array:
    """``Ω = ½ ‖F̂_t − F̂_s‖²`` at every position of one level.

    Args:
        teacher_map, student_map: ``[N, h, w, C]`` raw (unnormalised) feature maps.

    Returns:
        ``[N, h, w]`` float32 in [0, 2].
    """
    diff = normalize_channels(teacher_map) - normalize_channels(student_map)
    return 0.5 * jnp.sum(jnp.square(diff), axis=-1)


def stfpm_loss(
    teacher_maps: Sequence[jax.Array],
    student_maps: Sequence[jax.Array],
    level_weights: Sequence[float] | None = None,
) -> jax.Array:
    """``Σ_l α_l · mean_{n, i, j} ½ ‖F̂_t^l − F̂_s^l‖²`` (mean over images and positions).

    Args:
        teacher_maps, student_maps: one ``[N, h_l, w_l, C_l]`` map per level.
        level_weights: α_l; default 1 for every level (both published codes).

    Returns:
        Scalar float32.
    """
    if len(teacher_maps) != len(student_maps):
        raise ValueError(f"{len(teacher_maps)} teacher levels but {len(student_maps)} student")
    weights = [1.0] * len(teacher_maps) if level_weights is None else list(level_weights)
    return sum(
        weight * jnp.mean(level_distance(t, s))
        for weight, t, s in zip(weights, teacher_maps, student_maps, strict=True)
    )


def upsample(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of ``[..., h, w]`` maps to ``[..., H, W]`` with half-pixel centres.

    Equal to PyTorch's ``F.interpolate(mode="bilinear", align_corners=False)`` when
    upsampling (``tests/test_stfpm.py`` checks it against that formula).
    """
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return jax.image.resize(maps, (*maps.shape[:-2], *size), "linear", antialias=False)


def ensemble_level_scores(
    teacher_maps: Sequence[jax.Array], student_maps: Sequence[jax.Array]
) -> tuple[list[jax.Array], list[jax.Array]]:
    """Per level, the regression error e_l and predictive variance v_l of M students.

    Args:
        teacher_maps: one ``[N, h_l, w_l, C_l]`` map per level.
        student_maps: one ``[M, N, h_l, w_l, C_l]`` stack per level.

    Returns:
        ``(errors, variances)``: lists of ``[N, h_l, w_l]`` float32 (see the module
        docstring; both carry the paper's ½, so for M = 1 ``errors`` are the paper's Ω_l
        and ``variances`` are 0).
    """
    errors, variances = [], []
    for teacher_map, students in zip(teacher_maps, student_maps, strict=True):
        predictions = normalize_channels(students)
        errors.append(0.5 * regression_error(predictions, normalize_channels(teacher_map)))
        variances.append(0.5 * predictive_variance(predictions))
    return errors, variances


def combine_levels(level_maps: Sequence[jax.Array], combination: str = "product") -> jax.Array:
    """Element-wise product, sum or mean of the levels' maps (all of one size).

    Args:
        level_maps: ``[..., H, W]`` per level.
        combination: ``"product"`` (the paper), ``"sum"`` or ``"mean"``.
    """
    if combination not in COMBINATIONS:
        raise ValueError(f"combination must be one of {COMBINATIONS}, got {combination!r}")
    stacked = jnp.stack(list(level_maps))
    if combination == "product":
        return jnp.prod(stacked, axis=0)
    total = jnp.sum(stacked, axis=0)
    return total if combination == "sum" else total / len(level_maps)


def check_score(score: str, combination: str) -> None:
    """Raise ``ValueError`` for an unknown score or combination, or a product of z-scores."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if combination not in COMBINATIONS:
        raise ValueError(f"combination must be one of {COMBINATIONS}, got {combination!r}")
    if score == "error_variance" and combination == "product":
        raise ValueError(
            "score='error_variance' normalises e and v to z-scores, negative on most normal "
            "pixels, whose product ranks nothing: use combination='mean' (or 'sum'), or "
            "score='error' for the paper's product"
        )


def anomaly_map(
    errors: Sequence[jax.Array],
    variances: Sequence[jax.Array],
    image_size: tuple[int, int],
    *,
    score: str = "error",
    combination: str = "product",
    normalization: jax.Array | np.ndarray | None = None,
) -> jax.Array:
    """The anomaly map from the levels' e and v.

    Args:
        errors, variances: ``[N, h_l, w_l]`` per level (:func:`ensemble_level_scores`).
        image_size: ``(H, W)`` of the map.
        score: ``"error"`` (e_l; the paper's Ω_l for M = 1) or ``"error_variance"``
            (normalised ẽ_l + ṽ_l).
        combination: how the levels are combined, see :func:`combine_levels`.
        normalization: ``[L, 4]`` (e_μ, e_σ, v_μ, v_σ) per level; needed by
            ``"error_variance"``.

    Returns:
        ``[N, H, W]`` float32.
    """
    check_score(score, combination)
    if score == "error":
        return combine_levels([upsample(e, image_size) for e in errors], combination)
    if normalization is None:
        raise ValueError("score='error_variance' needs the per-level normalization")
    levels = []
    for level, (error, variance) in enumerate(zip(errors, variances, strict=True)):
        e_mean, e_std, v_mean, v_std = (normalization[level, i] for i in range(4))
        error, variance = upsample(error, image_size), upsample(variance, image_size)
        levels.append((error - e_mean) / e_std + (variance - v_mean) / v_std)
    return combine_levels(levels, combination)
