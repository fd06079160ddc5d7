"""The stride-8 grid descriptor probe (issue 23, the filter): exact on its grid, finds defects;
the distillation probe measures a teacher against its own (stage, standardised) target."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ustad.models.pretrained import Backbone
from ustad.uninformed_students import probes
from ustad.uninformed_students.dense import dense_apply
from ustad.uninformed_students.teacher import distillation, targets

KEY = functools.partial(jax.random.key, impl="rbg")
SIZE = 32


@pytest.fixture(scope="module")
def teacher():
    return probes.random_teacher(17, 1 / 16, 8, key=KEY(1))


def test_grid_descriptors_are_the_dense_descriptors_on_the_grid(teacher):
    images = np.random.default_rng(0).uniform(size=(3, SIZE, SIZE, 3)).astype(np.float32)
    grid = probes.grid_descriptors(teacher, images, stride=8, batch_size=2)  # 3 = 2 + 1 padded
    dense = np.asarray(dense_apply(teacher.module, teacher.variables, jnp.asarray(images)))
    assert grid.shape == (3, 4, 4, 8)
    np.testing.assert_allclose(grid, dense[:, 4::8, 4::8], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="30×32 px are not multiples of stride 8"):
        probes.grid_descriptors(teacher, images[:, :30], stride=8)


def test_grid_probe_map_is_the_nearest_neighbour_distance_on_the_grid(teacher, monkeypatch):
    rng = np.random.default_rng(1)
    train = rng.uniform(size=(4, SIZE, SIZE, 3)).astype(np.float32)
    test = rng.uniform(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    masks = np.zeros((2, SIZE, SIZE), bool)
    masks[1, 8:16, 8:16] = True
    seen = {}
    figures = probes.detection_figures

    def spy(maps, masks, labels):
        seen.setdefault("maps", np.asarray(maps))
        return figures(maps, masks, labels)

    monkeypatch.setattr(probes, "detection_figures", spy)
    result = probes.grid_descriptor_probe(teacher, train, test, masks, np.array([0, 1]), sigma=0)
    assert result["settings"]["bank_size"] == 4 * 16 and set(result["figures"]) == {"raw"}
    bank = probes.grid_descriptors(teacher, train).reshape(-1, 8)
    queries = probes.grid_descriptors(teacher, test)
    brute = np.sqrt(((queries[..., None, :] - bank) ** 2).sum(-1)).min(-1)  # [2, 4, 4]
    maps = seen["maps"]
    assert maps.shape == (2, SIZE, SIZE)
    # Bilinearly resized from the exact grid distances.
    expected = jax.image.resize(jnp.asarray(brute, jnp.float32), maps.shape, method="linear")
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-5)


def test_grid_probe_finds_a_bright_square(teacher):
    rng = np.random.default_rng(0)
    train = 0.5 + 0.02 * rng.normal(size=(6, SIZE, SIZE, 3)).astype(np.float32)
    test = 0.5 + 0.02 * rng.normal(size=(4, SIZE, SIZE, 3)).astype(np.float32)
    masks = np.zeros((4, SIZE, SIZE), bool)
    masks[2, 4:14, 4:14] = masks[3, 18:28, 16:26] = True
    test[masks] = 1.0
    result = probes.grid_descriptor_probe(teacher, train, test, masks, np.array([0, 0, 1, 1]))
    assert result["figures"]["raw"]["image_auroc"] == 1.0
    assert result["figures"]["raw"]["pixel_auroc"] > 0.9
    assert set(result["figures"]) == {"raw", "smoothed_sigma4"}


class _Staged:
    """A fake P with one 'stage': the window's mean colour per channel, times 10."""

    def apply(self, variables, images, return_maps=False):
        stage = 10.0 * images
        return {"stage1": stage} if return_maps else jnp.mean(stage, axis=(1, 2))


def test_distill_probe_uses_the_teachers_standardised_target(teacher):
    # The recorded standardisation is applied: with mean 5 and scale 10 the targets of
    # uniform [0, 1] crops (window means near 0.5, times 10) are near 0, not near 5.
    module = _Staged()
    backbone = Backbone(module, {}, lambda v, x: module.apply(v, x), 3)
    record = {"stages": [1], "standardize": True, "mean": [5.0] * 3, "scale": [10.0] * 3}
    crops = np.random.default_rng(0).uniform(size=(6, 17, 17, 3)).astype(np.float32)
    raw = distillation.backbone_targets(backbone, crops, 17, 3, None)
    standardised = distillation.backbone_targets(backbone, crops, 17, 3, None, record)
    np.testing.assert_allclose(standardised, (raw - 5.0) / 10.0, rtol=1e-5, atol=1e-6)
    assert np.abs(raw.mean() - 5.0) < 0.5 and np.abs(standardised).max() < 0.1
    assert targets.TargetSpec.from_record(record).name == "stage1 standardised"
    # A teacher carrying the record: distill_probe measures R² against that target.
    photos = [np.random.default_rng(i).uniform(size=(40, 40, 3)) for i in range(2)]
    carrier = types.SimpleNamespace(**vars(teacher) | {"target": record})
    carrier.description = dict(teacher.description, channels=3)
    result = distillation.distill_probe(carrier, backbone, photos, patches=64)
    assert result["settings"]["target"] == "stage1 standardised"
    assert result["figures"]["target_variance"] < 0.1
