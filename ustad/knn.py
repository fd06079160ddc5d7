"""Exact nearest-neighbour distances of feature vectors to a memory bank (chunked matmuls).

Used by the descriptor probe (:mod:`ustad.uninformed_students.nearest_neighbour`) and by the
nearest-neighbour reference detector (:mod:`ustad.evaluation.reference_knn`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def min_squared_distances(queries: jax.Array, bank: jax.Array, chunk: int) -> jax.Array:
    """``[Q, d]``, ``[B, d]`` -> ``[Q]``: squared distance to the nearest bank row."""
    bank_sq = jnp.sum(bank * bank, axis=-1)
    count = queries.shape[0]
    padded = -(-count // chunk) * chunk
    queries = jnp.pad(queries, ((0, padded - count), (0, 0)))

    def one(block):
        # ||q − b||² = ||q||² − 2 q·b + ||b||²: one matmul per chunk, never a [Q, B, d] array.
        cross = jnp.dot(block, bank.T, precision=jax.lax.Precision.HIGHEST)
        return jnp.sum(block * block, axis=-1) + jnp.min(bank_sq[None] - 2 * cross, axis=-1)

    out = jax.lax.map(one, queries.reshape(-1, chunk, queries.shape[-1]))
    return jnp.maximum(out.reshape(-1)[:count], 0.0)


def nearest_neighbour_distances(
    queries: np.ndarray, bank: np.ndarray, *, chunk: int = 2048
) -> np.ndarray:
    """Exact Euclidean distance from each query to its nearest neighbour in the bank.

    Both sets are centred on the bank's mean first (distances are unchanged, float32
    cancellation in ``||q||² − 2 q·b + ||b||²`` much smaller).

    Args:
      queries: ``[Q, d]``.
      bank: ``[B, d]``.
      chunk: queries per matmul (memory ``chunk·B`` floats).

    Returns:
      ``[Q]`` float32.
    """
    bank = jnp.asarray(bank, jnp.float32)
    centre = jnp.mean(bank, axis=0)
    squared = jax.jit(min_squared_distances, static_argnames="chunk")(
        jnp.asarray(queries, jnp.float32) - centre, bank - centre, chunk=chunk
    )
    return np.sqrt(np.asarray(squared))
