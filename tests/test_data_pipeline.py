"""Deterministic batching, sharded placement on 4 fake CPU devices, and patch sampling."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from ustad.data.pipeline import (
    PatchSampler,
    epoch_permutation,
    iterate_batches,
    num_batches,
    sample_patches,
)


def _data(n=10):
    return {"image": np.arange(n * 2 * 2, dtype=np.float32).reshape(n, 2, 2, 1), "id": np.arange(n)}


def test_order_depends_only_on_seed_and_epoch():
    first = [b["id"] for b in iterate_batches(_data(), 3, seed=1, epoch=2)]
    again = [b["id"] for b in iterate_batches(_data(), 3, seed=1, epoch=2)]
    other = [b["id"] for b in iterate_batches(_data(), 3, seed=1, epoch=3)]
    assert len(first) == 3 and all(len(ids) == 3 for ids in first)
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
    assert not np.array_equal(np.concatenate(first), np.concatenate(other))
    np.testing.assert_array_equal(np.concatenate(first), epoch_permutation(10, 1, 2)[:9])


def test_resume_mid_epoch_and_leaves_stay_aligned():
    full = list(iterate_batches(_data(), 4, seed=0, epoch=5, drop_remainder=False))
    resumed = list(
        iterate_batches(_data(), 4, seed=0, epoch=5, drop_remainder=False, start_batch=1)
    )
    assert [len(b["id"]) for b in full] == [4, 4, 2]
    for a, b in zip(full[1:], resumed, strict=True):
        np.testing.assert_array_equal(a["id"], b["id"])
    for batch in full:
        np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], batch["id"] * 4)
    assert num_batches(10, 4) == 2 and num_batches(10, 4, drop_remainder=False) == 3


def test_no_shuffle_and_plain_array():
    batches = list(iterate_batches(np.arange(7), 2, shuffle=False))
    np.testing.assert_array_equal(np.concatenate(batches), np.arange(6))


def test_mismatched_leading_dimension():
    with pytest.raises(ValueError, match="leading dimension"):
        list(iterate_batches({"a": np.zeros(3), "b": np.zeros(4)}, 2))


def test_batches_land_sharded_over_data_axis():
    assert jax.device_count() == 4
    mesh = jax.make_mesh((4,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    data = _data(16)
    batches = list(iterate_batches(data, 8, seed=3, epoch=0, sharding=sharding))
    reference = list(iterate_batches(data, 8, seed=3, epoch=0))
    assert len(batches) == 2
    for batch, expected in zip(batches, reference, strict=True):
        image = batch["image"]
        assert isinstance(image, jax.Array) and image.sharding == sharding
        assert len(image.addressable_shards) == 4
        assert {s.data.shape for s in image.addressable_shards} == {(2, 2, 2, 1)}
        assert {s.device for s in image.addressable_shards} == set(jax.devices())
        np.testing.assert_array_equal(np.asarray(image), expected["image"])
        np.testing.assert_array_equal(np.asarray(batch["id"]), expected["id"])


def test_sharding_over_two_axes_and_divisibility_errors():
    mesh = jax.make_mesh((2, 2), ("data", "model"))
    two_way = NamedSharding(mesh, P("data"))
    batch = next(iterate_batches(_data(6), 2, sharding=two_way))
    assert {s.data.shape[0] for s in batch["id"].addressable_shards} == {1}
    with pytest.raises(ValueError, match="not divisible"):
        next(iterate_batches(_data(6), 3, sharding=two_way))
    four_way = NamedSharding(mesh, P(("data", "model")))
    with pytest.raises(ValueError, match="drop_remainder"):
        next(iterate_batches(_data(10), 4, drop_remainder=False, sharding=four_way))


def _images():
    rng = np.random.default_rng(0)
    return [rng.random((h, w, 3), dtype=np.float32) for h, w in ((20, 30), (9, 9), (40, 12))]


def test_patch_sampler_shapes_and_determinism():
    sampler = PatchSampler(_images(), 9)
    key = jax.random.key(0)
    a = sampler.sample(jax.random.fold_in(key, 7), 16)
    b = sampler.sample(jax.random.fold_in(key, 7), 16)
    c = sampler.sample(jax.random.fold_in(key, 8), 16)
    assert a.shape == (16, 9, 9, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(sampler.sample(3, 4), sample_patches(_images(), 9, 4, 3))
    assert sampler.sample(jax.random.PRNGKey(1), 2).shape == (2, 9, 9, 3)
    assert sampler.sample(np.random.default_rng(0), 2, patch_size=5).shape == (2, 5, 5, 3)


def test_patches_are_real_crops_uniform_over_positions():
    images = _images()
    patches = PatchSampler(images, 9).sample(0, 400)
    # Each patch is a crop of some image.
    for patch in patches[:20]:
        found = any(
            np.array_equal(img[t : t + 9, l : l + 9], patch)
            for img in images
            for t in range(img.shape[0] - 8)
            for l in range(img.shape[1] - 8)  # noqa: E741
        )
        assert found
    # The 9x9 image has one position of 12*22 + 1 + 32*4 = 393: about 1 patch in 400.
    from_small = sum(np.array_equal(p, images[1]) for p in patches)
    assert from_small <= 5


def test_patch_sampler_errors_and_files(tmp_path):
    with pytest.raises(ValueError, match="image 1"):
        PatchSampler(_images(), 10)
    for i, image in enumerate(_images()):
        Image.fromarray((image * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
    sampler = PatchSampler.from_files(str(tmp_path / "*.png"), 8, grayscale=True)
    assert sampler.sample(0, 3).shape == (3, 8, 8, 1)
    resized = PatchSampler.from_files(tmp_path, 8, image_size=16)
    assert resized.sample(0, 2).shape == (2, 8, 8, 3)
    with pytest.raises(FileNotFoundError):
        PatchSampler.from_files(str(tmp_path / "*.jpg"), 8)
