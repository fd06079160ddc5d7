import jax
import jax.numpy as jnp
import numpy as np

from ustad.ensemble import apply_ensemble, init_ensemble, member, num_members, vmap_members
from ustad.uninformed_students.nets import patch_net


def test_vmapped_init_and_apply_equal_a_loop():
    module = patch_net(17, widths=1 / 16, out_dim=6)
    sample = jnp.zeros((1, 17, 17, 3))
    key = jax.random.key(42)
    stacked = init_ensemble(module, key, 3, sample)
    assert num_members(stacked) == 3
    keys = jax.random.split(key, 3)
    x = jax.random.uniform(jax.random.key(1), (4, 17, 17, 3))
    outputs = apply_ensemble(module, stacked, x)
    assert outputs.shape == (3, 4, 6)
    for i in range(3):
        looped = module.init(keys[i], sample)
        chex_equal = jax.tree.map(np.testing.assert_allclose, member(stacked, i), looped)
        del chex_equal
        np.testing.assert_allclose(outputs[i], module.apply(looped, x), rtol=1e-5, atol=1e-6)
    # Members differ (independent keys).
    assert not np.allclose(outputs[0], outputs[1])


def test_vmap_members_with_shared_batch():
    def loss(params, batch):
        return jnp.sum(params["w"] * batch)

    params = {"w": jnp.arange(6.0).reshape(3, 2)}
    batch = jnp.array([1.0, 2.0])
    out = vmap_members(loss, shared_argnums=(1,))(params, batch)
    np.testing.assert_allclose(out, [loss({"w": params["w"][i]}, batch) for i in range(3)])
