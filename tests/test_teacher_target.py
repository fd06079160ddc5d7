"""Teacher target options (issue 23): P's stages as the target, standardised with statistics
stored in the teacher; P's input scale; D's initialisation; per-loss gradient norms in the
metrics; the dead-target check."""

import json
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ustad.models.pretrained import Backbone
from ustad.uninformed_students import probes
from ustad.uninformed_students.config import teacher_config
from ustad.uninformed_students.nets import patch_net
from ustad.uninformed_students.teacher import (
    catalog,
    decoder_init,
    files,
    run_setup,
    shipping,
    targets,
)
from ustad.uninformed_students.teacher import train as teacher
from ustad.uninformed_students.teacher.steps import make_init, make_optimizer, make_train_step


class StagedP(nn.Module):
    """A tiny P with stages: stage1 [N, h/2, w/2, 4], stage2 [N, h/4, w/4, 6]; the pooled
    "head" is 8-d, of which ``dead`` dimensions are exactly 0 (ReLU of a very negative bias)."""

    dead: int = 0

    @nn.compact
    def __call__(self, x, return_maps=False):
        stage1 = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2))(x))
        stage2 = nn.tanh(nn.Conv(6, (3, 3), strides=(2, 2))(stage1))
        head = nn.Dense(8)(stage2)
        head = nn.relu(head - jnp.where(jnp.arange(8) < self.dead, 1e6, 0.0))
        pooled = jnp.mean(head, axis=(1, 2))
        if return_maps:
            return {"stage1": stage1, "stage2": stage2, "pooled": pooled}
        return pooled


def _backbone(dead=0, seen=None):
    module = StagedP(dead)
    variables = module.init(jax.random.key(3), jnp.zeros((1, 17, 17, 3)))

    def features(variables, images):
        if seen is not None:
            seen.append(images.shape)
        return module.apply(variables, images)

    return Backbone(module, variables, features, 8)


def _images(count=4, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        noise = rng.normal(size=(40 + 4 * i, 48, 3)).cumsum(0).cumsum(1)
        noise -= noise.min()
        out.append((noise / noise.max()).astype(np.float32))
    return out


def _config(**overrides):
    config = teacher_config("smoke")
    config.backbone = "staged"
    config.batch_size = 8
    config.num_steps = 4
    config.learning_rate = 1e-3
    config.lambda_m = 0.0
    config.log_every_steps = 2
    config.checkpoint_every_steps = 0
    config.target_sample_crops = 64
    config.loader_workers = 1
    config.prng_impl = "rbg"
    for name, value in overrides.items():
        config[name] = value
    return config


def _train(workdir, config, backbone=None):
    return teacher.train_and_evaluate(
        config, workdir, images=_images(), backbone=backbone or _backbone()
    )


def test_stage_target_is_standardised_with_statistics_stored_in_the_teacher_file(tmp_path):
    config = _config(target_stages=(2, 1), target_standardize=True, init_decoder="lstsq")
    config.num_steps = 3
    _, _, meta = _train(tmp_path / "run", config)
    # Per-loss gradient norms, logged after steps 2 and 3 (every 2, and the last).
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 3]
    for line in lines:
        assert line["grad_norm_distillation"] > 0 and line["grad_norm_compactness"] > 0
        assert line["grad_norm_triplet"] == 0  # λ_m = 0
        ratio = line["grad_norm_compactness"] / line["grad_norm_distillation"]
        assert line["grad_ratio_c_k"] == pytest.approx(ratio, rel=1e-5)
    target = meta["target"]
    # Stages in the order asked: stage2's 6 channels, then stage1's 4.
    assert target["stages"] == [2, 1] and target["standardize"] and target["dim"] == 10
    assert meta["feature_dim"] == 10 and target["samples"] == 64
    assert len(target["mean"]) == len(target["std"]) == 10 and target["dead_dims"] == 0
    assert "stage2+stage1 standardised" in meta["backbone_input"]

    # The stored statistics are those of the target on the fixed sample: recompute them.
    spec = targets.TargetSpec.from_record(target)
    backbone = _backbone()
    key = jax.random.key(0, impl="rbg")
    with run_setup.sampler(config, _images(), jax.random.fold_in(key, 1)) as sampler:
        crops = sampler.sample(0, 64, key=jax.random.fold_in(key, 4))
    assert crops.shape == (64, 17, 17, 3)  # no triplets: no margin, the crop is the window
    raw = targets.raw_features(backbone, spec, crops)
    np.testing.assert_allclose(target["mean"], raw.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(target["std"], raw.std(0), rtol=1e-4, atol=1e-6)
    # Standardised through target_fn: mean 0, std 1 per dimension on that sample.
    standardised = np.asarray(
        targets.target_fn(backbone, spec)(
            targets.target_variables(backbone.variables, spec, target),
            jnp.asarray(crops),
        )
    )
    np.testing.assert_allclose(standardised.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(standardised.std(0), 1, atol=1e-3)

    # Exported, the teacher file carries the target; its decoder predicts 10 dimensions.
    path = tmp_path / "t.teacher.npz"
    catalog.export_teacher(tmp_path / "run", path)
    _, _, header = files.read_teacher_file(path)
    assert header["target"]["mean"] == target["mean"] and header["feature_dim"] == 10
    assert files.read_decoder(path)["kernel"].shape == (16, 10)
    recipe = shipping.recipe(header)
    assert (recipe["target"], recipe["target_dim"], recipe["init_decoder"]) == (
        "stage2+stage1 standardised",
        10,
        "lstsq",
    )
    probe_teacher = probes.load_probe_teacher(path)
    assert probe_teacher.target["stages"] == [2, 1]
    assert probe_teacher.description["target"]["name"] == "stage2+stage1 standardised"

    # Resuming with another target is refused, naming the target.
    with pytest.raises(ValueError, match="target stage2\\+stage1 standardised"):
        _train(tmp_path / "run", _config(num_steps=6, target_stages=(2,)))


def test_p_input_scale_resizes_the_window_by_a_factor(tmp_path):
    assert run_setup.backbone_input_size(_config(backbone_input_scale=2.0), 17) == 34
    assert run_setup.backbone_input_size(_config(backbone_input_scale=1.0), 17) is None
    assert run_setup.backbone_input_size(_config(), 17) is None
    with pytest.raises(ValueError, match="backbone_input_scale=2.0 and --config.backbone_input"):
        _train(tmp_path / "both", _config(backbone_input_scale=2.0, backbone_input_size=24))
    seen = []
    config = _config(backbone_input_scale=2.0, num_steps=2, init_decoder="random")
    _, _, meta = _train(tmp_path / "run", config, _backbone(seen=seen))
    assert meta["backbone_input_size"] == 34
    assert meta["backbone_input"].startswith("T̂'s 17×17 window resized to 34×34")
    assert seen and all(shape[1:3] == (34, 34) for shape in seen)


def test_least_squares_decoder_is_exact_on_a_linear_target():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    kernel, bias = rng.normal(size=(5, 7)), rng.normal(size=7)
    fit_kernel, fit_bias = decoder_init.least_squares_decoder(x, x @ kernel + bias, ridge=0.0)
    np.testing.assert_allclose(fit_kernel, kernel, atol=1e-9)
    np.testing.assert_allclose(fit_bias, bias, atol=1e-9)


@pytest.mark.parametrize("init", ["lstsq", "random", "mean"])
def test_decoder_initialisations(tmp_path, init):
    config = _config(init_decoder=init, num_steps=1, target_stages=(2,))
    config.target_standardize = True
    _train(tmp_path, config)
    kernel = np.asarray(catalog.load_decoder(tmp_path)["kernel"])
    assert kernel.shape == (16, 6)
    if init == "mean":
        # The old initialisation: a zero kernel, trained for one step (Adam moves it ~lr).
        assert np.abs(kernel).max() < 2e-3
    else:
        assert np.abs(kernel).max() > 1e-2
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["distillation"] > 0


def test_least_squares_init_starts_below_the_mean_init():
    """On other crops than those it was fitted on, the least-squares read-out of the initial
    T̂ explains part of the standardised target; the constant predictor explains none of it."""
    config = _config(init_decoder="lstsq", target_stages=(1, 2), target_standardize=True)
    module = patch_net(17, out_dim=16, widths=1 / 16)
    backbone = _backbone()
    spec = run_setup.target_spec(config)
    key = jax.random.key(0, impl="rbg")
    with run_setup.sampler(config, _images(), jax.random.fold_in(key, 1)) as sampler:
        target = run_setup.measure_target(config, sampler, key, module, backbone, spec, None)
        fit, held_out = sampler.sample(0, 256), sampler.sample(1, 256)
    target_fn = targets.target_fn(backbone, spec)
    variables = targets.target_variables(backbone.variables, spec, target)
    tx = make_optimizer(1e-3)
    state = make_init(module, nn.Dense(10), tx, 3)(key)
    losses = {}
    # Jitted: one compilation instead of op-by-op dispatch of T̂ on the 256 held-out crops.
    descriptors = jax.jit(module.apply)(state["params"]["teacher"], held_out)
    for name, init in (
        ("mean", decoder_init.decoder_at_mean),
        ("lstsq", decoder_init.decoder_least_squares),
    ):
        decoder = init(config, state, module, target_fn, variables, fit, None)["params"]["decoder"]
        decoded = nn.Dense(10).apply(decoder, descriptors)
        expected = target_fn(variables, jnp.asarray(held_out))
        losses[name] = float(jnp.mean(jnp.sum((decoded - expected) ** 2, -1)))
        if name == "mean":
            assert not np.any(decoder["params"]["kernel"])
    assert losses["lstsq"] < 0.9 * losses["mean"]


def test_gradient_norms_per_loss_are_exact():
    # The step's norm is the norm of the weighted term's gradient w.r.t. T̂, computed directly.
    module = patch_net(17, out_dim=8, widths=1 / 16)
    decoder = nn.Dense(8)
    tx = make_optimizer(1e-3)
    backbone = _backbone()
    key = jax.random.key(0, impl="rbg")
    step = make_train_step(
        module, decoder, backbone.features_fn, tx, loss_weights=(2.0, 0.0, 0.5),
        grad_norm_steps=(2, 100), fast_apply=False,
    )  # fmt: skip
    contexts = jnp.asarray(np.stack([x[:17, :17] for x in _images(4)] * 2))
    state = make_init(module, decoder, tx, 3)(key)
    params = jax.tree.map(jnp.copy, state["params"])

    def term(teacher_params, name):
        descriptors = module.apply(teacher_params, contexts)
        if name == "compactness":
            from ustad.uninformed_students.teacher.losses import compactness_loss

            return 0.5 * compactness_loss(descriptors)
        decoded = decoder.apply(params["decoder"], descriptors)
        target = backbone.features_fn(backbone.variables, contexts)
        return 2.0 * jnp.mean(jnp.sum((decoded - target) ** 2, -1))

    _, skipped = step(state, backbone.variables, contexts, key, 0)  # step 1: not due
    assert float(skipped["grad_norm_distillation"]) == 0
    state = make_init(module, decoder, tx, 3)(key)
    _, metrics = step(state, backbone.variables, contexts, key, 1)  # step 2: due
    for name in ("distillation", "compactness"):
        leaves = jax.tree.leaves(jax.jit(jax.grad(term), static_argnums=1)(params["teacher"], name))
        expected = np.sqrt(sum(float(jnp.sum(g**2)) for g in leaves))
        assert float(metrics[f"grad_norm_{name}"]) == pytest.approx(expected, rel=1e-4)


def test_target_with_dead_dimensions_is_refused_or_warned(tmp_path, caplog):
    features = np.zeros((50, 6))
    features[:, 0] = np.linspace(0, 1, 50)
    features[:, 1] = np.linspace(0, 2, 50)
    features[:, 2] = 0.3  # constant, not zero
    features[:, 3] = 1 + 1e-9 * np.arange(50)  # near-constant
    statistics = targets.target_statistics(features)
    assert (statistics["dead_dims"], statistics["constant_dims"]) == (2, 1)
    assert statistics["near_constant_dims"] == 2
    assert statistics["scale"][2:] == [1.0] * 4 and statistics["scale"][0] > 0.2
    spec = targets.TargetSpec()
    with pytest.raises(targets.DeadTargetError, match="2 of 6 dimensions are dead .* 2 near"):
        targets.check_target(statistics, spec, "refuse")
    targets.check_target(targets.target_statistics(features[:, :2]), spec, "refuse")

    # In the trainer: P's head with 3 of its 8 dimensions dead, refused before any step.
    config = _config(target_check="refuse")
    with pytest.raises(
        targets.DeadTargetError, match="head \\(P on 17×17 inputs\\): 3 of 8 dimensions are dead"
    ):
        _train(tmp_path / "refused", config, _backbone(dead=3))
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()
    # warn: trains, says so loudly, and records the counts with the teacher.
    with caplog.at_level(logging.WARNING):
        _, _, meta = _train(tmp_path / "warned", _config(num_steps=1), _backbone(dead=3))
    assert "WARNING: distillation target head (P on 17×17 inputs): 3 of 8" in caplog.text
    assert meta["target"]["dead_dims"] == 3


def test_live_presets_and_bad_settings():
    config = teacher_config("p17_small_live")
    assert (config.patch_size, config.widths, config.out_dim) == (17, 0.125, 32)
    assert config.target_stages == (3, 4) and config.target_standardize
    assert (config.init_decoder, config.target_check, config.learning_rate) == (
        "lstsq",
        "refuse",
        1e-3,
    )
    assert teacher_config("p33_live").patch_size == 33
    assert teacher_config("p17_small").target_stages == ()  # the old recipe is unchanged
    with pytest.raises(ValueError, match="unknown config 'p99_live'"):
        teacher_config("p99_live")
    for field, value, message in (
        ("init_decoder", "zero", "init_decoder='zero'"),
        ("target_check", "maybe", "target_check='maybe'"),
        ("target_stages", (0,), "target_stages=\\(0,\\)"),
        ("target_stages", (3, 3), "each stage at most once"),
        ("backbone_input_scale", -1.0, "backbone_input_scale=-1.0"),
    ):
        with pytest.raises(ValueError, match=message):
            run_setup.check_config(_config(**{field: value}))


def test_shipped_teachers_of_the_old_target_still_load_and_say_so():
    # Written before target options: no "target" in the header; P's pooled head, D at the mean.
    module, variables, header = catalog.load_teacher("p17_small_head")
    assert header.get("target") is None and module.patch_size == 17
    assert targets.TargetSpec.from_record(header.get("target")).is_paper
    recipe = shipping.recipe(header)
    assert (recipe["target"], recipe["target_dim"], recipe["init_decoder"]) == (
        "head",
        1280,
        "mean",
    )
    assert probes.load_probe_teacher("p17_small_head").target is None


def test_stage_target_of_a_p_without_that_stage_names_the_stages(tmp_path):
    with pytest.raises(ValueError, match="P has no stage \\[5\\]"):
        _train(tmp_path, _config(target_stages=(1, 5)))


def test_lite0_head_is_dead_at_17_px_and_stages_3_4_are_live():
    """The finding of issue 23 on EfficientNet-Lite0 itself (pip weights, offline), on crops
    of scikit-image's photos: at T̂'s native 17 px window most of the pooled head is exactly 0;
    the pooled stage-3+4 target has no dead dimension."""
    from ustad.models.pretrained import load_pretrained
    from ustad.uninformed_students.teacher.distillation import photo_patches
    from ustad.uninformed_students.teacher.sources import natural_photos

    backbone = load_pretrained("efficientnet_lite0")
    crops = photo_patches(natural_photos(), 17, 128, seed=1)
    head = targets.target_statistics(targets.raw_features(backbone, targets.TargetSpec(), crops))
    live = targets.target_statistics(
        targets.raw_features(backbone, targets.TargetSpec((3, 4), True), crops)
    )
    assert head["dim"] == 1280 and head["dead_dims"] > 900
    assert live["dim"] == 120 and live["dead_dims"] == 0 and live["near_constant_dims"] == 0
