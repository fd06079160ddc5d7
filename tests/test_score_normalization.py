"""The score normalisation e_μ, e_σ, v_μ, v_σ against NumPy, each of the four checked on its own
(so swapping the two standard deviations, or a mean and a std, fails)."""

import jax
import jax.numpy as jnp
import numpy as np

from ustad.uninformed_students.dense import dense_apply
from ustad.uninformed_students.maps import compute_normalization
from ustad.uninformed_students.nets import patch_net

NETWORK = patch_net(17, widths=1 / 16, out_dim=8)
SAMPLE = jnp.zeros((1, 17, 17, 3))


def test_each_of_the_four_statistics_matches_numpy():
    keys = jax.random.split(jax.random.key(3), 4)
    # Jitted: two compilations instead of op-by-op dispatch of every initialiser.
    teacher = jax.jit(NETWORK.init)(keys[0], SAMPLE)
    students = jax.jit(jax.vmap(lambda k: NETWORK.init(k, SAMPLE)))(keys[1:])
    params = {"teacher": teacher, "students": students, "mean": jnp.full(8, 0.02)}
    params["std"] = jnp.linspace(0.1, 0.3, 8)
    images = np.random.default_rng(0).uniform(size=(5, 20, 24, 3)).astype(np.float32)
    norm = compute_normalization(NETWORK, NETWORK, params, images, batch_size=2)

    # First principles in float64: normalised targets, the students' mixture, e and v.
    targets = np.asarray(dense_apply(NETWORK, teacher, images), np.float64)
    targets = (targets - np.asarray(params["mean"])) / np.asarray(params["std"])
    outputs = np.stack(
        [
            np.asarray(dense_apply(NETWORK, jax.tree.map(lambda x, i=i: x[i], students), images))
            for i in range(3)
        ]
    ).astype(np.float64)
    mixture = outputs.mean(axis=0)
    error = np.sum((mixture - targets) ** 2, axis=-1)
    variance = np.mean(np.sum(outputs**2, axis=-1), axis=0) - np.sum(mixture**2, axis=-1)
    expected = (error.mean(), error.std(), variance.mean(), variance.std())
    # The four differ from each other, so a swap cannot pass.
    assert min(abs(a - b) for i, a in enumerate(expected) for b in expected[i + 1 :]) > 1e-3
    got = (norm.error_mean, norm.error_std, norm.variance_mean, norm.variance_std)
    np.testing.assert_allclose(got, expected, rtol=2e-4)
