"""The nearest-neighbour reference detector (benchmarks/reference_knn.py) on a random
EfficientNet-Lite0 and tiny images: shapes, a training image scores zero, others do not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ustad.evaluation.reference_knn import ReferenceKNN
from ustad.models.efficientnet_lite import EfficientNetLite0
from ustad.models.pretrained import Backbone


@pytest.fixture(scope="module")
def backbone():
    # Random weights without compiling Flax's initialisers (seconds on XLA:CPU).
    module = EfficientNetLite0(num_classes=10)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = str(path[-1])
        if "var" in name or "scale" in name:
            return np.ones(leaf.shape, np.float32)
        if "mean" in name or "bias" in name:
            return np.zeros(leaf.shape, np.float32)
        return (rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(
            np.float32
        )

    return Backbone(module, jax.tree_util.tree_map_with_path(fill, shapes), None, 1280)


def test_fit_and_score(backbone):
    rng = np.random.default_rng(0)
    train = rng.uniform(size=(3, 32, 48, 3)).astype(np.float32)
    detector = ReferenceKNN(backbone, bank_size=10**6, sigma=0, batch_size=2).fit(train)
    assert detector.bank.shape == (3 * 4 * 6, 120)  # stride 8: 4 × 6 vectors an image
    maps, scores = detector.score(train[:1])
    assert maps.shape == (1, 32, 48) and scores.shape == (1,)
    np.testing.assert_allclose(maps, 0.0, atol=1e-3)  # its own vectors are all in the bank
    other = rng.uniform(size=(2, 64, 96, 1)).astype(np.float32)  # gray, larger: resized
    maps, scores = detector.score(other)
    assert maps.shape == (2, 64, 96) and (scores > 1e-2).all()


def test_bank_subset_and_errors(backbone):
    train = np.random.default_rng(1).uniform(size=(2, 32, 48, 3)).astype(np.float32)
    detector = ReferenceKNN(backbone, bank_size=5, seed=3, batch_size=2)
    with pytest.raises(ValueError, match="before fit"):
        detector.score(train)
    assert detector.fit(train).bank.shape == (5, 120)
