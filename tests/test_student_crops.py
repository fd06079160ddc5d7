"""Exact-context crops, learning-rate schedules and the evaluation hook of student training."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ustad.uninformed_students.train as students_lib
from ustad.uninformed_students.crops import (
    CropBatches,
    check_crop_size,
    crop_steps_per_epoch,
    sample_crops,
)
from ustad.uninformed_students.dense import crop_with_context, dense_apply, pad_images
from ustad.uninformed_students.nets import patch_net
from ustad.uninformed_students.steps import learning_rate_schedule, student_loss
from ustad.uninformed_students.train import train_students

KEY = functools.partial(jax.random.key, impl="rbg")


def _net(p, dim=8):
    net = patch_net(p, widths=1 / 16, out_dim=dim)
    return net, jax.jit(net.init)(KEY(p), jnp.zeros((1, p, p, 3)))


@pytest.mark.parametrize("p", [17, 33, 65])
@pytest.mark.parametrize("padding", ["reflect", "constant"])
def test_crop_with_its_margin_gives_the_full_images_descriptors(p, padding):
    net, variables = _net(p)
    size = 4 * net.stride if net.stride > 1 else 24  # larger than p's reflect margin
    size = max(size, 40 // net.stride * net.stride + net.stride)
    images = np.random.default_rng(p).uniform(size=(2, size, size, 3)).astype(np.float32)
    full = np.asarray(dense_apply(net, variables, jnp.asarray(images), padding=padding))
    padded = pad_images(images, net, padding)
    h, w = 2 * net.stride, 3 * net.stride
    # Corners, edges and unaligned offsets: the margin must come from the padded image there.
    for top, left in [(0, 0), (size - h, size - w), (5, 3), (1, size - w)]:
        crop = crop_with_context(padded, top, left, (h, w), net)
        assert crop.shape == (2, h + p - 1, w + p - 1, 3)
        out = np.asarray(dense_apply(net, variables, jnp.asarray(crop), padding="none"))
        np.testing.assert_allclose(out, full[:, top : top + h, left : left + w], atol=1e-5)


def test_crop_loss_is_the_full_image_loss_on_its_pixels():
    net, variables = _net(33)
    student, params = _net(33)
    del student
    images = np.random.default_rng(0).uniform(size=(1, 48, 48, 3)).astype(np.float32)
    targets = np.random.default_rng(1).normal(size=(1, 48, 48, 8)).astype(np.float32)
    full_pred = np.asarray(dense_apply(net, params, jnp.asarray(images)))
    top, left, c = 12, 20, 16
    crop = crop_with_context(pad_images(images, net), top, left, (c, c), net)
    loss = student_loss(
        net, params, jnp.asarray(crop), jnp.asarray(targets[:, top : top + c, left : left + c]),
        padding="none",
    )  # fmt: skip
    diff = full_pred[:, top : top + c, left : left + c] - targets[:, top : top + c, left : left + c]
    np.testing.assert_allclose(float(loss), np.mean(np.sum(diff**2, -1)), rtol=1e-5)


def test_prepadded_input_errors_name_the_margin_and_the_stride():
    net, variables = _net(33)
    with pytest.raises(ValueError, match="32-pixel margin"):
        dense_apply(net, variables, jnp.zeros((1, 30, 40, 3)), padding="none")
    with pytest.raises(ValueError, match=r"output size .* multiple of 4"):
        dense_apply(net, variables, jnp.zeros((1, 32 + 6, 32 + 8, 3)), padding="none")
    with pytest.raises(ValueError, match="'none'"):
        dense_apply(net, variables, jnp.zeros((1, 32, 32, 3)), padding="valid")


def test_crop_size_is_checked_against_stride_and_image():
    net, _ = _net(33)
    check_crop_size(16, (32, 32), net)
    with pytest.raises(ValueError, match="crop_size=6 must be a positive multiple of 4"):
        check_crop_size(6, (32, 32), net)
    with pytest.raises(ValueError, match="larger than the images"):
        check_crop_size(40, (32, 48), net)


def test_crops_are_a_function_of_seed_and_step_and_stay_inside():
    a = sample_crops(3, 7, 10, (64, 48), 16, 4)
    b = sample_crops(3, 7, 10, (64, 48), 16, 4)
    c = sample_crops(3, 8, 10, (64, 48), 16, 4)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any((x != y).any() for x, y in zip(a, c, strict=True))
    indices, tops, lefts = sample_crops(0, 0, 10, (64, 48), 16, 10)
    assert len(set(indices.tolist())) == 10  # distinct images while the batch allows
    assert tops.min() >= 0 and tops.max() <= 48 and lefts.max() <= 32
    # One epoch of crops sees as many output pixels as one pass over the images.
    assert crop_steps_per_epoch(10, (64, 48), 16, 4) == int(np.ceil(10 * 64 * 48 / (4 * 256)))


def test_crop_batches_hold_images_with_margin_and_matching_targets():
    net, variables = _net(17)
    images = np.random.default_rng(2).uniform(size=(5, 32, 32, 3)).astype(np.float32)
    targets = np.asarray(dense_apply(net, variables, jnp.asarray(images)))
    batches = CropBatches({"image": images, "target": targets}, net, "reflect", 8, 3, seed=1)
    batch = batches.batch(4)
    assert batch["image"].shape == (3, 8 + 16, 8 + 16, 3) and batch["target"].shape == (3, 8, 8, 8)
    out = np.asarray(dense_apply(net, variables, jnp.asarray(batch["image"]), padding="none"))
    np.testing.assert_allclose(out, batch["target"], atol=1e-5)


def test_learning_rate_schedules():
    assert learning_rate_schedule(1e-3) == 1e-3  # the paper's constant rate: a plain float
    warm = learning_rate_schedule(1e-3, "constant", warmup_steps=10)
    assert float(warm(0)) == 0 and float(warm(5)) == pytest.approx(5e-4, rel=1e-6)
    assert float(warm(50)) == pytest.approx(1e-3, rel=1e-6)
    cosine = learning_rate_schedule(1e-3, "cosine", warmup_steps=10, total_steps=110)
    assert float(cosine(10)) == pytest.approx(1e-3)
    assert float(cosine(60)) == pytest.approx(5e-4, rel=1e-3)
    assert float(cosine(110)) == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match="lr_schedule"):
        learning_rate_schedule(1e-3, "step")
    with pytest.raises(ValueError, match="total_steps"):
        learning_rate_schedule(1e-3, "cosine", warmup_steps=10, total_steps=10)


def _config(**overrides):
    from configs.students import get_config

    config = get_config("smoke")
    config.image_size = 32
    config.num_students = 2
    config.learning_rate, config.weight_decay = 1e-3, 1e-2
    config.epochs, config.batch_size, config.val_fraction = 2, 2, 0.25
    config.checkpoint_every_steps, config.log_every_steps = 1, 1
    config.num_devices, config.prng_impl = 1, "rbg"
    config.stats_batch_size = config.eval_batch_size = 8
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.fixture(scope="module")
def data():
    images = np.random.default_rng(5).uniform(size=(8, 32, 32, 3)).astype(np.float32)
    return images, _net(17)


def test_crop_training_resumes_exactly_and_calls_the_hook(data, tmp_path, monkeypatch):
    images, teacher = data
    config = _config(crop_size=16, lr_schedule="cosine", warmup_steps=2, target_cache="float32")
    calls = []
    whole = train_students(
        config,
        tmp_path / "whole",
        images,
        teacher=teacher,
        on_step=lambda step, state: calls.append((step, sorted(state))),
        on_step_every=5,
    )
    # 6 training images × 32² pixels / (2 crops × 16²) = 12 steps per epoch, 24 in all; the hook
    # runs after steps 5, 10, 15, 20 (not the last: the caller has the finished model then).
    assert [c[0] for c in calls] == [5, 10, 15, 20]
    # "best": each student's params of lowest validation loss so far (select="best_val").
    assert calls[0][1] == ["best", "students", "target_stats", "teacher"]

    original = students_lib._check_values

    def killed_at_step_7(losses, step):
        if step == 7:
            raise KeyboardInterrupt
        original(losses, step)

    monkeypatch.setattr(students_lib, "_check_values", killed_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train_students(config, tmp_path / "resumed", images, teacher=teacher)
    monkeypatch.setattr(students_lib, "_check_values", original)
    resumed = train_students(config, tmp_path / "resumed", images, teacher=teacher)
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(whole.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Crops and whole images are different runs: resuming one as the other is refused.
    with pytest.raises(ValueError, match="crop_size"):
        train_students(
            _config(target_cache="float32"), tmp_path / "resumed", images, teacher=teacher
        )


def test_scale_epochs_override_config_epochs_per_scale():
    from ustad.uninformed_students.schedule import scale_epochs

    config = _config(epochs=4)
    assert scale_epochs(config, 17) == 4
    config.scale_epochs = {"p17": 12, "p65": 3}
    assert (scale_epochs(config, 17), scale_epochs(config, 33), scale_epochs(config, 65)) == (
        12,
        4,
        3,
    )
    config.scale_epochs.p65 = 0
    with pytest.raises(ValueError, match="p=65 must be a positive integer"):
        scale_epochs(config, 65)


def test_train_steps_count_updates_per_scale():
    from ustad.uninformed_students.schedule import scale_epochs, scale_updates

    config = _config(epochs=4)
    config.train_steps = 100
    config.scale_train_steps = {"p33": 250}
    assert scale_updates(config, 17) == 100 and scale_updates(config, 33) == 250
    # The fewest whole epochs that reach the updates: a 54-image category at batch 2 (27 steps
    # an epoch) trains as many updates as a 200-image one (100 steps an epoch).
    assert scale_epochs(config, 17, steps_per_epoch=27) == 4
    assert scale_epochs(config, 17, steps_per_epoch=100) == 1
    assert scale_epochs(config, 33, steps_per_epoch=27) == 10
    with pytest.raises(ValueError, match="steps_per_epoch is needed"):
        scale_epochs(config, 17)
    config.train_steps = -5
    with pytest.raises(ValueError, match="p=17 must be an integer ≥ 0"):
        scale_updates(config, 17)
