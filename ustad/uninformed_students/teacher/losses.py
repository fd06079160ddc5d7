"""The three teacher-pretraining losses of Uninformed Students (paper §3).

* knowledge distillation ``L_k = ||D(T̂(p)) − P(p)||²``;
* metric learning (triplets) ``L_m = max(0, δ + δ⁺ − δ⁻)``;
* descriptor compactness ``L_c = Σ_{i≠j} c_ij`` over the correlation matrix of the descriptor
  dimensions.

Each is a pure function of descriptor batches, returning a float32 scalar (the mean over the
batch where the paper's loss is per sample). The networks are applied by the caller, which keeps
these functions independent of Flax and of how the networks are batched.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "COMPACTNESS_MODES",
    "compactness_loss",
    "descriptor_correlation",
    "distillation_loss",
    "triplet_loss",
]


COMPACTNESS_MODES = ("signed", "abs", "squared")


def distillation_loss(decoded: jax.Array, targets: jax.Array) -> jax.Array:
    """Knowledge distillation ``L_k``: mean over the batch of ``||D(T̂(p)) − P(p)||²``.

    The decoder D is applied by the caller (``decoded = D(T̂(p))``), so the same function serves
    any decoder; the targets should come through ``jax.lax.stop_gradient`` (P is frozen).

    Args:
      decoded: ``[B, F]`` decoded teacher descriptors ``D(T̂(p))``.
      targets: ``[B, F]`` features ``P(p)`` of the pretrained network.

    Returns:
      Scalar float32.
    """
    if decoded.shape != targets.shape:
        raise ValueError(f"decoded {decoded.shape} and targets {targets.shape} differ in shape")
    diff = decoded.astype(jnp.float32) - targets.astype(jnp.float32)
    return jnp.mean(jnp.sum(jnp.square(diff), axis=-1))


def _squared_distance(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=-1)


def triplet_loss(
    anchor: jax.Array, positive: jax.Array, negative: jax.Array, margin: float
) -> jax.Array:
    """Triplet loss ``L_m = max(0, δ + δ⁺ − δ⁻)`` with the paper's strongest-negative rule.

    ``δ⁺ = ||a − p||²`` and ``δ⁻ = min(||a − n||², ||p − n||²)`` (squared Euclidean distances):
    the negative must be far from both the anchor and its perturbed copy.

    Args:
      anchor: ``[B, d]`` descriptors ``T̂(p)``.
      positive: ``[B, d]`` descriptors ``T̂(p⁺)`` of slightly perturbed copies.
      negative: ``[B, d]`` descriptors ``T̂(p⁻)`` of other random patches.
      margin: δ ≥ 0 (not given in the paper).

    Returns:
      Scalar float32, the mean over the batch.
    """
    positive_distance = _squared_distance(anchor, positive)
    negative_distance = jnp.minimum(
        _squared_distance(anchor, negative), _squared_distance(positive, negative)
    )
    return jnp.mean(jnp.maximum(0.0, margin + positive_distance - negative_distance))


def descriptor_correlation(descriptors: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Pearson correlation matrix of the descriptor *dimensions* over a batch.

    Args:
      descriptors: ``[B, d]``; row b is one patch's descriptor.
      eps: added to each dimension's variance, so a constant dimension has correlation ≈ 0
        with everything (and gradients stay finite) instead of 0/0.

    Returns:
      ``[d, d]`` float32; entry (i, j) correlates dimension i with dimension j across the B
      samples (not the ``[B, B]`` correlation of samples).
    """
    x = descriptors.astype(jnp.float32)
    centered = x - jnp.mean(x, axis=0, keepdims=True)
    # The 1/B normalisation cancels between covariance and variances.
    covariance = centered.T @ centered / x.shape[0]
    inv_std = jax.lax.rsqrt(jnp.diagonal(covariance) + eps)
    return covariance * inv_std[:, None] * inv_std[None, :]


def compactness_loss(descriptors: jax.Array, eps: float = 1e-8, mode: str = "squared") -> jax.Array:
    """Descriptor compactness ``L_c = Σ_{i≠j} c_ij`` (paper §3).

    ``c`` is the ``[d, d]`` correlation matrix of the descriptor dimensions over the minibatch
    (:func:`descriptor_correlation`), computed on ``T̂``'s output, not after the decoder.

    Args:
      descriptors: ``[B, d]`` teacher descriptors ``T̂(p)``, B ≥ 2.
      eps: variance epsilon for constant dimensions.
      mode: ``"signed"`` is the paper's formula, the plain sum of the off-diagonal entries. It
        equals ``Var(Σ_i z_i) − d`` for the standardised dimensions z_i, so it reaches its floor
        −d as soon as the z_i sum to a constant across the batch (one linear dependency, found
        within a few hundred steps); from there its gradient no longer decorrelates anything,
        and it rewards *negative* correlations rather than absent ones (trained p = 33 teachers
        keep a mean |c_ij| of 0.24–0.68). ``"abs"`` (``Σ_{i≠j} |c_ij|``) and ``"squared"``
        (``Σ_{i≠j} c_ij²``, ustad's default, chosen by the probes in RESULTS.md) are
        deviations from the paper whose minimum, 0, is decorrelated dimensions. With a batch
        B ≤ d the correlation matrix has rank ≤ B − 1, so the squared sum cannot go below
        d²/(B − 1) − d (132 for d = 128, B = 64): a floor, with useful gradient above it.

    Returns:
      Scalar float32.
    """
    if mode not in COMPACTNESS_MODES:
        raise ValueError(f"mode must be one of {COMPACTNESS_MODES}, got {mode!r}")
    if descriptors.ndim != 2 or descriptors.shape[0] < 2:
        raise ValueError(f"descriptors must be [B >= 2, d], got shape {descriptors.shape}")
    correlation = descriptor_correlation(descriptors, eps)
    off_diagonal = 1.0 - jnp.eye(correlation.shape[0], dtype=correlation.dtype)
    if mode == "abs":
        correlation = jnp.abs(correlation)
    elif mode == "squared":
        correlation = jnp.square(correlation)
    return jnp.sum(correlation * off_diagonal)
