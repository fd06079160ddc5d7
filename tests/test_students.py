"""Student training: ensemble step == separate steps, jit == eager, no recompiles, resume."""

import functools
import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ustad.uninformed_students.train as students_lib
from ustad import sharding as shd
from ustad.cli import main as cli
from ustad.data.images import read_image, to_uint8, write_png
from ustad.data.synthetic import make_synthetic_category
from ustad.ensemble import member
from ustad.metric_writer import read_metrics
from ustad.overlays import overlay_size
from ustad.uninformed_students.maps import teacher_targets
from ustad.uninformed_students.nets import patch_net
from ustad.uninformed_students.score import Detector
from ustad.uninformed_students.steps import (
    init_students,
    make_optimizer,
    make_train_step,
    student_loss,
    student_step,
)
from ustad.uninformed_students.targets import build_target_cache, choose_target_cache
from ustad.uninformed_students.train import train_and_evaluate, train_students

P, SIZE, DIM, M = 17, 16, 8, 2
LR, WD = 1e-3, 1e-2  # larger than the paper's, so that differences would show
# threefry's random bits take seconds to compile on XLA:CPU; rbg keys keep the tests fast.
KEY = functools.partial(jax.random.key, impl="rbg")


def _load_script(name, folder="scripts"):
    """A repository file outside the package (configs/) as a module, loaded once."""
    key = f"ustad_test_{folder}_{name}"
    if key not in sys.modules:
        path = Path(__file__).parents[1] / folder / f"{name}.py"
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[key] = module
    return sys.modules[key]


def get_config(name):
    return _load_script("students", "configs").get_config(name)


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


@pytest.fixture(scope="module")
def setup():
    # The unit tests use the trainer's own settings (one-device mesh, M, optimizer, batch shape)
    # so that the training runs below reuse their compiled steps.
    teacher = patch_net(P, widths=1 / 16, out_dim=DIM)
    teacher_vars = jax.jit(teacher.init)(KEY(1), jnp.zeros((1, P, P, 3)))
    rng = np.random.default_rng(2)
    mesh = shd.make_mesh(1, jax.devices()[:1])
    # Placed as the trainer places batches (committed to the mesh): same compiled step.
    images = shd.shard_batch(rng.uniform(size=(2, SIZE, SIZE, 3)).astype(np.float32), mesh)
    targets = shd.shard_batch(rng.normal(size=(2, SIZE, SIZE, DIM)).astype(np.float32), mesh)
    return teacher, teacher_vars, make_optimizer(LR, WD), images, targets, mesh


def _fresh_state(teacher, tx, mesh):
    return init_students(teacher, tx, KEY(0), M, 3, shd.member_sharding(mesh, False))


@pytest.mark.parametrize("strategy", ["vmap", "sequential"])
def test_ensemble_step_equals_separate_student_steps_without_recompiling(setup, strategy):
    teacher, _, tx, images, targets, mesh = setup
    state = _fresh_state(teacher, tx, mesh)
    separate = [(member(state["params"], i), member(state["opt_state"], i)) for i in range(M)]
    step = make_train_step(teacher, tx, mesh=mesh, member_strategy=strategy)
    single = jax.jit(lambda p, o, x, t: student_step(teacher, tx, p, o, x, t))
    compiled = None
    for i in range(3):  # later steps use each student's own Adam moments
        state, losses = step(state, images + 0.01 * i, targets * (1 + i))
        compiled = compiled or step._cache_size()
        outs = [single(p, o, images + 0.01 * i, targets * (1 + i)) for p, o in separate]
        separate = [(p, o) for p, o, _ in outs]
        np.testing.assert_allclose(losses, [loss for *_, loss in outs], rtol=1e-5)
    assert step._cache_size() == compiled  # no recompilation after the first step
    # Adam divides by √v: float rounding in near-zero gradients moves a parameter by up to
    # ~1e-6 (LR = 1e-3 per step), so compare at 1 % of a step.
    for i in range(M):
        _assert_trees_close(member(state["params"], i), separate[i][0], atol=1e-5)
        _assert_trees_close(member(state["opt_state"], i), separate[i][1], atol=1e-5)
    assert not np.allclose(losses[0], losses[1])  # the students are distinct


def test_jit_equals_eager(setup):
    # Loss and gradients of one student; the optimizer is checked against PyTorch's formula
    # below (running Adam op by op over every leaf costs seconds of dispatch for nothing).
    teacher, _, tx, images, targets, mesh = setup
    params = member(_fresh_state(teacher, tx, mesh)["params"], 0)
    loss_and_grad = jax.value_and_grad(student_loss, argnums=1)
    eager = loss_and_grad(teacher, params, images, targets)
    jitted = jax.jit(loss_and_grad, static_argnums=0)(teacher, params, images, targets)
    _assert_trees_close(jitted, eager, rtol=1e-4, atol=1e-6)


def test_teacher_in_step_equals_cached_targets(setup):
    teacher, teacher_vars, tx, images, _, mesh = setup
    stats = {"mean": jnp.full(DIM, 0.1), "std": jnp.full(DIM, 0.5)}
    teacher_params = shd.put_replicated({"variables": teacher_vars, **stats}, mesh)
    cache = build_target_cache(
        teacher,
        teacher_params,
        np.asarray(images),
        dtype=np.float32,
        batch_size=2,
        put=lambda x: shd.shard_batch(x, mesh),
    )
    direct = teacher_targets(teacher, teacher_vars, stats["mean"], stats["std"], images)
    np.testing.assert_allclose(cache, direct, rtol=1e-5, atol=1e-6)
    half = build_target_cache(
        teacher, teacher_params, np.asarray(images), dtype=np.float16, batch_size=2
    )
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), direct, rtol=1e-3, atol=1e-3)
    cached, cached_losses = make_train_step(teacher, tx, mesh=mesh)(
        _fresh_state(teacher, tx, mesh), images, shd.shard_batch(cache, mesh)
    )
    fly, fly_losses = make_train_step(teacher, tx, teacher=teacher, mesh=mesh)(
        _fresh_state(teacher, tx, mesh), images, teacher_params
    )
    np.testing.assert_allclose(cached_losses, fly_losses, rtol=1e-5)
    _assert_trees_close(cached, fly, atol=1e-5)


def test_optimizer_is_adam_with_l2_in_the_gradient():
    # PyTorch Adam(lr, weight_decay=wd): g ← g + wd·θ, then the usual bias-corrected Adam.
    lr, wd, b1, b2, eps = 0.1, 0.5, 0.9, 0.999, 1e-8
    tx = make_optimizer(lr, wd)
    theta = jnp.array([1.0, -2.0])
    state = tx.init(theta)
    ref, m, v = np.array([1.0, -2.0]), 0.0, 0.0
    for t, grad in enumerate([np.array([0.3, 0.1]), np.array([-0.2, 0.4])], start=1):
        updates, state = tx.update(jnp.asarray(grad), state, theta)
        theta = optax.apply_updates(theta, updates)
        g = grad + wd * ref
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
        ref = ref - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    np.testing.assert_allclose(theta, ref, rtol=0, atol=1e-5)  # float32 vs float64


def test_choose_target_cache():
    gb = 2**30
    # 200 images of 256² with d=128 are 6.7 GB in float32.
    assert choose_target_cache("auto", 200, (256, 256), 128, 8 * gb) == "float32"
    assert choose_target_cache("auto", 200, (256, 256), 128, 4 * gb) == "float16"
    assert choose_target_cache("auto", 200, (256, 256), 128, 2 * gb) == "none"
    assert choose_target_cache("bfloat16", 200, (256, 256), 128, 0) == "bfloat16"
    with pytest.raises(ValueError, match="target_cache"):
        choose_target_cache("fp8", 1, (8, 8), 8, gb)


def _config(**overrides):
    config = get_config("smoke")
    config.image_size = SIZE
    config.num_students = M
    config.learning_rate, config.weight_decay = LR, WD
    config.epochs = 2
    config.batch_size = 2
    config.val_fraction = 0.25
    config.checkpoint_every_steps = 1
    config.log_every_steps = 1
    config.num_devices = 1
    config.stats_batch_size = 8
    config.eval_batch_size = 8
    config.prng_impl = "rbg"
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.fixture(scope="module")
def data():
    images = np.random.default_rng(5).uniform(size=(8, SIZE, SIZE, 3)).astype(np.float32)
    teacher = patch_net(P, widths=1 / 16, out_dim=DIM)
    teacher_vars = jax.jit(teacher.init)(KEY(6), jnp.zeros((1, P, P, 3)))
    return images, (teacher, teacher_vars)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    images, teacher = data
    workdir = tmp_path_factory.mktemp("students")
    scale = train_students(_config(target_cache="float32"), workdir, images, teacher=teacher)
    return workdir, scale


def test_checkpoint_restore_gives_identical_scores(data, trained):
    images, teacher = data
    workdir, scale = trained
    assert scale.num_students == 2 and scale.image_size == (SIZE, SIZE)
    test_images = images[:3] * 0.9
    maps, scores = Detector([scale], batch_size=2).score(test_images)
    loaded_maps, loaded_scores = Detector.load(workdir, batch_size=2).score(test_images)
    np.testing.assert_array_equal(maps, loaded_maps)
    np.testing.assert_array_equal(scores, loaded_scores)
    # A finished run is not retrained: calling again returns the same students.
    again = train_students(_config(target_cache="float32"), workdir, images, teacher=teacher)
    _assert_trees_close(again.params, scale.params, rtol=0, atol=0)
    assert again.normalization == scale.normalization
    records = read_metrics(workdir / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert any("val_error_mean" in r for r in records)


def test_score_script_writes_maps_overlays_and_scores(data, trained, tmp_path):
    images, _ = data
    workdir, _ = trained
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for i, image in enumerate(images[:2]):
        write_png(tmp_path / "in" / "sub" / f"{i}.png", to_uint8(image))
    write_png(tmp_path / "in" / "big.png", to_uint8(np.kron(images[2], np.ones((2, 2, 1)))))
    status = cli.main(
        [
            "ustad",
            "score",
            "--workdirs",
            str(workdir),
            "--images",
            str(tmp_path / "in" / "**" / "*.png"),
            "--out",
            str(tmp_path / "out"),
            "--batch_size",
            "2",
        ]
    )
    assert status == 0
    with np.load(tmp_path / "out" / "big.png.npz") as result:
        assert result["anomaly_map"].shape == (2 * SIZE, 2 * SIZE)  # the image's own size
    with np.load(tmp_path / "out" / "sub" / "1.png.npz") as result:
        assert result["anomaly_map"].shape == (SIZE, SIZE) and np.isfinite(result["score"])
    width, height = overlay_size(SIZE, SIZE)
    assert read_image(tmp_path / "out" / "sub" / "0.png.overlay.png").shape == (height, width, 3)
    lines = (tmp_path / "out" / "scores.csv").read_text().splitlines()
    assert lines[0] == "path,score" and len(lines) == 4


def test_train_and_evaluate_on_an_mvtec_layout_folder(tmp_path):
    make_synthetic_category(
        tmp_path / "data",
        "tiny",
        image_size=SIZE,
        num_train=8,
        num_test_good=1,
        num_test_per_defect=1,
    )
    config = _config(data_dir=str(tmp_path / "data"), category="tiny", epochs=1)
    (scale,) = train_and_evaluate(config, tmp_path / "run")
    assert scale.patch_size == P and (tmp_path / "run" / "checkpoints").is_dir()
    assert Detector.load(tmp_path / "run").scales[0].num_students == M


def test_kill_and_resume_equals_uninterrupted_run(data, tmp_path, monkeypatch):
    images, teacher = data
    config = _config(target_cache="none")  # teacher inside the step
    whole = train_students(config, tmp_path / "whole", images, teacher=teacher)

    original = students_lib._check_values

    def killed_at_step_3(losses, step):
        if step == 3:
            raise KeyboardInterrupt  # as if the job were killed mid-epoch
        original(losses, step)

    monkeypatch.setattr(students_lib, "_check_values", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_students(config, tmp_path / "resumed", images, teacher=teacher)
    monkeypatch.setattr(students_lib, "_check_values", original)
    steps = sorted(int(p.name) for p in (tmp_path / "resumed/checkpoints").iterdir())
    assert steps and max(steps) < 6  # 6 = 2 epochs × 3 steps: the run really stopped early
    resumed = train_students(config, tmp_path / "resumed", images, teacher=teacher)
    _assert_trees_close(resumed.params, whole.params, rtol=0, atol=0)
    assert resumed.normalization == whole.normalization


def test_non_finite_images_are_named_before_training(data, tmp_path):
    images, teacher = data
    images = images.copy()
    images[[1, 4], 3, 3] = np.nan
    with pytest.raises(ValueError, match=r"training images \[1, 4\] hold NaN"):
        train_students(_config(epochs=1), tmp_path, images, teacher=teacher)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_non_finite_loss_names_the_student_and_step(data, tmp_path):
    images, teacher = data
    with pytest.raises(FloatingPointError, match="student 0 became inf at step 1"):
        train_students(_config(epochs=1, learning_rate=1e3), tmp_path, images, teacher=teacher)
