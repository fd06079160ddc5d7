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

from ustad.checkpointing import Checkpointer
from ustad.cli import main as cli
from ustad.data.images import write_png
from ustad.data.mvtec import category_folder, load_mvtec_test, load_mvtec_train
from ustad.data.synthetic import make_synthetic_category
from ustad.ensemble import ScoreNormalization, check_normalization
from ustad.host_images import as_unit_float
from ustad.io import atomic_write
from ustad.uninformed_students.nets import patch_net
from ustad.uninformed_students.score import Detector
from ustad.uninformed_students.train import train_and_evaluate, train_students

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


# ------------------------------------------------------------ files a new user points ustad at


def _train_args(workdir, data_dir, *extra):
    """``ustad train-students`` on ``<data_dir>/tiny`` with the smoke config."""
    return [
        "ustad",
        "train-students",
        "--config=configs/students.py:smoke",
        f"--workdir={workdir}",
        f"--config.data_dir={data_dir}",
        "--config.category=tiny",
        "--config.synthetic_data=False",
        f"--config.image_size={SIZE}",
        *extra,
    ]


def _train_folder(root, count=4):
    folder = root / "tiny" / "train" / "good"
    rng = np.random.default_rng(0)
    for i in range(count):
        write_png(folder / f"{i:03d}.png", rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    return folder


def _score(trained, images, out):
    args = [f"--workdirs={trained}", f"--images={images}", f"--out={out}", "--batch_size=2"]
    return cli.main(["ustad", "score", *args])


def test_an_empty_folder_is_named(trained, tmp_path, capsys):
    folder = tmp_path / "tiny" / "train" / "good"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    workdir = tmp_path / "run"
    assert cli.main(_train_args(workdir, tmp_path)) == 1
    assert f"No images (.png, .jpg, .jpeg, .bmp) in training folder {folder}" in (
        capsys.readouterr().err
    )
    assert not workdir.exists()
    out = tmp_path / "out"
    for images in (folder, f"{folder}/*.png"):
        assert _score(trained, images, out) == 1
        assert f"No image files (.png, .jpg, .jpeg, .bmp) in {images}" in capsys.readouterr().err
        assert not out.exists()


def _truncated(path):
    path.write_bytes(path.read_bytes()[:60])  # the header reads, the pixels do not


@pytest.mark.parametrize(
    "damage",
    [lambda p: p.write_bytes(b""), _truncated, lambda p: p.write_bytes(b"GIF89a garbage")],
    ids=["0-byte", "truncated", "garbage"],
)
def test_a_corrupt_or_empty_image_is_named_and_nothing_is_written(tmp_path, capsys, damage):
    bad = _train_folder(tmp_path) / "002.png"
    damage(bad)
    workdir = tmp_path / "run"
    assert cli.main(_train_args(workdir, tmp_path)) == 1
    assert f"error: Cannot read image file {bad}: " in capsys.readouterr().err
    assert not workdir.exists()


def test_non_image_files_are_skipped_in_folders_and_named_when_asked_for(trained, tmp_path, capsys):
    folder = _train_folder(tmp_path)
    (folder / "notes.txt").write_text("not an image")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "._000.png").write_bytes(b"\0\5\26\7 AppleDouble")  # macOS resource fork
    images, paths = load_mvtec_train(tmp_path, "tiny", image_size=SIZE)
    assert len(images) == 4 and [Path(p).name for p in paths][0] == "000.png"
    out = tmp_path / "out"
    assert _score(trained, f"{folder}/*", out) == 0
    assert "scored 4 images" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.npz")) == [f"{i:03d}.png.npz" for i in range(4)]
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*"))
    assert _score(trained, folder / "notes.txt", tmp_path / "out2") == 1
    assert f"Cannot read image file {folder / 'notes.txt'}" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


@pytest.fixture
def test_set(tmp_path):
    make_synthetic_category(
        tmp_path, "tiny", image_size=SIZE, num_train=1, num_test_good=1, num_test_per_defect=1
    )
    return tmp_path / "tiny"


def _evaluate(trained, data, out):
    return cli.main(
        ["ustad", "evaluate", f"--workdirs={trained}", f"--data={data}", f"--out={out}"]
    )


def test_a_mask_of_the_wrong_size_stops_evaluate_naming_both_files(
    trained, test_set, tmp_path, capsys
):
    mask = sorted((test_set / "ground_truth").rglob("*_mask.png"))[0]
    image = test_set / "test" / mask.parent.name / mask.name.replace("_mask", "")
    write_png(mask, np.zeros((SIZE - 4, SIZE + 2), np.uint8))
    out = tmp_path / "report"
    assert _evaluate(trained, test_set, out) == 1
    err = capsys.readouterr().err
    assert f"Mask {mask} is {SIZE + 2}x{SIZE - 4} (WxH) but its image {image} is 16x16" in err
    assert not out.exists()


def test_a_missing_mask_stops_evaluate_naming_the_image(trained, test_set, tmp_path, capsys):
    mask = sorted((test_set / "ground_truth").rglob("*_mask.png"))[0]
    mask.unlink()
    image = test_set / "test" / mask.parent.name / mask.name.replace("_mask", "")
    out = tmp_path / "report"
    assert _evaluate(trained, test_set, out) == 1
    assert f"Defective test image {image} has no mask: expected {mask}" in capsys.readouterr().err
    assert not out.exists()


def _png_rgb16(path, pixels):
    """A 48-bit RGB PNG (PIL writes none): ``pixels [H, W, 3]`` uint16."""
    import struct
    import zlib

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    height, width, _ = pixels.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
    path.write_bytes(data + chunk(b"IEND", b""))


def test_sixteen_bit_rgba_palette_and_odd_sizes_are_read_right_and_scored_at_their_size(
    trained, tmp_path, capsys
):
    from PIL import Image

    from ustad.data.images import read_image

    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(3)
    gray16 = rng.integers(0, 65536, (17, 23), dtype=np.uint16)
    Image.fromarray(gray16).save(folder / "gray16.png")
    rgb48 = rng.integers(0, 65536, (SIZE, SIZE, 3), dtype=np.uint16)
    _png_rgb16(folder / "rgb48.png", rgb48)
    rgba = rng.integers(0, 256, (9, 31, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: the colours still count, alpha is dropped
    Image.fromarray(rgba).save(folder / "rgba.png")
    colours = np.array([[200, 10, 30], [0, 120, 255]], np.uint8)
    indices = rng.integers(0, 2, (20, 12), dtype=np.uint8)
    palette = Image.fromarray(indices, mode="P")
    palette.putpalette(colours.reshape(-1).tolist())
    palette.save(folder / "palette.png")
    Image.fromarray(rng.integers(0, 256, (13, 13, 2), dtype=np.uint8), mode="LA").save(
        folder / "gray_alpha.png"
    )
    Image.fromarray(rng.integers(0, 2, (15, 16), dtype=bool)).save(folder / "binary.png")

    np.testing.assert_allclose(
        read_image(folder / "gray16.png"), np.repeat(gray16[..., None] / 65535, 3, -1), atol=1e-6
    )
    np.testing.assert_allclose(read_image(folder / "rgb48.png"), rgb48 / 65535, atol=1 / 255)
    np.testing.assert_array_equal(read_image(folder / "rgba.png"), rgba[..., :3] / np.float32(255))
    np.testing.assert_array_equal(
        read_image(folder / "palette.png"), colours[indices] / np.float32(255)
    )
    assert read_image(folder / "binary.png").max() == 1.0

    out = tmp_path / "out"
    assert _score(trained, folder, out) == 0
    assert "scored 6 images" in capsys.readouterr().out
    for path in folder.iterdir():
        with Image.open(path) as image:
            width, height = image.size
        anomaly_map = np.load(out / f"{path.name}.npz")["anomaly_map"]
        assert anomaly_map.shape == (height, width), path.name
        assert np.isfinite(anomaly_map).all()
        with Image.open(out / f"{path.name}.overlay.png") as overlay:
            assert overlay.size == (2 * width, height) and overlay.mode == "RGB"


def _teacher_file(path, teacher):
    from ustad.uninformed_students.nets import layers_to_json
    from ustad.uninformed_students.teacher.files import write_teacher_file

    module, variables = teacher
    meta = {
        "patch_size": module.patch_size,
        "out_dim": module.out_dim,
        "layers": layers_to_json(module.layers),
        "channels": 3,
        "step": 0,
        "total_steps": 0,
    }
    write_teacher_file(path, variables, meta)
    return path


def test_a_missing_teacher_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("USTAD_TEACHERS", str(tmp_path / "teachers"))
    _train_folder(tmp_path)
    workdir = tmp_path / "run"
    missing = tmp_path / "teacher_p{p}"
    assert cli.main(_train_args(workdir, tmp_path, f"--config.teacher_workdir={missing}")) == 1
    err = capsys.readouterr().err
    assert f"error: no teacher '{tmp_path / 'teacher_p17'}': not a workdir or file" in err
    assert not workdir.exists()
    # By name: the message says where names are looked for.
    assert cli.main(_train_args(workdir, tmp_path, "--config.teacher_workdir=mine{p}")) == 1
    assert f"no teacher 'mine17': not a workdir or file, and not a name in {tmp_path}" in (
        capsys.readouterr().err
    )
    assert not workdir.exists()


@pytest.mark.parametrize(
    "damage", [lambda p: p.write_bytes(b""), _truncated], ids=["0-byte", "cut"]
)
def test_a_corrupt_teacher_file_is_named(data, tmp_path, capsys, damage):
    path = _teacher_file(tmp_path / "mine.teacher.npz", data[1])
    damage(path)
    _train_folder(tmp_path)
    workdir = tmp_path / "run"
    assert cli.main(_train_args(workdir, tmp_path, f"--config.teacher_workdir={path}")) == 1
    assert f"error: {path} is not a teacher file (unreadable NumPy archive" in (
        capsys.readouterr().err
    )
    assert not workdir.exists()


def test_a_teacher_of_the_wrong_p_names_the_file(data, tmp_path, capsys):
    path = _teacher_file(tmp_path / "p17.teacher.npz", data[1])
    _train_folder(tmp_path)
    workdir = tmp_path / "run"
    args = _train_args(workdir, tmp_path, f"--config.teacher_workdir={path}")
    assert cli.main([*args, "--config.patch_sizes=(33,)"]) == 1
    assert f"error: the teacher {path.resolve()} has p=17, expected 33" in capsys.readouterr().err
    assert not workdir.exists()


_KILLED_MID_SAVE = """
import os, signal, sys, time
import numpy as np
from ustad.checkpointing import Checkpointer

directory = sys.argv[1]
checkpointer = Checkpointer(directory)
checkpointer.save(1, {"x": np.arange(10.0)}, {"step": 1})
checkpointer.wait()
checkpointer.save(2, {"x": np.ones((2000, 4000))}, {"step": 2})  # 64 MB, written async
while not any(".orbax-checkpoint-tmp" in name for name in os.listdir(directory)):
    time.sleep(0.001)
os.kill(os.getpid(), signal.SIGKILL)  # kill -9 while step 2 is being written
"""


def test_a_kill_mid_save_leaves_no_half_written_checkpoint(tmp_path):
    import subprocess
    import sys

    directory = tmp_path / "checkpoints"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_MID_SAVE, str(directory)], env=env, capture_output=True
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2.orbax-checkpoint-tmp"]
    with Checkpointer(directory) as checkpointer:
        assert checkpointer.all_steps() == [1]  # the unfinished step is not a checkpoint
        step, state, meta = checkpointer.restore_latest()
        assert step == 1 and meta == {"step": 1}
        np.testing.assert_array_equal(state["x"], np.arange(10.0))
        checkpointer.save(2, {"x": np.arange(3.0)}, {"step": 2})  # the resumed run saves again
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]


def test_an_interrupted_output_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import ustad.io

    path = atomic_write(tmp_path / "scores.csv", b"path,score\nold,1\n")

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ustad.io.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, b"path,score\nnew,2\n")
    assert path.read_bytes() == b"path,score\nold,1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["scores.csv"]
