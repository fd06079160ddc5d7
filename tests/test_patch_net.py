import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ustad.uninformed_students.nets import ARCHITECTURES, patch_net, receptive_field


@pytest.mark.parametrize(
    "p, expected",
    [(17, 2_996_480), (33, 1_616_000), (65, 2_320_640)],
)
def test_full_size_parameter_counts(p, expected):
    module = patch_net(p)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, p, p, 3)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert count == expected  # paper: ≈3.0 M, ≈1.6 M, ≈2.3 M


@pytest.mark.parametrize("p", [17, 33, 65])
def test_patch_mode_maps_patches_to_descriptors(p):
    module = patch_net(p, widths=1 / 16, out_dim=8)
    x = jax.random.uniform(jax.random.key(1), (3, p, p, 3))
    variables = module.init(jax.random.key(0), x)
    out = module.apply(variables, x)
    assert out.shape == (3, 8)
    assert np.all(np.isfinite(out))


def test_receptive_field_is_what_reaches_the_output():
    # The floor of odd-sized poolings drops the last row/column: 17, 32 of 33, 60 of 65.
    assert [receptive_field(ARCHITECTURES[p]) for p in (17, 33, 65)] == [17, 32, 60]
    module = patch_net(65, widths=1 / 16, out_dim=4)
    x = jax.random.uniform(jax.random.key(1), (1, 65, 65, 3))
    variables = module.init(jax.random.key(0), x)
    changed = x.at[:, 60:, :, :].set(0.0).at[:, :, 60:, :].set(0.0)
    np.testing.assert_array_equal(module.apply(variables, x), module.apply(variables, changed))
    changed = x.at[:, 59, 59, :].set(50.0)  # large, so the max poolings pass it on
    assert not np.allclose(module.apply(variables, x), module.apply(variables, changed))


def test_widths_and_errors():
    module = patch_net(33, widths=[4, 5, 6], out_dim=7)
    variables = module.init(jax.random.key(0), jnp.zeros((1, 33, 33, 1)))
    assert variables["params"]["conv1"]["kernel"].shape == (5, 5, 1, 4)
    assert variables["params"]["conv4"]["kernel"].shape == (4, 4, 6, 7)
    with pytest.raises(ValueError, match="one of"):
        patch_net(31)
    with pytest.raises(ValueError, match="3 ints"):
        patch_net(33, widths=[4, 5])
    with pytest.raises(ValueError, match="patch mode takes"):
        module.apply(variables, jnp.zeros((1, 40, 40, 1)))
