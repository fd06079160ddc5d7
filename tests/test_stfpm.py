"""STFPM: pyramids == the backbones, the loss and score == the formulas by hand, the teacher
frozen, vmapped M = 1 == the single student, and train → score → evaluate through the CLI."""

import functools
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ustad
from ustad.cli import main as cli
from ustad.data.synthetic import make_synthetic_category
from ustad.ensemble import member
from ustad.models import efficientnet_lite, resnet
from ustad.stfpm import maps as stfpm
from ustad.stfpm import steps
from ustad.stfpm.checkpoints import STFPMModel, load_model
from ustad.stfpm.maps import level_scores
from ustad.stfpm.nets import (
    ResNet18Pyramid,
    pyramid_from_spec,
    pyramid_net,
    pyramid_spec,
    teacher_variables,
)
from ustad.stfpm.score import STFPMDetector
from ustad.stfpm.train import train_stfpm

SIZE = 32
KEY = functools.partial(jax.random.key, impl="rbg")  # fast to compile on XLA:CPU


def _config(name="smoke", **overrides):
    key = "ustad_test_configs_stfpm"
    if key not in sys.modules:
        path = Path(__file__).parents[1] / "configs" / "stfpm.py"
        spec = importlib.util.spec_from_file_location(key, path)
        sys.modules[key] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[key])
    config = sys.modules[key].get_config(name)
    config.prng_impl = "rbg"
    for field, value in overrides.items():
        config[field] = value
    return config


def _images(n, size=SIZE, seed=0):
    return np.random.default_rng(seed).uniform(size=(n, size, size, 3)).astype(np.float32)


def _tiny(backbone="resnet18"):
    return pyramid_net(backbone, tiny=True)


def _variables(network, seed):
    variables = jax.jit(network.init)(KEY(seed), jnp.zeros((1, SIZE, SIZE, 3)))
    # Non-trivial running statistics, so that inference mode is really exercised.
    return dict(
        variables,
        batch_stats=jax.tree.map(
            lambda x: x + jax.random.uniform(KEY(seed + 100), x.shape, minval=0.1, maxval=0.5),
            variables["batch_stats"],
        ),
    )


def _filled_variables(module, seed=0):
    """Random variables of the right names and shapes without compiling Flax's initialisers
    (~15 s for a whole backbone on XLA:CPU): fan-in-scaled normal kernels, BatchNorm at
    identity-ish statistics."""
    shapes = jax.eval_shape(module.init, KEY(0), jnp.zeros((1, SIZE, SIZE, 3)))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(path[-1])
        if "var" in name or "scale" in name:
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        if "mean" in name or "bias" in name:
            return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
        fan_in = max(1, int(np.prod(leaf.shape[:-1])))
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


# ------------------------------------------------------------------------------------ networks


@pytest.mark.parametrize(
    "backbone, full, names",
    [
        ("resnet18", resnet.ResNet18, ("layer1", "layer2", "layer3")),
        ("efficientnet_lite0", efficientnet_lite.EfficientNetLite0, ("stage2", "stage3", "stage5")),
    ],
)
def test_pyramid_equals_the_pretrained_backbones_maps(backbone, full, names):
    full_module = full()
    variables = _filled_variables(full_module)
    images = jnp.asarray(_images(2))
    expected = jax.jit(functools.partial(full_module.apply, return_maps=True))(variables, images)
    network = pyramid_net(backbone)
    maps = jax.jit(network.apply)(teacher_variables(network, variables), images)
    assert network.level_names == names
    for name, got in zip(names, maps, strict=True):
        np.testing.assert_allclose(got, expected[name], rtol=1e-5, atol=1e-5)
    assert [SIZE // m.shape[1] for m in maps] == list(network.strides) == [4, 8, 16]


class _FullBody(nn.Module):
    """A module made of one ``stage_maps`` of :mod:`ustad.models`."""

    body: Callable
    kwargs: tuple

    @nn.compact
    def __call__(self, images, *, train=False):
        return self.body(images, train=train, **dict(self.kwargs))


def _full_body(network):
    """The models/ backbone's stages one deeper than ``network``'s, at its sizes and momentum."""
    kwargs = {"bn_momentum": network.bn_momentum, "last_stage": max(network.levels) + 1}
    if isinstance(network, ResNet18Pyramid):
        kwargs.update(widths=network.widths, blocks=network.blocks)
        return _FullBody(resnet.stage_maps, tuple(kwargs.items()))
    kwargs.update(stages=network.stages, stem=network.stem)
    return _FullBody(efficientnet_lite.stage_maps, tuple(kwargs.items()))


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_trainable_pyramid_equals_the_models_stage_maps_with_the_same_weights(backbone):
    # The pyramid is models/' body cut early: in training mode too (batch statistics, running
    # averages updated with the pyramid's momentum), its levels and updated statistics are the
    # full body's, and its variables are a subset of the full body's names and shapes.
    network = _tiny(backbone)
    full = _full_body(network)
    full_variables = _variables(full, 3)
    variables = teacher_variables(network, full_variables)
    images = jnp.asarray(_images(2))

    @jax.jit
    def run(variables, full_variables):
        apply = functools.partial(network.apply, train=True, mutable=["batch_stats"])
        full_apply = functools.partial(full.apply, train=True, mutable=["batch_stats"])
        return apply(variables, images), full_apply(full_variables, images)

    (maps, updated), (full_maps, full_updated) = run(variables, full_variables)
    # The same operations in the same order: equal up to XLA's fusion choices.
    _assert_trees_close(maps, tuple(full_maps[name] for name in network.level_names), 1e-6, 1e-6)
    expected = teacher_variables(network, dict(full_variables, **full_updated))["batch_stats"]
    _assert_trees_close(updated["batch_stats"], expected, 1e-6, 1e-6)
    stem_bn = "bn1" if backbone == "resnet18" else "bn0"
    assert not np.allclose(
        updated["batch_stats"][stem_bn]["mean"], variables["batch_stats"][stem_bn]["mean"]
    )


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_spec_round_trip(backbone):
    for tiny in (False, True):
        network = pyramid_net(backbone, tiny=tiny)
        assert pyramid_from_spec(pyramid_spec(network)) == network


def test_teacher_variables_name_what_does_not_fit():
    network = pyramid_net("resnet18", tiny=True)
    wrong = jax.eval_shape(resnet.ResNet18().init, KEY(0), jnp.zeros((1, SIZE, SIZE, 3)))
    with pytest.raises(ValueError, match="has shape"):
        teacher_variables(network, jax.tree.map(lambda s: np.zeros(s.shape), wrong))


# ----------------------------------------------------------------------------- loss and score


def _np_normalize(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _np_bilinear(maps, size):
    """PyTorch's ``F.interpolate(bilinear, align_corners=False)`` of ``[N, h, w]``."""

    def axis_weights(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        low = np.floor(src).astype(int)
        high = np.minimum(low + 1, n_in - 1)
        frac = src - low
        weights = np.zeros((n_out, n_in))
        np.add.at(weights, (np.arange(n_out), low), 1 - frac)
        np.add.at(weights, (np.arange(n_out), high), frac)
        return weights

    rows, cols = axis_weights(maps.shape[1], size[0]), axis_weights(maps.shape[2], size[1])
    return np.einsum("Hh,nhw,Ww->nHW", rows, np.asarray(maps, np.float64), cols)


def test_upsample_equals_pytorch_bilinear_align_corners_false():
    maps = np.random.default_rng(0).normal(size=(2, 4, 8)).astype(np.float32)
    for size in ((16, 32), (32, 32), (5, 9)):
        np.testing.assert_allclose(stfpm.upsample(maps, size), _np_bilinear(maps, size), atol=1e-5)


def test_loss_is_half_the_mean_squared_distance_of_normalised_maps_summed_over_levels():
    rng = np.random.default_rng(1)
    teacher = [rng.normal(size=(3, s, s, c)).astype(np.float32) for s, c in ((8, 4), (4, 6))]
    student = [rng.normal(size=t.shape).astype(np.float32) for t in teacher]
    student[0][0, 0, 0] = 0  # a zero vector stays zero (PyTorch's eps), not NaN
    expected = sum(
        np.mean(0.5 * np.sum((_np_normalize(t) - _np_normalize(s)) ** 2, axis=-1))
        for t, s in zip(teacher, student, strict=True)
    )
    np.testing.assert_allclose(stfpm.stfpm_loss(teacher, student), expected, rtol=1e-5)
    weighted = stfpm.stfpm_loss(teacher, student, (2.0, 0.0))
    first = np.mean(0.5 * np.sum((_np_normalize(teacher[0]) - _np_normalize(student[0])) ** 2, -1))
    np.testing.assert_allclose(weighted, 2 * first, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_model():
    network = _tiny()
    members = [_variables(network, 10 + i) for i in range(2)]
    stacked = jax.tree.map(lambda *x: np.stack(x), *members)
    params = {"teacher": _variables(network, 7), "students": stacked}
    return STFPMModel(network, jax.tree.map(np.asarray, params), (SIZE, SIZE))


@pytest.mark.parametrize("combination", ["product", "sum", "mean"])
def test_score_equals_the_per_level_formula_by_hand(tiny_model, combination):
    single = STFPMModel(
        tiny_model.network,
        {
            "teacher": tiny_model.params["teacher"],
            "students": jax.tree.map(lambda x: x[:1], tiny_model.params["students"]),
        },
        (SIZE, SIZE),
        combination=combination,
    )
    images = _images(3, seed=4)
    apply = jax.jit(tiny_model.network.apply)  # one compilation instead of op-by-op dispatch
    teacher = apply(single.params["teacher"], images)
    student = apply(member(single.params["students"], 0), images)
    levels = [
        _np_bilinear(0.5 * np.sum((_np_normalize(t) - _np_normalize(s)) ** 2, -1), (SIZE, SIZE))
        for t, s in zip(teacher, student, strict=True)
    ]
    expected = {"product": np.prod, "sum": np.sum, "mean": np.mean}[combination](levels, axis=0)
    maps, scores = STFPMDetector([single], batch_size=2).score(images)  # 3 images: one padded
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(scores, expected.reshape(3, -1).max(axis=1), rtol=1e-4)


def test_ensemble_error_and_variance_by_hand(tiny_model):
    images = _images(2, seed=5)
    network, params = tiny_model.network, tiny_model.params
    # Jitted: one compilation instead of ~150 small ones (op-by-op dispatch).
    errors, variances = jax.jit(level_scores, static_argnums=0)(network, params, images)
    apply = jax.jit(network.apply)
    teacher = apply(params["teacher"], images)
    members = [apply(member(params["students"], i), images) for i in range(2)]
    for level, t in enumerate(teacher):
        predictions = np.stack([_np_normalize(m[level]) for m in members])
        mean = predictions.mean(axis=0)
        np.testing.assert_allclose(
            errors[level], 0.5 * np.sum((_np_normalize(t) - mean) ** 2, -1), rtol=1e-4, atol=1e-6
        )
        spread = 0.5 * np.mean(np.sum((predictions - mean) ** 2, -1), axis=0)
        np.testing.assert_allclose(variances[level], spread, rtol=1e-4, atol=1e-6)
    norm = np.array([[0.5, 0.2, 0.1, 0.05]] * 3, np.float32)
    model = STFPMModel(network, params, (SIZE, SIZE), "error_variance", "mean", normalization=norm)
    maps, _ = STFPMDetector([model]).score(images)
    expected = np.mean(
        [
            (_np_bilinear(e, (SIZE, SIZE)) - 0.5) / 0.2
            + (_np_bilinear(v, (SIZE, SIZE)) - 0.1) / 0.05
            for e, v in zip(errors, variances, strict=True)
        ],
        axis=0,
    )
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="product"):
        STFPMDetector([model], combination="product")


# ------------------------------------------------------------------------------------ training


# One network, optimizer and batch shape for every training test: the jitted steps are cached
# per (network, optimizer, settings) and compile once for the whole module.
NETWORK = pyramid_net("resnet18", tiny=True)
TX = steps.make_optimizer(0.4, 0.9, 1e-4)
STEP_SIZE = 16


@functools.cache
def _batch():
    images = jnp.asarray(_images(4, STEP_SIZE, seed=2))
    teacher = _variables(NETWORK, 1)
    return images, teacher, jax.jit(steps.teacher_maps, static_argnums=0)(NETWORK, teacher, images)


def _students(m, seed=0):
    return steps.init_students(NETWORK, TX, KEY(seed), m)


_single_step = jax.jit(functools.partial(steps.student_step, NETWORK, TX))


def test_a_step_lowers_the_loss_on_tiny_data():
    images, _, targets = _batch()
    step = steps.make_train_step(NETWORK, TX, member_strategy="vmap")
    students, losses = _students(1), []
    for _ in range(6):
        students, loss = step(students, images, targets)
        losses.append(float(loss[0]))
    assert losses[-1] < 0.8 * losses[0], losses
    assert np.all(np.isfinite(losses))


def test_teacher_is_frozen_no_gradient_not_in_the_optimizer_state():
    images, teacher, _ = _batch()
    students = _students(1)
    student = member(students, 0)

    @jax.jit
    def loss_of_teacher(teacher_params):
        targets = steps.teacher_maps(NETWORK, dict(teacher, params=teacher_params), images)
        loss, _ = steps.student_loss(
            NETWORK, student["params"], student["batch_stats"], images, targets
        )
        return loss

    grads = jax.grad(loss_of_teacher)(teacher["params"])
    assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree.leaves(grads))
    # The optimizer state is exactly SGD's trace of the student's parameters, nothing else.
    assert set(students) == {"params", "batch_stats", "opt_state"}
    trace = jax.tree.leaves(student["opt_state"])
    assert [x.shape for x in trace] == [x.shape for x in jax.tree.leaves(student["params"])]
    # The teacher runs inside the step (not cached): it is an input, never updated or donated.
    before = jax.tree.map(np.array, teacher)
    step = steps.make_train_step(NETWORK, TX, cached_targets=False, member_strategy="vmap")
    students, _ = step(students, images, teacher)
    _assert_trees_close(jax.tree.map(np.asarray, teacher), before, rtol=0, atol=0)


@pytest.mark.parametrize("m, strategy", [(1, "vmap"), (2, "vmap"), (2, "sequential")])
def test_vmapped_students_equal_single_student_steps(m, strategy):
    images, _, targets = _batch()
    students = _students(m, seed=m)
    singles = [member(students, i) for i in range(m)]
    step = steps.make_train_step(NETWORK, TX, member_strategy=strategy)
    for _ in range(2):
        students, losses = step(students, images, targets)
        results = [_single_step(s, images, targets) for s in singles]
        singles = [r[0] for r in results]
        np.testing.assert_allclose(losses, [r[1] for r in results], rtol=1e-5)
    for i in range(m):
        _assert_trees_close(member(students, i), singles[i], rtol=1e-4, atol=1e-5)


def test_sgd_matches_pytorchs_update_rule():
    tx = steps.make_optimizer(0.4, 0.9, 1e-2)
    params = {"w": jnp.array([1.0, -2.0])}
    state = tx.init(params)
    buf, theta = np.zeros(2), np.array([1.0, -2.0])
    for g in ([0.5, 0.1], [-0.2, 0.3]):
        updates, state = tx.update({"w": jnp.array(g)}, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        d = np.array(g) + 1e-2 * theta  # torch: d_p = g + wd·θ; buf = μ·buf + d_p; θ -= lr·buf
        buf = 0.9 * buf + d
        theta = theta - 0.4 * buf
        np.testing.assert_allclose(params["w"], theta, rtol=1e-6)


# ------------------------------------------------------------------------- end to end, the CLI


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("stfpm")
    data = make_synthetic_category(
        root / "data",
        "synthetic",
        image_size=SIZE,
        num_train=10,
        num_test_good=2,
        num_test_per_defect=1,
    )
    args = [
        "--config=configs/stfpm.py:smoke",
        f"--workdir={root / 'run'}",
        f"--config.data_dir={root / 'data'}",
        "--config.epochs=1",
        "--config.prng_impl=rbg",
    ]
    assert cli.main(["ustad", "train-students", *args]) == 0
    return root, data, args


def test_train_students_evaluate_and_score_work_for_stfpm(trained, capsys):
    root, data, _ = trained
    from ustad.families import load_models

    family, models = load_models(root / "run")
    assert family == "stfpm" and isinstance(models[0], STFPMModel) and models[0].num_students == 1
    assert isinstance(ustad.load_detector(root / "run"), STFPMDetector)
    out = root / "report"
    assert (
        cli.main(
            ["ustad", "evaluate", f"--workdirs={root / 'run'}", f"--data={data}", f"--out={out}"]
        )
        == 0
    )
    assert "stfpm" in (out / "metrics.md").read_text()
    maps_dir = root / "maps"
    assert (
        cli.main(
            [
                "ustad",
                "score",
                f"--workdirs={root / 'run'}",
                f"--images={data / 'test' / '*' / '*.png'}",
                f"--out={maps_dir}",
            ]
        )
        == 0
    )
    assert (maps_dir / "scores.csv").read_text().count("\n") == len(list(data.glob("test/*/*"))) + 1
    capsys.readouterr()


def test_checkpoint_restores_the_same_scores_and_resume_checks_settings(trained):
    root, data, args = trained
    images = _images(2, seed=9)
    model = load_model(root / "run")
    again = train_stfpm(
        _config(data_dir=str(root / "data"), epochs=1),
        root / "run",
        _load_train(data),
    )
    _assert_trees_close(again.params, model.params, rtol=0, atol=0)
    np.testing.assert_allclose(
        STFPMDetector([again]).score(images)[0], STFPMDetector([model]).score(images)[0]
    )
    with pytest.raises(ValueError, match="learning_rate"):
        train_stfpm(_config(epochs=1, learning_rate=0.1), root / "run", _load_train(data))


def _load_train(data):
    from ustad.data.mvtec import load_mvtec_train

    return load_mvtec_train(data.parent, data.name, image_size=SIZE)[0]


def test_a_too_high_learning_rate_fails_with_a_named_error(tmp_path):
    # STFPM's loss is bounded: at lr 1000 the students degrade instead of overflowing (issue 25
    # item 19). Smoke data: validation loss 1.72 after the first epoch, 2.21 after the sixth.
    from ustad.data.synthetic import make_synthetic_category
    from ustad.stfpm.train import train_and_evaluate

    make_synthetic_category(tmp_path / "data", "synthetic", image_size=32)
    config = _config(data_dir=str(tmp_path / "data"), learning_rate=1000.0, epochs=6)
    with pytest.raises(FloatingPointError, match="diverged: validation loss .* lower"):
        train_and_evaluate(config, tmp_path / "run")


def test_train_steps_count_updates_whatever_the_category_size():
    from ustad.stfpm.run import scheduled_epochs

    config = _config(train_steps=100, epochs=3)
    assert scheduled_epochs(config, 5) == 20  # a 40-image category at batch 8: 100 updates
    assert scheduled_epochs(config, 21) == 5  # 167 images: 105 updates, the fewest ≥ 100
    assert scheduled_epochs(_config(epochs=3), 5) == 3  # train_steps = 0: the paper's epochs
    with pytest.raises(ValueError, match="train_steps must be an integer ≥ 0"):
        scheduled_epochs(_config(train_steps=-1), 5)
