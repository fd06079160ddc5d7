"""Ensembles of M members as one stacked pytree (leading axis M), built and run by ``jax.vmap``.

A single member is written ensemble-unaware; these helpers lift it. Never a Python loop over
members: one trace, one XLA program, and the member axis can be sharded across devices.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ustad.stats import Moments, finalize

PyTree = Any


def init_ensemble(
    module: nn.Module, key: jax.Array, num_members: int, *sample_args, **sample_kwargs
) -> PyTree:
    """Initialise ``num_members`` independent members.

    Args:
      module: the member's Flax module.
      key: a typed PRNG key; member i is initialised with ``jax.random.split(key, M)[i]``.
      num_members: M.
      *sample_args, **sample_kwargs: example inputs for ``module.init`` (shared by all members).

    Returns:
      The members' variables stacked along a new leading axis of size M.
    """
    if num_members < 1:
        raise ValueError(f"num_members must be >= 1, got {num_members}")
    keys = jax.random.split(key, num_members)
    return jax.vmap(lambda k: module.init(k, *sample_args, **sample_kwargs))(keys)


def apply_ensemble(
    module: nn.Module, stacked_variables: PyTree, *args, **kwargs
) -> jax.Array | PyTree:
    """Apply every member to the same inputs.

    Args:
      module: the member's Flax module.
      stacked_variables: variables with leading axis M (from :func:`init_ensemble`).
      *args, **kwargs: inputs shared by all members (static keyword arguments such as ``mode``
        are passed through unchanged).

    Returns:
      The members' outputs stacked along a new leading axis M.
    """
    return jax.vmap(lambda v: module.apply(v, *args, **kwargs))(stacked_variables)


def vmap_members(fn: Callable, *, shared_argnums: tuple[int, ...] = ()) -> Callable:
    """Lift a per-member function to the ensemble.

    Args:
      fn: a function of one member's pytrees (parameters, optimizer state, …).
      shared_argnums: positions of arguments shared by all members (not mapped), e.g. the batch.

    Returns:
      ``fn`` vmapped over the leading axis of every other argument and of the outputs.
    """

    def lifted(*args):
        in_axes = tuple(None if i in shared_argnums else 0 for i in range(len(args)))
        return jax.vmap(fn, in_axes=in_axes)(*args)

    return lifted


def num_members(stacked: PyTree) -> int:
    """M, the size of the leading axis of a stacked pytree."""
    leaves = jax.tree.leaves(stacked)
    if not leaves:
        raise ValueError("empty ensemble pytree")
    return int(leaves[0].shape[0])


def member(stacked: PyTree, index: int) -> PyTree:
    """Member ``index`` of a stacked pytree."""
    return jax.tree.map(lambda x: x[index], stacked)


PyTree = Any


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
# What "auto" picks on CPU for M > 1, per kind of network: the faster strategy measured by
# benchmarks/member_strategy.py (RESULTS.md "Member strategy"). Accelerators always vmap.
CPU_STRATEGY = {"patch_net": "sequential", "pyramid": "sequential"}


def resolve_member_strategy(
    strategy: str = "auto", *, sharded: bool = False, network: str = "patch_net"
) -> str:
    """How a function of one student is lifted to the M stacked students (M > 1; a single
    member is always run directly, see :func:`map_members`).

    ``"vmap"`` batches the members into one computation (convolutions whose input and kernel
    both carry the member axis become grouped convolutions). ``"sequential"`` runs the members
    one after another inside the same compiled program (a fully unrolled ``lax.scan``: ordinary
    convolutions, one member's activations at a time).

    ``"auto"`` reads :data:`CPU_STRATEGY` on CPU, by ``network``: for M = 3, members in turn
    ran 1.61× faster than vmap for the small p = 33 patch network at 128², batch 2 (0.57 vs
    0.91 s), 1.48× for the full p = 65 one at 128², and 1.56× for STFPM's ResNet-18 pyramid at
    256², batch 8 (3.17 vs 4.93 s; benchmarks/member_strategy.py, one run on 2 AMD EPYC
    cores). It picks ``"vmap"`` on accelerators (grouped convolutions are native there) and
    whenever the members are sharded over devices, so that each device runs its own members.
    A rolled loop (``lax.map``, or a ``lax.scan`` of one member, which ``unroll=True`` leaves
    rolled) ran 13–30× slower on XLA:CPU and is never used.
    """
    if strategy not in MEMBER_STRATEGIES:
        raise ValueError(f"member_strategy must be one of {MEMBER_STRATEGIES}, got {strategy!r}")
    if network not in CPU_STRATEGY:
        raise ValueError(f"network must be one of {tuple(CPU_STRATEGY)}, got {network!r}")
    if strategy != "auto":
        return strategy
    if jax.default_backend() != "cpu" or sharded:
        return "vmap"
    return CPU_STRATEGY[network]


def map_members(fn, stacked: PyTree, *shared, strategy: str = "vmap"):
    """``fn(member, *shared)`` for every member of ``stacked`` (leading axis M).

    A single member (M = 1) is run directly, whatever the strategy: the program is then the
    single student's own (a one-member ``lax.scan`` made STFPM's ResNet step 26× slower on
    CPU, and a one-member vmap adds a batch axis to every operation).

    Args:
      fn: a function of one member's pytree and the shared arguments.
      stacked: pytree with leading axis M.
      *shared: arguments common to all members (e.g. the images).
      strategy: ``"vmap"`` or ``"sequential"`` (see :func:`resolve_member_strategy`).

    Returns:
      ``fn``'s outputs stacked along a new leading axis M.
    """
    if strategy not in ("vmap", "sequential"):
        raise ValueError(f"strategy must be 'vmap' or 'sequential', got {strategy!r}")
    if num_members(stacked) == 1:
        outputs = fn(jax.tree.map(lambda x: x[0], stacked), *shared)
        return jax.tree.map(lambda x: jnp.expand_dims(x, 0), outputs)
    if strategy == "vmap":
        return jax.vmap(fn, in_axes=(0,) + (None,) * len(shared))(stacked, *shared)
    # Fully unrolled: straight-line code, no while loop (XLA:CPU ran convolutions inside a
    # rolled loop ~30× slower).
    _, outputs = jax.lax.scan(
        lambda carry, member: (carry, fn(member, *shared)), None, stacked, unroll=True
    )
    return outputs


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


def normalization_from_moments(moments: Moments) -> ScoreNormalization:
    """From the moments of the ``[..., 2]`` stack ``(e, v)``."""
    stats = finalize(moments, min_std=1e-12)
    return ScoreNormalization(
        float(stats.mean[0]), float(stats.std[0]), float(stats.mean[1]), float(stats.std[1])
    )


# Robust score statistics (issue 21). Location: the median. Spread: the upper semi-spread
# (q₉₀ − q₅₀) / Φ⁻¹(0.9), which equals σ for a Gaussian. Why the upper side: e and v are ≥ 0
# and skewed to the right, anomalies are high values, and the lower side is squeezed against
# 0 (IQR / 1.349 would mix it in). Why the 90th percentile: it has a breakdown point of 10 % of
# the pixels, so a heavy tail of a few pixels (or one odd image among ten held-out ones) moves
# it little, where one pixel of value x moves σ by ~x/√n; and it still describes the upper part
# of the distribution that a max-reduced image score lives in.
ROBUST_QUANTILE = 0.9
GAUSSIAN_Z = 1.2815515655446004  # Φ⁻¹(0.9): (q₉₀ − q₅₀) / GAUSSIAN_Z = σ for a Gaussian
# The quantiles are exact over at most this many pixels per statistic (e and v at the same
# pixels), drawn per image by a seeded generator; a hold-out of up to 16 images of 256² is used
# whole. Beyond, each image gives the same number of pixels.
MAX_STATISTIC_PIXELS = 1 << 20
NORMALIZATION_KINDS = ("quantile", "moments")
# Spreads at or below this are treated as none (e.g. v ≡ 0 with one student).
MIN_SPREAD = 1e-12


def sample_pixels(maps: np.ndarray, first_image: int, per_image: int, seed: int) -> np.ndarray:
    """A deterministic subsample of each image's pixels, the same pixels for every channel.

    Args:
      maps: ``[B, H, W, K]`` per-pixel values (e.g. K = 2: e and v) of images
        ``first_image … first_image + B − 1`` of a set.
      per_image: pixels kept per image; all of them when ``per_image ≥ H·W``.
      seed: with the image's index in the set, seeds the choice, so the sample does not depend
        on the batch size.

    Returns:
      ``[B · min(per_image, H·W), K]`` float64.
    """
    maps = np.asarray(maps, np.float64)
    flat = maps.reshape(maps.shape[0], -1, maps.shape[-1])
    if per_image >= flat.shape[1]:
        return flat.reshape(-1, maps.shape[-1])
    picks = [
        flat[
            b,
            np.random.default_rng([seed, first_image + b]).choice(
                flat.shape[1], per_image, replace=False
            ),
        ]
        for b in range(flat.shape[0])
    ]
    return np.concatenate(picks)


class ScoreStatistics(NamedTuple):
    """The e/v statistics of held-out good pixels: both kinds, and which one scores.

    Attributes:
      kind: ``"quantile"`` (median, robust spread) or ``"moments"`` (mean, σ: the paper's).
      moments: mean and σ over every pixel.
      quantiles: ``[2, 3]`` float64, (q₅₀, q₉₀, robust spread) of e and of v over the sample.
      images: how many images the statistics come from.
      pixels: how many pixels they hold (the moments' count).
      sampled: how many of them the quantiles are exact over.
      seed: the seed of the sample.
    """

    kind: str
    moments: ScoreNormalization
    quantiles: np.ndarray
    images: int
    pixels: int
    sampled: int
    seed: int

    @property
    def normalization(self) -> ScoreNormalization:
        """The location and spread the scores are normalised by (the four numbers that
        :func:`normalized_score` takes; field names are the paper's mean/σ whatever the kind)."""
        if self.kind == "moments":
            return self.moments
        q = self.quantiles
        return ScoreNormalization(float(q[0, 0]), float(q[0, 2]), float(q[1, 0]), float(q[1, 2]))

    def record(self) -> dict:
        """JSON-ready, for the workdir's metadata (``"score_statistics"``)."""
        return {
            "kind": self.kind,
            "location": "median" if self.kind == "quantile" else "mean",
            "spread": (
                f"(q{ROBUST_QUANTILE * 100:g} - q50) / {GAUSSIAN_Z:.4f}"
                if self.kind == "quantile"
                else "standard deviation"
            ),
            "images": int(self.images),
            "pixels": int(self.pixels),
            "pixels_sampled": int(self.sampled),
            "sample_seed": int(self.seed),
            **{name: self._channel(i) for i, name in enumerate(("error", "variance"))},
        }

    def _channel(self, i: int) -> dict:
        q = self.quantiles[i]
        return {
            "q50": float(q[0]),
            f"q{ROBUST_QUANTILE * 100:g}": float(q[1]),
            "robust_std": float(q[2]),
            "mean": float(self.moments[2 * i]),
            "std": float(self.moments[2 * i + 1]),
        }


def score_statistics(
    moments: Moments, sample: np.ndarray, images: int, *, kind: str = "quantile", seed: int = 0
) -> ScoreStatistics:
    """Both kinds of e/v statistics from the moments of every pixel and a sample of them.

    A channel whose robust spread is not positive (more than half its pixels at one value, as
    v ≡ 0 with one student) falls back to its σ (floored at :data:`MIN_SPREAD`), as the paper's.

    Args:
      moments: of the ``[..., 2]`` stack ``(e, v)`` over every pixel.
      sample: ``[S, 2]`` (e, v) at S of those pixels (:func:`sample_pixels`).
      images: how many images they come from.
      kind: which kind :attr:`ScoreStatistics.normalization` returns.
      seed: the sample's seed, for the record.
    """
    if kind not in NORMALIZATION_KINDS:
        raise ValueError(
            f"score normalisation kind must be one of {NORMALIZATION_KINDS}, got {kind!r}"
        )
    sample = np.asarray(sample, np.float64)
    if sample.ndim != 2 or sample.shape[1] != 2 or not len(sample):
        raise ValueError(f"sample must be [S ≥ 1, 2] (e, v), got shape {sample.shape}")
    plain = normalization_from_moments(moments)
    median, upper = np.quantile(sample, [0.5, ROBUST_QUANTILE], axis=0)
    spread = (upper - median) / GAUSSIAN_Z
    stds = np.asarray([plain.error_std, plain.variance_std])
    spread = np.where(spread > MIN_SPREAD, spread, np.maximum(stds, MIN_SPREAD))
    quantiles = np.stack([median, upper, spread], axis=-1)
    return ScoreStatistics(
        kind, plain, quantiles, int(images), int(moments.count), len(sample), int(seed)
    )
