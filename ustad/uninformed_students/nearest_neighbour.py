"""Exact nearest-neighbour distances of dense descriptors to a memory bank.

The descriptor probe (:func:`ustad.uninformed_students.probes.descriptor_probe`) scores a test
pixel by the Euclidean distance of its teacher descriptor to the nearest descriptor of the
anomaly-free training images: :func:`memory_bank` draws a fixed random subset of those
descriptors, :func:`nearest_neighbour_maps` gives every test pixel its distance (a chunked
matmul per block of queries, never a ``[Q, B, d]`` array).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ustad.knn import min_squared_distances
from ustad.uninformed_students.dense import dense_apply
from ustad.uninformed_students.nets import PatchNet

__all__ = ["memory_bank", "nearest_neighbour_maps"]


PyTree = Any


def _batches(images: np.ndarray, batch_size: int):
    """Fixed-size batches (the last padded by repeating), so nothing recompiles."""
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        real = len(chunk)
        if real < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - real, axis=0)])
        yield start, real, jnp.asarray(chunk, jnp.float32)


def memory_bank(
    module: PatchNet,
    variables: PyTree,
    images: np.ndarray,
    size: int,
    *,
    seed: int = 0,
    batch_size: int = 8,
    padding: str = "reflect",
) -> np.ndarray:
    """Dense descriptors of a fixed random subset of the pixels of ``images``.

    Args:
      module, variables: the teacher.
      images: ``[N, H, W, C]`` anomaly-free images.
      size: descriptors kept (all ``N·H·W`` if fewer), drawn without replacement.
      seed: NumPy seed of the subset.
      batch_size: images per dense call.
      padding: dense extraction padding.

    Returns:
      ``[min(size, N·H·W), d]`` float32.
    """
    count, height, width = images.shape[:3]
    pixels = height * width
    chosen = np.random.default_rng(seed).choice(count * pixels, min(size, count * pixels), False)
    chosen.sort()
    parts = []
    for start, real, chunk in _batches(images, batch_size):
        descriptors = dense_apply(module, variables, chunk, padding=padding)
        flat = np.asarray(descriptors[:real]).reshape(real * pixels, -1)
        lo, hi = np.searchsorted(chosen, [start * pixels, (start + real) * pixels])
        parts.append(flat[chosen[lo:hi] - start * pixels])
    return np.concatenate(parts)


@functools.partial(jax.jit, static_argnames=("module", "padding", "chunk"))
def _nn_map_batch(module, padding, chunk, variables, images, bank, centre):
    descriptors = dense_apply(module, variables, images, padding=padding)
    batch, height, width, dim = descriptors.shape
    flat = descriptors.reshape(-1, dim) - centre
    squared = min_squared_distances(flat, bank - centre, chunk)
    return jnp.sqrt(squared).reshape(batch, height, width)


def nearest_neighbour_maps(
    module: PatchNet,
    variables: PyTree,
    images: np.ndarray,
    bank: np.ndarray,
    *,
    batch_size: int = 4,
    chunk: int = 2048,
    padding: str = "reflect",
) -> np.ndarray:
    """Each pixel's descriptor distance to its nearest neighbour in ``bank``.

    Args:
      module, variables: the teacher.
      images: ``[N, H, W, C]``.
      bank: ``[B, d]`` (:func:`memory_bank`).
      batch_size: images per jitted call.
      chunk: queries per matmul.
      padding: dense extraction padding.

    Returns:
      ``[N, H, W]`` float32.
    """
    bank = jnp.asarray(bank, jnp.float32)
    centre = jnp.mean(bank, axis=0)
    maps = np.empty(images.shape[:3], np.float32)
    for start, real, chunk_images in _batches(images, batch_size):
        out = _nn_map_batch(module, padding, chunk, variables, chunk_images, bank, centre)
        maps[start : start + real] = np.asarray(out)[:real]
    return maps
