"""The benchmark's STFPM level combinations == STFPMDetector with the matching settings."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ustad.stfpm.checkpoints import STFPMModel
from ustad.stfpm.combinations import combination_maps
from ustad.stfpm.nets import pyramid_net
from ustad.stfpm.score import STFPMDetector

SIZE = 32
KEY = functools.partial(jax.random.key, impl="rbg")


def _variables(network, seed):
    return jax.jit(network.init)(KEY(seed), jnp.zeros((1, SIZE, SIZE, 3)))


@pytest.fixture(scope="module")
def model():
    network = pyramid_net("resnet18", tiny=True)
    members = [_variables(network, 10 + i) for i in range(2)]
    params = {
        "teacher": _variables(network, 7),
        "students": jax.tree.map(lambda *x: np.stack(x), *members),
    }
    norm = np.array([[0.5, 0.2, 0.1, 0.05]] * 3, np.float32)
    params = jax.tree.map(np.asarray, params)
    return STFPMModel(network, params, (SIZE, SIZE), normalization=norm)


def test_combinations_equal_the_detector(model):
    images = np.random.default_rng(0).uniform(size=(3, SIZE, SIZE, 3)).astype(np.float32)
    sets = combination_maps(model, images, batch_size=2)
    assert set(sets) == {
        "product",
        "sum",
        "error_variance_mean",
        "student0_product",
        "student1_product",
    }

    def detector_maps(m, **settings):
        return STFPMDetector([dataclasses.replace(m, **settings)], batch_size=2).score(images)[0]

    np.testing.assert_allclose(sets["product"], detector_maps(model), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(
        sets["sum"], detector_maps(model, combination="sum"), rtol=1e-4, atol=1e-7
    )
    np.testing.assert_allclose(
        sets["error_variance_mean"],
        detector_maps(model, score="error_variance", combination="mean"),
        rtol=1e-4,
        atol=1e-4,
    )
    second = jax.tree.map(lambda x: x[1:], model.params["students"])
    np.testing.assert_allclose(
        sets["student1_product"],
        detector_maps(model, params=dict(model.params, students=second)),
        rtol=1e-4,
        atol=1e-7,
    )
