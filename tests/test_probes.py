"""Teacher probes: exact nearest neighbours, the memory bank, P's window, R², end to end."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ustad import knn
from ustad.detector import smooth_maps
from ustad.uninformed_students import nearest_neighbour, probes
from ustad.uninformed_students.dense import dense_apply
from ustad.uninformed_students.nets import patch_net
from ustad.uninformed_students.teacher import distillation

P, SIZE, DIM = 17, 16, 8


# threefry's random bits take seconds to compile on XLA:CPU; rbg keys keep the tests fast.
KEY = functools.partial(jax.random.key, impl="rbg")


@pytest.fixture(scope="module")
def teacher():
    return probes.random_teacher(P, 1 / 16, DIM, key=KEY(1))


def _images(seed, count, size=SIZE):
    return np.random.default_rng(seed).uniform(size=(count, size, size, 3)).astype(np.float32)


def test_nearest_neighbour_distances_equal_brute_force():
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(37, 5)).astype(np.float32) + 3.0
    bank = rng.normal(size=(11, 5)).astype(np.float32) + 3.0
    expected = np.sqrt(((queries[:, None] - bank[None]) ** 2).sum(-1)).min(1)
    got = knn.nearest_neighbour_distances(queries, bank, chunk=8)  # 37 = 4 chunks + 5
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # A query that is a bank row is at distance 0.
    assert knn.nearest_neighbour_distances(bank[3:4], bank)[0] < 1e-3


def test_random_teacher_is_the_architecture_initialised_by_its_key(teacher):
    module = patch_net(P, out_dim=DIM, widths=1 / 16)
    expected = jax.jit(module.init)(KEY(1), jnp.zeros((1, P, P, 3)))
    assert teacher.module == module
    jax.tree.map(np.testing.assert_array_equal, teacher.variables, expected)
    assert teacher.decoder is None
    assert teacher.description["p"] == P and teacher.description["d"] == DIM
    assert teacher.description["width_fraction"] == 0.0625
    assert teacher.description["steps"] == 0


def test_parse_random_spec():
    assert probes.parse_random_spec("random:33:0.125:32") == (33, 0.125, 32)
    assert probes.parse_random_spec("random:65:paper:128") == (65, None, 128)
    for bad in ("random:17:0.5", "17:0.5:8"):
        with pytest.raises(ValueError, match="random:<p>"):
            probes.parse_random_spec(bad)


def test_memory_bank_is_a_seeded_subset_of_the_dense_descriptors(teacher):
    images = _images(0, 3)
    dense = np.asarray(dense_apply(teacher.module, teacher.variables, jnp.asarray(images)))
    rows = dense.reshape(-1, DIM)
    bank = nearest_neighbour.memory_bank(
        teacher.module, teacher.variables, images, 50, seed=4, batch_size=2
    )
    assert bank.shape == (50, DIM)
    chosen = np.sort(np.random.default_rng(4).choice(len(rows), 50, replace=False))
    np.testing.assert_allclose(bank, rows[chosen], rtol=1e-5, atol=1e-6)
    again = nearest_neighbour.memory_bank(
        teacher.module, teacher.variables, images, 50, seed=4, batch_size=3
    )
    np.testing.assert_allclose(again, bank, rtol=1e-5, atol=1e-6)
    everything = nearest_neighbour.memory_bank(teacher.module, teacher.variables, images, 10**6)
    assert everything.shape == rows.shape


def test_nearest_neighbour_maps_equal_brute_force(teacher):
    train, test = _images(0, 2), _images(1, 3)
    bank = nearest_neighbour.memory_bank(teacher.module, teacher.variables, train, 10**6)
    maps = nearest_neighbour.nearest_neighbour_maps(
        teacher.module, teacher.variables, test, bank, batch_size=2, chunk=100
    )
    dense = np.asarray(dense_apply(teacher.module, teacher.variables, jnp.asarray(test)))
    expected = knn.nearest_neighbour_distances(dense.reshape(-1, DIM), bank, chunk=64)
    np.testing.assert_allclose(maps, expected.reshape(3, SIZE, SIZE), rtol=1e-4, atol=1e-5)
    on_bank = nearest_neighbour.nearest_neighbour_maps(
        teacher.module, teacher.variables, train, bank
    )
    assert np.abs(on_bank).max() < 1e-3 * np.abs(maps).max()


def test_detection_figures_and_smoothing():
    masks = np.zeros((4, 8, 8), bool)
    masks[2, 2:5, 2:5] = masks[3, 5:, 5:] = True
    labels = np.array([0, 0, 1, 1])
    figures = probes.detection_figures(masks.astype(np.float32) + 0.1, masks, labels)
    assert figures == {"au_pro": 1.0, "pixel_auroc": 1.0, "image_auroc": 1.0}
    flipped = probes.detection_figures(-masks.astype(np.float32), masks, labels)
    assert flipped["pixel_auroc"] == 0.0
    constant = np.full((2, 9, 9), 3.0, np.float32)
    np.testing.assert_allclose(smooth_maps(constant, 2.0), constant, rtol=1e-6)


def test_descriptor_probe_finds_a_bright_square(teacher):
    # Near-uniform gray textures; the defects are bright squares: any descriptor that sees the
    # pixels at all separates them.
    rng = np.random.default_rng(0)
    train = 0.5 + 0.02 * rng.normal(size=(4, SIZE, SIZE, 3)).astype(np.float32)
    test = 0.5 + 0.02 * rng.normal(size=(4, SIZE, SIZE, 3)).astype(np.float32)
    masks = np.zeros((4, SIZE, SIZE), bool)
    masks[2, 3:7, 3:7] = masks[3, 9:13, 8:12] = True
    test[masks] = 1.0
    labels = np.array([0, 0, 1, 1])
    result = probes.descriptor_probe(teacher, train, test, masks, labels, bank_size=500, sigma=1)
    assert result["settings"]["bank_size"] == 500
    assert result["figures"]["raw"]["image_auroc"] == 1.0
    assert result["figures"]["raw"]["pixel_auroc"] > 0.9
    assert set(result["figures"]) == {"raw", "smoothed_sigma1"}
    assert result["seconds"]["total"] >= 0


def test_backbone_targets_see_exactly_the_teachers_window():
    module = patch_net(33, out_dim=4, widths=1 / 16)
    window = module.receptive_field
    assert window == 32
    crops = np.zeros((3, 33, 33, 3), np.float32)
    crops[:, :window, :window] = 0.25
    crops[:, window:, :] = crops[:, :, window:] = 1.0  # pixels T̂ never sees
    seen = []

    def features_fn(variables, images):
        seen.append(images.shape)
        return jnp.mean(images, axis=(1, 2))

    backbone = types.SimpleNamespace(variables={}, features_fn=features_fn)
    targets = distillation.backbone_targets(backbone, crops, window, 3, None)
    np.testing.assert_allclose(targets, 0.25, rtol=1e-6)
    assert seen[0][1:3] == (window, window)
    resized = distillation.backbone_targets(backbone, crops, window, 3, 64)
    assert seen[-1][1:3] == (64, 64)
    np.testing.assert_allclose(resized, 0.25, rtol=1e-5)


def test_distillation_figures():
    rng = np.random.default_rng(0)
    descriptors = rng.normal(size=(500, 6))
    descriptors[:, 5] = 2.0  # a dead dimension
    kernel, bias = rng.normal(size=(6, 10)), rng.normal(size=10)
    targets = descriptors @ kernel + bias
    fit = rng.normal(size=(400, 6))
    fit[:, 5] = 2.0
    figures = distillation.distillation_figures(
        descriptors,
        targets,
        decoder={"kernel": kernel, "bias": bias},
        fit_descriptors=fit,
        fit_targets=fit @ kernel + bias,
    )
    assert figures["r2_decoder"] == 1.0 and figures["unexplained"] == 0.0
    assert figures["r2_linear"] > 0.999
    assert figures["dead_dims"] == 1
    assert figures["mean_abs_offdiag_corr"] < 0.1  # independent normals
    mean_only = {"kernel": np.zeros((6, 10)), "bias": targets.mean(0)}
    assert (
        distillation.distillation_figures(descriptors, targets, decoder=mean_only)["r2_decoder"]
        == 0
    )
    assert distillation.distillation_figures(descriptors, targets)["r2_linear"] is None


def test_distill_probe_end_to_end_with_a_fake_backbone(teacher):
    photos = [_images(k, 1, size=40)[0] for k in range(3)]

    def features_fn(variables, images):
        return jnp.concatenate([jnp.mean(images, axis=(1, 2)), jnp.std(images, axis=(1, 2))], -1)

    backbone = types.SimpleNamespace(variables={}, features_fn=features_fn)
    result = distillation.distill_probe(teacher, backbone, photos, patches=100, seed=3)
    figures = result["figures"]
    assert figures["r2_decoder"] is None  # a random teacher has no decoder
    assert -1.0 < figures["r2_linear"] <= 1.0
    assert 0.0 <= figures["mean_abs_offdiag_corr"] <= 1.0
    assert result["settings"]["p_window"] == P and result["settings"]["photos"] == 3
