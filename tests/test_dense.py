"""Dense extraction must equal the patch network applied to every patch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ustad.dense import dense_apply, extract_patches, per_patch_apply, unwarp
from ustad.models.patch_net import patch_net


def _net(p, channels=3, out_dim=8):
    module = patch_net(p, widths=1 / 16, out_dim=out_dim)
    variables = module.init(jax.random.key(p), jnp.zeros((1, p, p, channels)))
    return module, variables


def _rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("method", ["multipool", "atrous"])
@pytest.mark.parametrize(
    "p, size",
    [(17, (20, 28)), (33, (24, 36)), (33, (36, 20)), (65, (40, 48)), (65, (48, 40))],
)
def test_dense_equals_per_patch(p, size, method):
    module, variables = _net(p)
    images = jax.random.uniform(jax.random.key(7), (2, *size, 3))
    reference = per_patch_apply(module, variables, images)
    dense = dense_apply(module, variables, images, patch_size=p, method=method)
    assert dense.shape == (2, *size, 8)
    assert _rel_err(dense, reference) <= 1e-4


@pytest.mark.parametrize("padding", ["constant", "edge"])
def test_padding_modes(padding):
    module, variables = _net(33, channels=1)
    images = jax.random.uniform(jax.random.key(3), (1, 16, 20, 1))
    reference = per_patch_apply(module, variables, images, padding=padding)
    dense = dense_apply(module, variables, images, padding=padding)
    assert _rel_err(dense, reference) <= 1e-4


def test_a_wrong_layout_is_detected():
    # The equivalence test can fail: a one-pixel shift of the patch grid must not pass it.
    module, variables = _net(33)
    images = jax.random.uniform(jax.random.key(5), (1, 24, 24, 3))
    dense = dense_apply(module, variables, images)
    reference = per_patch_apply(module, variables, images)
    assert _rel_err(jnp.roll(dense, 1, axis=2), reference) > 1e-2
    assert _rel_err(dense.transpose(0, 2, 1, 3), reference) > 1e-2


def test_dense_under_jit_and_vmap_of_members():
    module, variables = _net(17)
    images = jax.random.uniform(jax.random.key(2), (3, 20, 20, 3))
    eager = dense_apply(module, variables, images)
    jitted = jax.jit(lambda v, x: dense_apply(module, v, x))(variables, images)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)


def test_unwarp_order_matches_definition():
    # Two stride-2 poolings: pixel r = 4·q + 2·o2 + o1.
    batch, qh, qw = 2, 3, 2
    stacked = np.zeros((16 * batch, qh, qw, 1), np.float32)
    for o2y in range(2):
        for o2x in range(2):
            for o1y in range(2):
                for o1x in range(2):
                    for n in range(batch):
                        index = ((o2y * 2 + o2x) * 4 + (o1y * 2 + o1x)) * batch + n
                        for q in range(qh):
                            for s in range(qw):
                                r = 4 * q + 2 * o2y + o1y
                                c = 4 * s + 2 * o2x + o1x
                                stacked[index, q, s, 0] = 1000 * n + 100 * r + c
    out = np.asarray(unwarp(jnp.asarray(stacked), batch, (2, 2)))
    rows, cols = np.meshgrid(np.arange(4 * qh), np.arange(4 * qw), indexing="ij")
    for n in range(batch):
        np.testing.assert_array_equal(out[n, :, :, 0], 1000 * n + 100 * rows + cols)


def test_extract_patches_centres():
    images = jnp.arange(2 * 6 * 5, dtype=jnp.float32).reshape(2, 6, 5, 1)
    patches = extract_patches(images, 3, padding="constant")
    assert patches.shape == (2, 6, 5, 3, 3, 1)
    np.testing.assert_array_equal(patches[:, :, :, 1, 1, 0], images[..., 0])


def test_clear_errors():
    module, variables = _net(65)
    with pytest.raises(ValueError, match="multiple of 8"):
        dense_apply(module, variables, jnp.zeros((1, 36, 40, 3)))
    with pytest.raises(ValueError, match="expects 3"):
        dense_apply(module, variables, jnp.zeros((1, 40, 40, 1)))
    with pytest.raises(ValueError, match="numpy.pad"):
        dense_apply(module, variables, jnp.zeros((1, 40, 40, 3)), padding="wrap-around")
    with pytest.raises(ValueError, match="patch_size=33"):
        dense_apply(module, variables, jnp.zeros((1, 40, 40, 3)), patch_size=33)
    with pytest.raises(ValueError, match="method"):
        dense_apply(module, variables, jnp.zeros((1, 40, 40, 3)), method="fast")
    with pytest.raises(ValueError, match="\\[N, H, W, C\\]"):
        dense_apply(module, variables, jnp.zeros((40, 40, 3)))
