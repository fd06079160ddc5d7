"""Streaming, numerically stable moments: the teacher's target statistics (paper §4).

The students regress normalised teacher descriptors ``(y^T - μ) / σ``, with μ, σ ∈ R^d the
per-dimension mean and standard deviation of the teacher's dense descriptors over all pixels of
all training images. 200 images × 256² pixels are 13 M descriptors: a one-pass ``E[x²] - E[x]²``
in float32 cancels catastrophically when |μ| ≫ σ, and storing them all to run NumPy twice costs
6.7 GB. Instead each batch is reduced on the device to ``(count, mean, M2)`` with a centred
float32 two-pass (exact enough over one batch), and batches are merged on the host in float64
with Chan et al.'s parallel update ("Updating formulae and a pairwise algorithm for computing
sample variances", 1979)::

    δ = mean_b - mean_a,   n = n_a + n_b
    mean = mean_a + δ · n_b / n
    M2 = M2_a + M2_b + δ² · n_a · n_b / n

The same moments serve the score normalisation (:mod:`ustad.uninformed_students.score`), with d = 1.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ustad.sharding import to_host

PyTree = Any

# Descriptor dimensions that never vary (a dead channel of the teacher) would divide by zero;
# flooring σ keeps their normalised target at 0 instead of NaN. Real σ are O(0.1)–O(10).
MIN_STD = 1e-6


class Moments(NamedTuple):
    """Count, mean and sum of squared deviations of a set of vectors.

    Attributes:
      count: number of vectors n (float, so counts beyond 2^31 stay exact in float64).
      mean: ``[D]``.
      m2: ``[D]``, Σ (x - mean)².
    """

    count: np.ndarray | jax.Array
    mean: np.ndarray | jax.Array
    m2: np.ndarray | jax.Array


def batch_moments(x: jax.Array) -> Moments:
    """Moments of one batch, over every axis but the last (trace-friendly, use inside jit).

    Args:
      x: ``[..., D]``, e.g. dense descriptors ``[N, H, W, D]``.

    Returns:
      ``Moments`` with ``count`` a float32 scalar and ``mean``, ``m2`` ``[D]`` float32.
    """
    flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    # Shift by one sample first: float32 sums of values near a large offset lose the digits
    # that the spread lives in; sums of x − x₀ do not.
    shift = flat[0]
    shifted = flat - shift
    shifted_mean = jnp.mean(shifted, axis=0)
    # Centred second pass over the same batch: no cancellation, unlike E[x²] − E[x]².
    m2 = jnp.sum(jnp.square(shifted - shifted_mean), axis=0)
    return Moments(jnp.asarray(flat.shape[0], jnp.float32), shift + shifted_mean, m2)


def empty_moments(dim: int) -> Moments:
    """The moments of no data, ``[D]`` float64 on the host."""
    return Moments(np.float64(0.0), np.zeros(dim, np.float64), np.zeros(dim, np.float64))


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Chan et al.'s parallel merge, in float64 on the host.

    Args:
      a, b: moments of two disjoint sets (host or device arrays, any float dtype).

    Returns:
      The moments of their union, float64 NumPy.
    """
    count_a, count_b = np.float64(a.count), np.float64(b.count)
    mean_a, mean_b = np.asarray(a.mean, np.float64), np.asarray(b.mean, np.float64)
    m2_a, m2_b = np.asarray(a.m2, np.float64), np.asarray(b.m2, np.float64)
    count = count_a + count_b
    if count == 0:
        return Moments(count, mean_a, m2_a)
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / count)
    m2 = m2_a + m2_b + np.square(delta) * (count_a * count_b / count)
    return Moments(count, mean, m2)


@dataclasses.dataclass(frozen=True)
class TargetStats:
    """Per-dimension normalisation of the teacher's descriptors.

    Attributes:
      mean: ``[D]`` float32, μ.
      std: ``[D]`` float32, σ (population standard deviation, floored at :data:`MIN_STD`).
      count: number of descriptors they were computed from.
    """

    mean: np.ndarray
    std: np.ndarray
    count: int

    def as_arrays(self) -> dict[str, np.ndarray]:
        """``{"mean": [D], "std": [D]}`` float32, for checkpoints and jitted functions."""
        return {"mean": np.asarray(self.mean, np.float32), "std": np.asarray(self.std, np.float32)}

    @classmethod
    def from_arrays(cls, arrays, count: int = 0) -> TargetStats:
        return cls(
            np.asarray(arrays["mean"], np.float32),
            np.asarray(arrays["std"], np.float32),
            int(count),
        )


def finalize(moments: Moments, min_std: float = MIN_STD) -> TargetStats:
    """Mean and population standard deviation (``ddof = 0``: the paper says "standard
    deviation of all descriptors", and with millions of them the choice is immaterial)."""
    if moments.count == 0:
        raise ValueError("no descriptors: cannot compute statistics of an empty set")
    variance = np.asarray(moments.m2, np.float64) / np.float64(moments.count)
    std = np.maximum(np.sqrt(variance), min_std)
    return TargetStats(
        np.asarray(moments.mean, np.float32), std.astype(np.float32), int(moments.count)
    )


def descriptor_stats(
    describe: Callable[[PyTree, jax.Array], jax.Array],
    params: PyTree,
    images: np.ndarray,
    *,
    batch_size: int,
    put: Callable[[np.ndarray], jax.Array] | None = None,
    progress: Callable[[int], None] | None = None,
) -> TargetStats:
    """Per-dimension mean and std of dense descriptors over a set of images.

    Args:
      describe: ``describe(params, images [B, H, W, C]) -> [B, H, W, D]``; it is wrapped with
        :func:`batch_moments` under one ``jax.jit`` so only ``(count, mean, M2)`` leave the
        device. ``params`` is an argument (not closed over) so it is not baked into the program.
      params: the network's variables.
      images: ``[N, H, W, C]`` float32 in [0, 1] (host array).
      batch_size: images per call; the last batch may be smaller (one extra compilation).
      put: places a host batch on the devices (e.g. sharded over ``"data"``); default
        ``jnp.asarray``.
      progress: called with the number of images done after each batch.

    Returns:
      The statistics of all ``N·H·W`` descriptors.
    """
    if len(images) == 0:
        raise ValueError("descriptor_stats needs at least one image")
    put = put or jnp.asarray
    moments_of = _moments_fn(describe)
    total = None
    for start in range(0, len(images), batch_size):
        moments = to_host(moments_of(params, put(images[start : start + batch_size])))
        total = merge_moments(
            empty_moments(moments.mean.shape[-1]) if total is None else total, moments
        )
        if progress is not None:
            progress(min(batch_size, len(images) - start))
    return finalize(total)


@functools.lru_cache(maxsize=16)
def _moments_fn(describe):
    # Cached per ``describe`` object so that repeated calls reuse the compilation.
    return jax.jit(lambda params, images: batch_moments(describe(params, images)))
