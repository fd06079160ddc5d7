"""The teacher losses against direct NumPy formulas (paper §3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ustad.uninformed_students.teacher.losses import (
    compactness_loss,
    descriptor_correlation,
    distillation_loss,
    triplet_loss,
)


def _rng(seed=0):
    return np.random.default_rng(seed)


def test_distillation_matches_numpy():
    decoded, targets = _rng().normal(size=(2, 7, 11)).astype(np.float32)
    expected = np.mean([np.sum((decoded[b] - targets[b]) ** 2) for b in range(7)])
    np.testing.assert_allclose(distillation_loss(decoded, targets), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        distillation_loss(decoded, targets[:, :5])


def test_triplet_matches_numpy_with_strongest_negative():
    anchor, positive, negative = _rng(1).normal(size=(3, 9, 5)).astype(np.float32)
    margin = 0.5
    losses = []
    for a, p, n in zip(anchor, positive, negative, strict=True):
        d_pos = np.sum((a - p) ** 2)
        d_neg = min(np.sum((a - n) ** 2), np.sum((p - n) ** 2))
        losses.append(max(0.0, margin + d_pos - d_neg))
    np.testing.assert_allclose(
        triplet_loss(anchor, positive, negative, margin), np.mean(losses), rtol=1e-6
    )


def test_triplet_uses_the_negative_closest_to_positive():
    # a–n is far but p–n is close: the loss must see the close pair (δ⁻ = min).
    anchor = np.array([[0.0, 0.0]], np.float32)
    positive = np.array([[1.0, 0.0]], np.float32)
    negative = np.array([[1.5, 0.0]], np.float32)
    # δ⁺ = 1, δ⁻ = min(2.25, 0.25) = 0.25, margin 0 -> 0.75.
    np.testing.assert_allclose(triplet_loss(anchor, positive, negative, 0.0), 0.75, rtol=1e-6)
    # Far from both: no loss.
    far = np.array([[10.0, 0.0]], np.float32)
    assert float(triplet_loss(anchor, positive, far, 1.0)) == 0.0


def _numpy_compactness(x, mode="signed"):
    corr = np.corrcoef(x.astype(np.float64), rowvar=False)  # [d, d]: dimensions
    off = corr[~np.eye(corr.shape[0], dtype=bool)]
    return {"signed": off.sum(), "abs": np.abs(off).sum(), "squared": (off**2).sum()}[mode]


@pytest.mark.parametrize("mode", ["signed", "abs", "squared"])
def test_compactness_matches_numpy_corrcoef_of_dimensions(mode):
    x = _rng(2).normal(size=(32, 6)) @ _rng(3).normal(size=(6, 6))
    np.testing.assert_allclose(
        compactness_loss(jnp.asarray(x, jnp.float32), mode=mode),
        _numpy_compactness(x, mode),
        rtol=1e-4,
        atol=1e-4,
    )


def test_compactness_is_zero_for_decorrelated_and_large_for_correlated_dimensions():
    batch, dim = 64, 8
    # Exactly uncorrelated columns: Q of a column-centred matrix is orthonormal and, being
    # combinations of zero-mean columns, zero-mean.
    centred = _rng(4).normal(size=(batch, dim))
    q, _ = np.linalg.qr(centred - centred.mean(axis=0))
    decorrelated = jnp.asarray(q * 3.0 + 1.0, jnp.float32)
    for mode in ("signed", "abs", "squared"):
        assert abs(float(compactness_loss(decorrelated, mode=mode))) < 1e-4
    z = _rng(5).normal(size=(batch, 1))
    correlated = z * np.arange(1, dim + 1) + 1e-3 * _rng(6).normal(size=(batch, dim))
    value = float(compactness_loss(jnp.asarray(correlated, jnp.float32)))
    assert value > 0.99 * dim * (dim - 1)


def test_signed_compactness_sits_at_its_floor_while_dimensions_stay_correlated():
    """Why the default is squared: once the standardised dimensions sum to a constant (one
    linear dependency), the paper's signed sum is at its minimum −d although the dimensions are
    strongly correlated; the squared sum still sees the correlation."""
    batch, dim = 256, 8
    centred = _rng(10).normal(size=(batch, 2))
    q, _ = np.linalg.qr(centred - centred.mean(axis=0))  # two exactly uncorrelated signals
    a, b = (q * np.sqrt(batch)).T
    # Blocks (a, a, −a, −a) and (b, b, −b, −b): every |c_ij| within a block is 1, and the
    # standardised dimensions sum to zero.
    x = np.stack([a, a, -a, -a, b, b, -b, -b], axis=1)
    signed = float(compactness_loss(jnp.asarray(x, jnp.float32), mode="signed"))
    np.testing.assert_allclose(signed, -dim, atol=1e-3)
    correlation = np.corrcoef(x, rowvar=False)
    assert np.abs(correlation[~np.eye(dim, dtype=bool)]).mean() > 0.3
    squared = float(compactness_loss(jnp.asarray(x, jnp.float32)))  # the default
    assert squared > 0.1 * dim * (dim - 1)


def test_compactness_is_not_the_sample_correlation():
    x = _rng(7).normal(size=(16, 5)).astype(np.float32)
    ours = float(compactness_loss(x))
    samples = np.corrcoef(x.astype(np.float64))  # [B, B]: what the PyTorch ports compute
    sample_sum = samples[~np.eye(16, dtype=bool)].sum()
    assert descriptor_correlation(x).shape == (5, 5)
    assert not np.isclose(ours, sample_sum, rtol=1e-2)
    # Rescaling a dimension leaves the correlation of dimensions unchanged; the correlation of
    # samples changes.
    scaled = x * np.array([1.0, 10.0, 0.1, 3.0, 1.0], np.float32)
    np.testing.assert_allclose(compactness_loss(scaled), ours, rtol=1e-4, atol=1e-5)
    scaled_samples = np.corrcoef(scaled.astype(np.float64))
    assert not np.isclose(scaled_samples[~np.eye(16, dtype=bool)].sum(), sample_sum, rtol=1e-2)


def test_compactness_constant_dimension_is_finite_with_finite_gradient():
    x = _rng(8).normal(size=(10, 4)).astype(np.float32)
    x[:, 2] = 0.7
    value, grad = jax.jit(jax.value_and_grad(compactness_loss))(jnp.asarray(x))
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(np.asarray(grad)))
    expected = _numpy_compactness(np.delete(x, 2, 1), "squared")
    np.testing.assert_allclose(float(value), expected, rtol=1e-4)


def test_compactness_jit_equals_eager_and_rejects_bad_inputs():
    x = jnp.asarray(_rng(9).normal(size=(12, 4)), jnp.float32)
    np.testing.assert_allclose(
        jax.jit(compactness_loss, static_argnames="mode")(x, mode="abs"),
        compactness_loss(x, mode="abs"),
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="mode"):
        compactness_loss(x, mode="bogus")
    with pytest.raises(ValueError, match="B >= 2"):
        compactness_loss(x[:1])
