"""Teacher pretraining: patch sources and triplets, the train step, the trainer end to end."""

import functools
import importlib.util
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ustad.data.images import write_png
from ustad.models.pretrained import Backbone
from ustad.uninformed_students.nets import patch_net
from ustad.uninformed_students.teacher import patches, sources
from ustad.uninformed_students.teacher import train as teacher


def _load_configs():
    path = Path(__file__).parents[1] / "configs" / "teacher.py"
    spec = importlib.util.spec_from_file_location("teacher_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


teacher_configs = _load_configs()


# ---------------------------------------------------------------------------------------------
# A tiny stand-in for P: random, 3-channel, 8-d pooled features.


class TinyP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2))(x))
        return jnp.mean(x, axis=(1, 2))


_TINY_P = TinyP()


def _tiny_features(variables, images):
    return _TINY_P.apply(variables, images)


def _tiny_backbone(poison=False):
    variables = _TINY_P.init(jax.random.key(7), jnp.zeros((1, 17, 17, 3)))
    if poison:
        variables = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), variables)
    return Backbone(_TINY_P, variables, _tiny_features, 8)


def _images(count=4, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(40, 48), (36, 60), (52, 40), (44, 44)]
    # Smooth random images (cumulative sums), so neighbouring patches resemble each other.
    out = []
    for i in range(count):
        noise = rng.normal(size=(*sizes[i % 4], 3)).cumsum(0).cumsum(1)
        noise -= noise.min()
        out.append((noise / noise.max()).astype(np.float32))
    return out


def _key(seed):
    return jax.random.key(seed, impl="rbg")  # compiles faster than threefry on CPU


def _config(**overrides):
    config = teacher_configs.get_config("smoke")
    config.backbone = "tiny"
    config.batch_size = 8
    config.num_steps = 20
    config.learning_rate = 1e-3
    config.lambda_m = 0.0
    config.log_every_steps = 1
    config.checkpoint_every_steps = 10
    config.prng_impl = "rbg"  # compiles in a fraction of threefry's time on CPU
    for name, value in overrides.items():
        config[name] = value
    return config


# ---------------------------------------------------------------------------------------------
# Patch sources and sampling.


def test_context_sampler_is_deterministic_and_crops_the_images():
    image = (np.arange(30 * 40 * 3) % 251).reshape(30, 40, 3).astype(np.uint8)
    with patches.ContextSampler([image], 9, jax.random.key(0)) as sampler:
        first = sampler.sample(3, 16)
        assert first.shape == (16, 9, 9, 3) and first.dtype == np.float32
        np.testing.assert_array_equal(first, sampler.sample(3, 16))
        assert not np.array_equal(first, sampler.sample(4, 16))
    # Every crop is a window of the image.
    scaled = image.astype(np.float32) / 255.0
    for crop in first:
        hits = [
            (y, x)
            for y in range(30 - 8)
            for x in range(40 - 8)
            if np.array_equal(scaled[y : y + 9, x : x + 9], crop)
        ]
        assert hits


def test_context_sampler_pools_are_seeded_and_prefetched():
    loads = []

    def load(i):
        loads.append(i)
        return np.full((12, 12, 1), i, np.uint8)

    source = sources.LazyImages(50, load)
    sampler = patches.ContextSampler(source, 5, jax.random.key(1), pool_size=4, steps_per_pool=2)
    with sampler:
        members = sampler.pool_members(3)
        assert len(set(members.tolist())) == 4
        np.testing.assert_array_equal(members, sampler.pool_members(3))
        assert sampler.pool_index(7) == 3
        crops = sampler.sample(7, 8)  # pool 3, and pool 4 starts loading
        assert set(np.unique(np.rint(crops * 255)).tolist()) <= set(members.tolist())
        assert 4 in sampler._pools
    # A second sampler resumed at step 7 draws the same crops.
    with patches.ContextSampler(
        source, 5, jax.random.key(1), pool_size=4, steps_per_pool=2
    ) as again:
        np.testing.assert_array_equal(again.sample(7, 8), crops)


def test_sources_folder_tfds_and_conversions(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for i in range(3):
        write_png(tmp_path / f"{i}.png", rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    files = sources.image_files(str(tmp_path / "*.png"))
    assert len(files) == 3 and files[1].shape == (20, 24, 3)

    import tensorflow_datasets as tfds

    fake = [{"image": np.full((30, 30, 3), i, np.uint8), "label": i} for i in range(5)]
    monkeypatch.setattr(tfds, "data_source", lambda name, **kwargs: fake)
    source = sources.tfds_images("imagenette")
    assert len(source) == 5 and source[-1][0, 0, 0] == 4

    # Gray, bool and float images of any size; a too-small image is enlarged to one crop.
    mixed = [
        np.zeros((10, 30), np.uint8),
        np.ones((30, 12, 1), bool),
        np.full((40, 40, 4), 0.5, np.float64),
    ]
    with patches.ContextSampler(mixed, 15, jax.random.key(2)) as sampler:
        assert sampler.sample(0, 6).shape == (6, 15, 15, 3)
    # crop_size > p: images shrink by p / crop_size when they enter the pool.
    with patches.ContextSampler(
        [np.zeros((64, 80, 3), np.uint8)], 8, jax.random.key(0), scale=0.5
    ) as sampler:
        assert sampler.pool(0)[0][0].shape == (32, 40, 3)


def test_photo_folder_split_is_fixed_and_disjoint(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(40):
        sub = tmp_path / f"pkg{i % 3}"
        sub.mkdir(exist_ok=True)
        write_png(sub / f"{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    (tmp_path / "MANIFEST.tsv").write_text("not an image")
    train = sources.photo_folder(tmp_path, split="train", holdout_fraction=0.25)
    holdout = sources.photo_folder(tmp_path, split="holdout", holdout_fraction=0.25)
    every = sources.photo_folder(tmp_path, split="all")
    assert len(every) == 40 and len(train) + len(holdout) == 40
    assert not set(train.names) & set(holdout.names) and 3 <= len(holdout) <= 17
    # The split depends on each file's own path only: new files never move old ones.
    write_png(tmp_path / "pkg0" / "new.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    again = sources.photo_folder(tmp_path, split="holdout", holdout_fraction=0.25)
    assert set(holdout.names) <= set(again.names)
    assert train[0].shape == (8, 8, 3) and train[0].dtype == np.float32
    with pytest.raises(FileNotFoundError, match="missing"):
        sources.photo_folder(tmp_path / "missing")


def test_context_sampler_levels_flips_and_jitter():
    image = (np.arange(64 * 96 * 3) % 251).reshape(64, 96, 3).astype(np.uint8)
    small = np.zeros((20, 20, 3), np.uint8)  # too small for the 0.25 level: kept at 1 and 0.5
    with patches.ContextSampler(
        [image, small], 9, jax.random.key(0), levels=(1.0, 0.5, 0.25)
    ) as sampler:
        pyramids = sampler.pool(0)
        assert [x.shape for x in pyramids[0]] == [(64, 96, 3), (32, 48, 3), (16, 24, 3)]
        assert [x.shape for x in pyramids[1]] == [(20, 20, 3), (10, 10, 3)]
        crops = sampler.sample(0, 512)
    # Each crop is a window of one level; every level is drawn.
    levels_hit = set()
    for crop in crops[:64]:
        for k, level in enumerate(pyramids[0] + pyramids[1]):
            level = level.astype(np.float32) / 255.0
            h, w = level.shape[:2]
            if any(
                np.array_equal(level[y : y + 9, x : x + 9], crop)
                for y in range(h - 8)
                for x in range(w - 8)
            ):
                levels_hit.add(k)
                break
        else:
            raise AssertionError("a crop is not a window of any level")
    assert len(levels_hit) >= 3

    # Flips mirror crops (same positions: the flip is drawn after them); jitter stays in range
    # and is deterministic.
    plain = patches.ContextSampler([image], 9, jax.random.key(1)).sample(5, 64)
    flipped = patches.ContextSampler([image], 9, jax.random.key(1), flip=True).sample(5, 64)
    mirrored = [
        np.array_equal(f, p[:, ::-1]) and not np.array_equal(f, p)
        for f, p in zip(flipped, plain, strict=True)
    ]
    unchanged = [np.array_equal(f, p) for f, p in zip(flipped, plain, strict=True)]
    assert all(m or u for m, u in zip(mirrored, unchanged, strict=True))
    assert 16 < sum(mirrored) < 48
    jitter = patches.ContextSampler([image], 9, jax.random.key(1), color_jitter=0.2)
    jittered = jitter.sample(5, 64)
    np.testing.assert_array_equal(jittered, jitter.sample(5, 64))
    assert jittered.min() >= 0 and jittered.max() <= 1 and not np.allclose(jittered, plain)
    ratio = jittered.mean(axis=(1, 2, 3)) / np.maximum(plain.mean(axis=(1, 2, 3)), 1e-6)
    assert np.all((ratio > 0.6) & (ratio < 1.45))
    with pytest.raises(ValueError, match="levels"):
        patches.ContextSampler([image], 9, jax.random.key(1), levels=(2.0,))


def test_perturb_identity_and_statistics():
    contexts = jnp.asarray(
        np.random.default_rng(3).random((4, 17 + 2 * 3, 17 + 2 * 3, 3)), jnp.float32
    )
    anchors = patches.center_crop(contexts, 17)
    same = patches.perturb(_key(0), contexts, 17, max_shift=0.0, zoom=0.0, noise_std=0.0)
    np.testing.assert_allclose(same, anchors, atol=1e-6)

    smooth = jnp.asarray(_images(1)[0][None, :23, :23], jnp.float32)
    margin = patches.perturbation_margin(17, 2.0, 0.1)
    assert margin == 3
    positive = patches.perturb(_key(1), smooth, 17, noise_std=0.01)
    again = patches.perturb(_key(1), smooth, 17, noise_std=0.01)
    np.testing.assert_array_equal(positive, again)
    anchor = patches.center_crop(smooth, 17)
    other = jnp.asarray(_images(2)[1][None, 10:27, 20:37])
    difference = float(jnp.mean(jnp.abs(positive - anchor)))
    assert 1e-3 < difference < 0.5 * float(jnp.mean(jnp.abs(other - anchor)))
    assert float(positive.min()) >= 0.0 and float(positive.max()) <= 1.0
    with pytest.raises(ValueError, match="cannot hold"):
        patches.perturb(_key(0), contexts[:, :19, :19], 17, max_shift=2.0)
    gray = patches.to_gray(contexts)
    np.testing.assert_allclose(gray[..., 0], contexts @ jnp.array([0.299, 0.587, 0.114]), rtol=1e-6)


def test_train_apply_equals_module_apply_values_and_gradients():
    rng = np.random.default_rng(0)
    nets = {p: teacher.patch_net(p, widths=1 / 16, out_dim=8) for p in (17, 33, 65)}
    variables = {
        p: net.init(_key(p), jnp.zeros((1, p, p, 3)), mode="patch") for p, net in nets.items()
    }
    inputs = {p: jnp.asarray(rng.random((3, p, p, 3)), jnp.float32) for p in nets}

    def loss(apply, v, x):
        return jnp.sum(jnp.sin(apply(v, x)))

    @jax.jit
    def both(variables, inputs):
        out = {}
        for p, net in nets.items():
            fast = functools.partial(teacher.train_apply, net)
            out[p] = (fast(variables[p], inputs[p]), net.apply(variables[p], inputs[p]))
        net = nets[33]
        fast = functools.partial(teacher.train_apply, net)
        grads = [jax.grad(loss, argnums=1)(f, variables[33], inputs[33]) for f in (fast, net.apply)]
        return out, grads

    out, (fast_grads, flax_grads) = both(variables, inputs)
    for fast, reference in out.values():
        np.testing.assert_allclose(fast, reference, rtol=1e-5, atol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), fast_grads, flax_grads
    )
    with pytest.raises(ValueError, match="patches"):
        teacher.train_apply(nets[17], variables[17], inputs[33])


def test_mean_features_is_the_mean_of_p_over_batches():
    backbone = _tiny_backbone()
    crops = np.random.default_rng(1).random((10, 17, 17, 3)).astype(np.float32)
    mean = teacher.mean_features(_tiny_features, backbone.variables, crops, batch_size=4)
    expected = np.mean(_tiny_features(backbone.variables, crops), axis=0)
    np.testing.assert_allclose(mean, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("p", [17, 33, 65])
def test_p_sees_exactly_the_window_that_reaches_the_teacher(p):
    """Changing every pixel outside teacher_window leaves T̂'s output as it is; changing the
    window's last row or column alone changes it."""
    module = patch_net(p, out_dim=4, widths=1 / 32)
    variables = module.init(_key(0), jnp.zeros((1, p, p, 3)))
    rng = np.random.default_rng(p)
    patch = rng.random((1, p, p, 3)).astype(np.float32)
    side = teacher.teacher_window(jnp.asarray(patch), module).shape[1]
    assert side == {17: 17, 33: 32, 65: 60}[p]
    apply = jax.jit(module.apply)
    base = np.asarray(apply(variables, patch))
    outside = rng.random(patch.shape).astype(np.float32)
    outside[:, :side, :side] = patch[:, :side, :side]
    np.testing.assert_array_equal(np.asarray(apply(variables, outside)), base)
    for edge in (np.s_[:, side - 1, :side], np.s_[:, :side, side - 1]):
        changed = patch.copy()
        changed[edge] = 1.0 - changed[edge]
        assert not np.allclose(np.asarray(apply(variables, changed)), base)


def test_training_shows_p_the_teacher_window(tmp_path):
    seen = []

    def features(variables, images):
        seen.append(images.shape)  # at trace time
        return _tiny_features(variables, images)

    backbone = Backbone(_TINY_P, _tiny_backbone().variables, features, 8)
    config = _config(num_steps=2, checkpoint_every_steps=0)
    config.patch_size = 33
    _, _, meta = _train(tmp_path, config, backbone=backbone)
    assert seen and all(shape[1:3] == (32, 32) for shape in seen)
    assert meta["backbone_window"] == 32 and "32×32 window" in meta["backbone_input"]


# ---------------------------------------------------------------------------------------------
# The trainer.


def _train(workdir, config=None, **kwargs):
    kwargs.setdefault("images", _images())
    kwargs.setdefault("backbone", _tiny_backbone())
    return teacher.train_and_evaluate(config or _config(), workdir, **kwargs)


def _losses(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def test_smoke_run_lowers_loss_and_resume_is_exact(tmp_path, monkeypatch):
    compiles = []

    def count(event, *args, **kwargs):
        if "backend_compile" in event:
            compiles.append(event)

    # Uninterrupted 20 steps; count XLA compilations after each step (from the first on).
    per_step = []
    check = teacher._check
    monkeypatch.setattr(
        teacher, "_check", lambda step, m: (per_step.append(len(compiles)), check(step, m))
    )
    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        module, full, meta = _train(tmp_path / "full")
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert len(per_step) == 20 and len(set(per_step)) == 1, "the step recompiled"
    # The total loss: over the first steps the (signed) compactness term dominates it, and the
    # distillation term may rise before it falls.
    losses = _losses(tmp_path / "full")
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 1.0

    # Killed after step 14 (checkpoint at 10), then restarted with the same command.
    def killed(step, metrics):
        if step == 14:
            raise KeyboardInterrupt
        check(step, metrics)

    monkeypatch.setattr(teacher, "_check", killed)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "resumed")
    with pytest.raises(ValueError, match="stopped at step 10 of 20"):
        teacher.load_teacher(tmp_path / "resumed")
    assert teacher.load_teacher(tmp_path / "resumed", allow_unfinished=True)[2]["step"] == 10
    monkeypatch.setattr(teacher, "_check", check)
    _, resumed, _ = _train(tmp_path / "resumed")
    jax.tree.map(np.testing.assert_array_equal, resumed, full)

    # What the students trainer loads.
    loaded, variables, loaded_meta = teacher.load_teacher(tmp_path / "full")
    assert (loaded.layers, loaded.patch_size, loaded.out_dim) == (
        module.layers,
        module.patch_size,
        module.out_dim,
    )
    jax.tree.map(np.testing.assert_array_equal, variables, full)
    for name in ("patch_size", "out_dim", "layers", "channels", "backbone", "backbone_input"):
        assert loaded_meta[name] == json.loads(json.dumps(meta[name]))
    assert loaded_meta["backbone_input"] == "T̂'s native 17×17 window"
    patch = jnp.asarray(_images(1)[0][None, :17, :17])
    np.testing.assert_allclose(loaded.apply(variables, patch), module.apply(full, patch))
    # P is not trained: only T̂ and D have parameters and optimizer state.
    with teacher.Checkpointer(tmp_path / "full" / teacher.CHECKPOINT_SUBDIR) as checkpointer:
        _, state, _ = checkpointer.restore_latest()
    assert set(state["params"]) == {"teacher", "decoder"}


def test_non_finite_loss_names_the_step(tmp_path):
    _train(tmp_path, _config(num_steps=3, checkpoint_every_steps=0))
    with pytest.raises(FloatingPointError, match="at step 3"):
        _train(tmp_path, _config(num_steps=6), backbone=_tiny_backbone(poison=True))


def test_resume_refuses_a_different_teacher(tmp_path):
    _train(tmp_path, _config(num_steps=2))
    with pytest.raises(ValueError, match="channels"):
        _train(tmp_path, _config(num_steps=4, channels=1))


def test_smoke_config_runs_on_the_natural_photos_gray_with_resized_p_input(tmp_path):
    # The smoke config (triplets on) as a grayscale teacher whose P sees 24×24 resized patches.
    config = teacher_configs.get_config("smoke")
    config.num_steps = 3
    config.prng_impl = "rbg"
    config.channels = 1
    config.backbone_input_size = 24
    module, variables, meta = teacher.train_and_evaluate(
        config, tmp_path, backbone=_tiny_backbone()
    )
    assert meta["step"] == 3 and meta["source"].startswith("natural photos")
    assert module.patch_size == 17
    # T̂ sees one channel; the tiny P (a 3-channel conv) must have seen three.
    assert variables["params"]["conv1"]["kernel"].shape[2] == 1
    assert meta["backbone_input"] == (
        "T̂'s 17×17 window resized to 24×24 (bilinear, antialiased); grayscale repeated to 3 "
        "channels"
    )
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert config.lambda_m > 0 and all(r["triplet"] > 0 for r in records)
    assert {"loss", "distillation", "compactness", "steps_per_s", "patches_per_s"} <= set(
        records[-1]
    )
    for name in ("p17", "p33", "p65"):
        assert teacher_configs.get_config(name).patch_size == int(name[1:])
    with pytest.raises(ValueError, match="unknown config"):
        teacher_configs.get_config("p99")
