"""Dense extraction must equal the patch network applied to every patch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ustad.uninformed_students.dense import dense_apply, extract_patches, per_patch_apply, unwarp
from ustad.uninformed_students.nets import patch_net


@functools.cache  # one network per p for the module: its variables are only ever read
def _net(p, channels=3, out_dim=8):
    module = patch_net(p, widths=1 / 16, out_dim=out_dim)
    variables = module.init(jax.random.key(p), jnp.zeros((1, p, p, channels)))
    return module, variables


def _rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@functools.cache
def _per_patch_reference(p, size):
    """``(images, per_patch_apply(...))`` of :func:`test_dense_equals_per_patch`: the slow
    reference (every patch through the network) is computed once for both methods."""
    module, variables = _net(p)
    images = jax.random.uniform(jax.random.key(7), (2, *size, 3))
    return images, per_patch_apply(module, variables, images)


@pytest.mark.parametrize("method", ["multipool", "atrous"])
@pytest.mark.parametrize(
    "p, size",
    [(17, (20, 28)), (33, (24, 36)), (33, (36, 20)), (65, (40, 48)), (65, (48, 40))],
)
def test_dense_equals_per_patch(p, size, method):
    module, variables = _net(p)
    images, reference = _per_patch_reference(p, size)
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
    # dense_apply jits internally; disable_jit runs it op by op for the eager reference.
    with jax.disable_jit():
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
    module, _ = _net(17)
    images = jnp.arange(2 * 20 * 24, dtype=jnp.float32).reshape(2, 20, 24, 1)
    patches = extract_patches(images, module, padding="constant")
    assert patches.shape == (2, 20, 24, 17, 17, 1)
    np.testing.assert_array_equal(patches[:, :, :, 8, 8, 0], images[..., 0])


@pytest.mark.parametrize("method", ["multipool", "atrous"])
@pytest.mark.parametrize("p", [17, 33, 65])
def test_descriptor_windows_are_centred_on_their_pixels(p, method):
    """An impulse at (r0, c0) changes exactly the descriptors whose window holds it: R rows and
    columns of them, centred on the impulse to within half a pixel."""
    module, variables = _net(p)
    side = module.receptive_field
    size, r0, c0 = 96, 45, 50
    background = jnp.zeros((1, size, size, 3))
    impulse = background.at[0, r0, c0].set(1.0)
    both = jnp.concatenate([background, impulse])
    out = dense_apply(module, variables, both, padding="constant", method=method)
    changed = np.asarray(jnp.any(jnp.abs(out[1] - out[0]) > 1e-6, axis=-1))
    rows, cols = np.nonzero(changed)
    for hits, centre in ((rows, r0), (cols, c0)):
        assert hits.max() - hits.min() + 1 == side
        assert abs((hits.max() + hits.min()) / 2 - centre) <= 0.5
    # The old (p−1)/2-per-side padding put p = 65's window 2.5 px off: a bound of 0.5 catches it.
    assert rows.min() == r0 - (side - 1 - side // 2) and rows.max() == r0 + side // 2


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
