"""Bad inputs a new user hits: each gives correct behaviour or an error that names the file,
key or value, and leaves nothing half-written behind (issue 12)."""

import functools
import importlib.util
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ustad import cli
from ustad.checkpointing import Checkpointer
from ustad.data import category_folder, load_mvtec_test, load_mvtec_train
from ustad.data.images import write_png
from ustad.data.synthetic import make_synthetic_category
from ustad.io import atomic_write
from ustad.models.patch_net import patch_net
from ustad.score_maps import ScoreNormalization, check_normalization
from ustad.scoring import Detector, as_unit_float
from ustad.train.students import train_and_evaluate, train_students

P, SIZE, DIM, M = 17, 16, 8, 2
KEY = functools.partial(jax.random.key, impl="rbg")


def _config(**overrides):
    """The smoke config at the sizes of tests/test_students.py (so compilations are shared)."""
    spec = importlib.util.spec_from_file_location(
        "ustad_test_bad_inputs_configs", Path(__file__).parents[1] / "configs" / "students.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke")
    settings = dict(
        image_size=SIZE,
        num_students=M,
        learning_rate=1e-3,
        weight_decay=1e-2,
        epochs=2,
        batch_size=2,
        val_fraction=0.25,
        checkpoint_every_steps=1,
        log_every_steps=1,
        num_devices=1,
        stats_batch_size=8,
        eval_batch_size=8,
        prng_impl="rbg",
    )
    for key, value in (settings | overrides).items():
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
    train_students(_config(), workdir, images, teacher=teacher)
    return workdir


def _left_behind(workdir):
    assert not (workdir / "checkpoints").exists(), "an empty checkpoints/ was left behind"
    log = workdir / "metrics.jsonl"
    assert not log.exists() or log.stat().st_size > 0, "a 0-byte log was left behind"


# ------------------------------------------------------------------ no silent wrong results


def test_diverging_training_fails_with_a_named_error(data, tmp_path):
    images, teacher = data
    # lr = 10 diverges to losses of ~1e21 without reaching inf (the report).
    with pytest.raises(FloatingPointError, match="the loss is .* at step 1, beyond .*diverged"):
        train_students(_config(learning_rate=10.0), tmp_path, images, teacher=teacher)
    with Checkpointer(tmp_path / "checkpoints") as checkpointer:
        steps = checkpointer.all_steps()
        assert not any(checkpointer.restore_metadata(s).get("score_normalization") for s in steps)


def test_non_finite_or_absurd_normalisation_is_refused():
    check_normalization(ScoreNormalization(10.0, 2.0, 1.0, 0.5), 8, "run")
    with pytest.raises(FloatingPointError, match="run: .*error_std = inf"):
        check_normalization(ScoreNormalization(6e21, float("inf"), 1.0, 1.0), 8, "run")
    with pytest.raises(FloatingPointError, match="error_mean = 6e\\+21, beyond 8e\\+04"):
        check_normalization(ScoreNormalization(6e21, 1e22, 1.0, 1.0), 8, "run")
    with pytest.raises(FloatingPointError, match="variance_mean = nan"):
        check_normalization(ScoreNormalization(1.0, 1.0, float("nan"), 1.0), 8, "run")


def _set_normalization(workdir, **values):
    """Edit the score normalisation stored in the newest checkpoint's JSON metadata."""
    with Checkpointer(workdir / "checkpoints") as checkpointer:
        step = checkpointer.latest_step()
    path = workdir / "checkpoints" / str(step) / "metadata" / "metadata"
    meta = json.loads(path.read_text())
    meta["score_normalization"].update(values)
    path.write_text(json.dumps(meta))


def test_score_refuses_students_whose_statistics_are_not_finite(trained, tmp_path, capsys):
    workdir = tmp_path / "diverged"
    shutil.copytree(trained, workdir)
    _set_normalization(workdir, error_std=float("inf"))
    write_png(tmp_path / "in" / "a.png", np.zeros((SIZE, SIZE, 3), np.uint8))
    args = [f"--workdirs={workdir}", f"--images={tmp_path / 'in'}", f"--out={tmp_path / 'out'}"]
    assert cli.main(["ustad", "score", *args]) == 1
    assert "error_std = inf" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_finished_run_resumed_with_other_settings_says_so(data, trained):
    images, teacher = data
    with pytest.raises(
        ValueError, match="finished run trained with learning_rate=0.001 .now 0.002"
    ):
        train_students(_config(learning_rate=2e-3), trained, images, teacher=teacher)
    with pytest.raises(ValueError, match="trained on other images"):
        train_students(_config(), trained, images[::-1].copy(), teacher=teacher)
    # The same settings still return the finished model.
    assert train_students(_config(), trained, images, teacher=teacher).num_students == M


def test_detector_scales_uint8_and_refuses_other_ranges(trained, data):
    images, _ = data
    detector = Detector.load(trained, batch_size=2)
    as_bytes = np.round(images[:2] * 255).astype(np.uint8)
    maps_u8, scores_u8 = detector.score(as_bytes)
    maps_f, scores_f = detector.score(as_bytes.astype(np.float32) / 255)
    np.testing.assert_array_equal(maps_u8, maps_f)
    np.testing.assert_array_equal(scores_u8, scores_f)
    with pytest.raises(ValueError, match=r"range over \[0, 255\]: divide 0–255 values by 255"):
        detector.score(as_bytes.astype(np.float32))
    with pytest.raises(ValueError, match="int32"):
        as_unit_float(as_bytes.astype(np.int32))


# --------------------------------------------------------------------------- errors that help


def test_changing_num_students_on_resume_gives_the_mismatch_message(data, trained):
    images, teacher = data
    with pytest.raises(ValueError, match="num_students=2, but this run has 3"):
        train_students(_config(num_students=3), trained, images, teacher=teacher)


def test_a_truncated_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, caplog):
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(1, {"x": np.arange(1000.0)}, {"step": 1})
        checkpointer.save(2, {"x": np.arange(1000.0) + 1}, {"step": 2})
    for data_file in (tmp_path / "2" / "state").rglob("d/*"):
        with open(data_file, "r+b") as f:  # as if the disk filled up mid-write
            f.truncate(10)
    with caplog.at_level("WARNING"), Checkpointer(tmp_path) as checkpointer:
        step, state, meta = checkpointer.restore_latest()
    assert step == 1 and meta == {"step": 1} and state["x"][0] == 0
    assert f"checkpoint {tmp_path / '2'} is damaged" in caplog.text
    assert "falling back to step 1" in caplog.text


def test_image_size_not_a_multiple_of_the_stride_names_the_flag(tmp_path):
    module = patch_net(33, widths=1 / 16, out_dim=DIM)  # stride 4
    images = np.zeros((4, 18, 18, 3), np.float32)
    with pytest.raises(ValueError, match=r"--config.image_size: .*18×18 .*multiple of 4.*=20"):
        train_students(_config(), tmp_path / "run", images, teacher=(module, {}))
    _left_behind(tmp_path / "run")


def test_a_missing_category_lists_the_ones_that_exist(tmp_path):
    for name in ("bottle", "cable"):
        (tmp_path / name / "train" / "good").mkdir(parents=True)
    (tmp_path / "notes").mkdir()
    with pytest.raises(FileNotFoundError, match="'screw' not found .*it holds: bottle, cable$"):
        category_folder(tmp_path, "screw")
    with pytest.raises(FileNotFoundError, match="Data folder not found"):
        category_folder(tmp_path / "nope", "screw")


def test_non_finite_images_leave_no_empty_checkpoints_or_logs(data, tmp_path):
    images, teacher = data
    bad = images.copy()
    bad[2, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"training images \[2\] hold NaN or inf"):
        train_students(_config(), tmp_path, bad, teacher=teacher)
    _left_behind(tmp_path)


# -------------------------------------------------------------- training needs only good images


def test_training_reads_only_train_good(tmp_path):
    make_synthetic_category(
        tmp_path, "tiny", image_size=SIZE, num_train=8, num_test_good=1, num_test_per_defect=1
    )
    # A broken test mask and then no test/ or ground_truth/ at all: training does not care.
    masks = sorted((tmp_path / "tiny" / "ground_truth").rglob("*.png"))
    masks[0].write_bytes(b"")
    images, paths = load_mvtec_train(tmp_path, "tiny", image_size=SIZE)
    assert images.shape == (8, SIZE, SIZE, 3) and len(paths) == 8
    shutil.rmtree(tmp_path / "tiny" / "ground_truth")
    test = load_mvtec_test(tmp_path / "tiny", image_size=SIZE)
    assert test.masks is None and test.labels.sum() > 0
    shutil.rmtree(tmp_path / "tiny" / "test")
    config = _config(data_dir=str(tmp_path), category="tiny", epochs=1)
    (scale,) = train_and_evaluate(config, tmp_path / "run")
    assert scale.num_students == M


# ---------------------------------------------------------------------------- permissions


def test_outputs_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "a" / "map.npz", b"x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
