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
normalisation) and :class:`ustad.scoring.Detector`; :mod:`ustad.scoring` re-exports them.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ustad import sharding as shd
from ustad.dense import dense_apply
from ustad.models.patch_net import PatchNet
from ustad.stats import Moments, batch_moments, empty_moments, finalize, merge_moments

PyTree = Any
REDUCTIONS = ("max", "mean", "topk")


class ScoreNormalization(NamedTuple):
    """Mean and standard deviation of e and v over the validation pixels (scalars)."""

    error_mean: float
    error_std: float
    variance_mean: float
    variance_std: float

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self._asdict().items()}


# The students regress targets of unit variance per dimension, so e (and v) of any student that
# learnt something are O(d) per pixel; a mean beyond this many times d means training diverged
# (lr = 10 gave e ≈ 6e21) even when nothing overflowed to inf.
ABSURD_PER_DIMENSION = 1e4


def check_normalization(normalization: ScoreNormalization, out_dim: int, where: str) -> None:
    """Raise ``FloatingPointError`` if the score statistics are not finite or absurdly large.

    Args:
      normalization: e/v statistics of one scale.
      out_dim: d, the descriptor dimension.
      where: what they belong to (a workdir), for the message.
    """
    for name, value in normalization.as_dict().items():
        if not math.isfinite(value):
            raise FloatingPointError(
                f"{where}: the score normalisation has {name} = {value}, so every score would be "
                f"0 or NaN; training diverged: retrain in a new workdir with a lower "
                f"--config.learning_rate"
            )
    limit = ABSURD_PER_DIMENSION * out_dim
    for name in ("error_mean", "variance_mean"):
        value = getattr(normalization, name)
        if value > limit:
            raise FloatingPointError(
                f"{where}: the score normalisation has {name} = {value:.3g}, beyond {limit:.3g} "
                f"({ABSURD_PER_DIMENSION:g} × d, d = {out_dim}; the targets have unit variance "
                f"per dimension): training diverged; retrain in a new workdir with a lower "
                f"--config.learning_rate"
            )


MEMBER_STRATEGIES = ("auto", "vmap", "sequential")


def resolve_member_strategy(strategy: str = "auto", *, sharded: bool = False) -> str:
    """How a function of one student is lifted to the M stacked students.

    ``"vmap"`` batches the members into one computation (convolutions whose input and kernel
    both carry the member axis become grouped convolutions). ``"sequential"`` runs the members
    one after another inside the same compiled program (a fully unrolled ``lax.scan``: ordinary
    convolutions, one member's activations at a time).

    ``"auto"``: ``"sequential"`` on CPU, where for p=65 at 128², M=3 it was 1.48× faster than
    vmap (12.1 vs 17.9 s per step, timed in turn in one run on an idle 2-core AMD EPYC;
    benchmarks/student_step.py, raw lines in benchmarks/results/student_step_cpu.jsonl) and
    needed less memory (XLA's estimate 3,667 vs 4,350 MB); ``"vmap"`` on accelerators
    (grouped convolutions are native there; not measured in this project yet) and whenever
    the members are sharded over devices, so that each device runs its own members. A rolled
    ``lax.map`` ran 30× slower on XLA:CPU and is not offered.
    """
    if strategy not in MEMBER_STRATEGIES:
        raise ValueError(f"member_strategy must be one of {MEMBER_STRATEGIES}, got {strategy!r}")
    if strategy != "auto":
        return strategy
    return "sequential" if jax.default_backend() == "cpu" and not sharded else "vmap"


def map_members(fn, stacked: PyTree, *shared, strategy: str = "vmap"):
    """``fn(member, *shared)`` for every member of ``stacked`` (leading axis M).

    Args:
      fn: a function of one member's pytree and the shared arguments.
      stacked: pytree with leading axis M.
      *shared: arguments common to all members (e.g. the images).
      strategy: ``"vmap"`` or ``"sequential"`` (see :func:`resolve_member_strategy`).

    Returns:
      ``fn``'s outputs stacked along a new leading axis M.
    """
    if strategy == "vmap":
        return jax.vmap(fn, in_axes=(0,) + (None,) * len(shared))(stacked, *shared)
    if strategy == "sequential":
        # Fully unrolled: straight-line code, no while loop (XLA:CPU ran convolutions inside a
        # rolled loop ~30× slower).
        _, outputs = jax.lax.scan(
            lambda carry, member: (carry, fn(member, *shared)), None, stacked, unroll=True
        )
        return outputs
    raise ValueError(f"strategy must be 'vmap' or 'sequential', got {strategy!r}")


def mixture_mean(student_outputs: jax.Array) -> jax.Array:
    """``[M, ..., D] → [..., D]``: the mean of the students' predictions."""
    return jnp.mean(student_outputs, axis=0)


def regression_error(student_outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """``e = ||μ̄ − t||²``.

    Args:
      student_outputs: ``[M, ..., D]`` students' predictions μ^{S_i}.
      targets: ``[..., D]`` normalised teacher descriptors.

    Returns:
      ``[...]`` float32.
    """
    diff = mixture_mean(student_outputs.astype(jnp.float32)) - targets.astype(jnp.float32)
    return jnp.sum(jnp.square(diff), axis=-1)


def predictive_variance(student_outputs: jax.Array) -> jax.Array:
    """``v = (1/M) Σ_i ||μ^{S_i}||² − ||μ̄||²``, computed as ``(1/M) Σ_i ||μ^{S_i} − μ̄||²``.

    The two are equal; the centred form avoids the float32 cancellation of the paper's form
    when the predictions are large compared with their spread.

    Args:
      student_outputs: ``[M, ..., D]``.

    Returns:
      ``[...]`` float32, ≥ 0.
    """
    outputs = student_outputs.astype(jnp.float32)
    centred = outputs - jnp.mean(outputs, axis=0)
    return jnp.mean(jnp.sum(jnp.square(centred), axis=-1), axis=0)


def normalized_score(
    error: jax.Array, variance: jax.Array, normalization: ScoreNormalization | jax.Array
) -> jax.Array:
    """``(e − e_μ)/e_σ + (v − v_μ)/v_σ`` elementwise.

    Args:
      error, variance: ``[...]``.
      normalization: a :class:`ScoreNormalization` or ``[4]`` array in its field order.
    """
    e_mean, e_std, v_mean, v_std = (normalization[i] for i in range(4))
    return (error - e_mean) / e_std + (variance - v_mean) / v_std


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
    at 4σ, accumulated in float64. Not in the paper; an option of :class:`ustad.scoring.Detector`.

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
    shape = images.shape[:3]
    total = np.zeros(shape, np.float32)
    for scorer in scorers:
        maps = scorer(images)
        if maps.shape != shape:
            maps = np.asarray(jax.image.resize(maps, shape, "linear"))
        total += maps
    maps = smooth_maps(total / count, smooth_sigma)
    return maps, np.asarray(reduce_maps(jnp.asarray(maps), reduction, top_k))


def scoring_settings(reduction: str, top_k: int, smooth_sigma: float) -> dict:
    """The scoring options, JSON-ready (recorded next to what ``ustad score`` writes)."""
    return {"reduction": reduction, "top_k": int(top_k), "smooth_sigma": smooth_sigma}


def reduce_maps(maps: jax.Array, reduction: str = "max", top_k: int = 100) -> jax.Array:
    """Image scores from anomaly maps.

    Args:
      maps: ``[N, H, W]``.
      reduction: ``"max"`` (default), ``"mean"`` or ``"topk"`` (mean of the ``top_k`` highest
        pixels, less sensitive to a single noisy pixel than the max).
      top_k: pixels averaged by ``"topk"`` (≥ 1; clipped to H·W).

    Returns:
      ``[N]``.
    """
    check_scoring_options(reduction, top_k)
    flat = maps.reshape(maps.shape[0], -1)
    if reduction == "max":
        return jnp.max(flat, axis=1)
    if reduction == "mean":
        return jnp.mean(flat, axis=1)
    return jnp.mean(jax.lax.top_k(flat, min(int(top_k), flat.shape[1]))[0], axis=1)


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


def normalization_from_moments(moments: Moments) -> ScoreNormalization:
    """From the moments of the ``[..., 2]`` stack ``(e, v)``."""
    stats = finalize(moments, min_std=1e-12)
    return ScoreNormalization(
        float(stats.mean[0]), float(stats.std[0]), float(stats.mean[1]), float(stats.std[1])
    )


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
) -> ScoreNormalization:
    """e_μ, e_σ, v_μ, v_σ over every pixel of ``images`` (streamed, Chan merge in float64).

    Args:
      teacher, student, params: as for :func:`error_and_variance`.
      images: ``[N, H, W, C]`` anomaly-free validation images (host array).
      batch_size: images per jitted call.
      padding: dense-extraction padding.
      put: places a host batch on the devices (default ``jnp.asarray``).
      member_strategy: see :func:`resolve_member_strategy`.
    """
    put = put or jnp.asarray
    strategy = resolve_member_strategy(member_strategy)
    moments_of = _error_variance_moments_fn(teacher, student, padding, strategy)
    total = None
    for start in range(0, len(images), batch_size):
        moments = shd.to_host(moments_of(params, put(images[start : start + batch_size])))
        total = moments if total is None else merge_moments(total, moments)
    if total is None:
        raise ValueError("compute_normalization needs at least one image")
    return normalization_from_moments(merge_moments(empty_moments(2), total))
