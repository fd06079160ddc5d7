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
from ustad.overlays import overlay_size
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
            assert overlay.size == overlay_size(height, width) and overlay.mode == "RGB"


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


# ------------------------------------------------ issue 25: the front door and the failure paths

REPO = Path(__file__).parents[1]


def _readme_block(containing: str) -> str:
    import re

    blocks = re.findall(r"^```bash\n(.*?)^```", (REPO / "README.md").read_text(), re.M | re.S)
    return next(b.replace("\\\n", " ") for b in blocks if containing in b)


def test_the_mvtec_recipe_passes_its_teacher_on_and_a_missing_one_says_what_exists(
    tmp_path, capsys, monkeypatch
):
    # Item 1: step 2 uses the teacher step 1 trains; p65 itself is not shipped.
    recipe = _readme_block("ustad train-teacher --config=configs/teacher.py:p65")
    assert "--workdir=runs/teacher_p65" in recipe
    assert "--config.teacher_workdir=runs/teacher_p65" in recipe
    monkeypatch.setenv("USTAD_TEACHERS", str(tmp_path / "teachers"))
    args = ["ustad", "train-students", "--config=configs/students.py:p65"]
    args += [f"--workdir={tmp_path / 'run'}", f"--config.data_dir={tmp_path / 'none'}"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "(names: p17_small, p17_small_head, p33, p33_small, p33_small_head, p65_small;" in err  # what exists
    assert "--config=configs/students.py:p65_small" in err  # the shipped one to use
    assert "ustad train-teacher --config=configs/teacher.py:p65 --workdir=runs/teacher_p65" in err
    assert "--config.teacher_workdir=runs/teacher_p65" in err
    assert not (tmp_path / "run").exists()


def test_a_plain_install_trains_and_scores_without_scikit_image(tmp_path):
    # Item 2: `pip install -e .` lacked scikit-image; nothing but synthetic data may need it.
    import subprocess
    import sys

    _train_folder(tmp_path, count=6)
    script = (
        "import sys\n"
        "sys.modules['skimage'] = None\n"  # `import skimage` now raises ImportError
        "sys.modules['sklearn'] = None\n"
        "import ustad.data\n"
        "from ustad.cli import main\n"
        "argv = sys.argv[1:]\n"
        "assert main.main(['ustad', *argv[:argv.index('--')]]) == 0\n"
        "assert main.main(['ustad', *argv[argv.index('--') + 1:]]) == 0\n"
    )
    train = _train_args(tmp_path / "run", tmp_path, "--config.epochs=1", "--config.num_students=1")
    score = ["score", f"--workdirs={tmp_path / 'run'}", f"--images={tmp_path}/tiny/train/good"]
    score += [f"--out={tmp_path / 'maps'}"]
    result = subprocess.run(
        [sys.executable, "-c", script, *train[1:], "--", *score],
        cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "maps" / "scores.csv").is_file()


def test_synthetic_data_without_scikit_image_says_what_to_install(monkeypatch, tmp_path):
    import sys

    from ustad.data import synthetic

    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    synthetic._source.cache_clear()
    with pytest.raises(ImportError, match="pip install scikit-image"):
        synthetic.load_texture("grass")
    synthetic._source.cache_clear()


def test_help_names_both_families(capsys):
    # Item 3.
    assert cli.main(["ustad", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Uninformed Students" in out and "STFPM" in out and "configs/stfpm.py" in out
    stfpm = _readme_block("--config=configs/stfpm.py:cpu")
    assert "ustad evaluate --workdirs=runs/stfpm_bottle" in stfpm
    assert "ustad score --workdirs=runs/stfpm_bottle" in stfpm
    assert "STFPM workdirs cannot be exported yet" in (REPO / "README.md").read_text()


def test_exporting_an_stfpm_workdir_says_it_cannot_yet(tmp_path, capsys):
    workdir = tmp_path / "stfpm"
    shutil.copytree(REPO / "tests" / "data" / "workdir_stfpm_v1", workdir)
    out = tmp_path / "d.jaxexport"
    assert cli.main(["ustad", "export", f"--workdirs={workdir}", f"--out={out}"]) == 1
    err = capsys.readouterr().err
    assert "STFPM workdirs cannot be exported yet" in err and err.count("\n") == 1


def test_progress_off_a_terminal_is_a_line_per_ten_percent_with_rate_and_eta(monkeypatch, caplog):
    # Item 5: under nohup, CI or `> log` training printed nothing.
    import logging

    from ustad import metric_writer

    monkeypatch.delenv("USTAD_PROGRESS", raising=False)
    monkeypatch.setattr(metric_writer.sys.stderr, "isatty", lambda: False, raising=False)
    caplog.set_level(logging.INFO, logger="ustad")
    with metric_writer.progress(200, desc="students p17", unit="img") as bar:
        for _ in range(100):
            bar.update(2)
            bar.set_postfix(loss="0.5")
    lines = [r.getMessage() for r in caplog.records if r.name == "ustad.metric_writer"]
    assert lines[0].startswith("students p17: the first batch took")
    assert 10 <= len(lines) <= 12, lines
    assert "50 % (100/200 img)" in " ".join(lines)
    assert "img/s, ETA" in lines[3] and "loss 0.5" in lines[3]
    assert lines[-1].startswith("students p17: 100 % (200/200 img)")


def test_progress_on_a_terminal_says_it_is_compiling_before_the_first_step(monkeypatch):
    import io

    from ustad import metric_writer

    monkeypatch.setenv("USTAD_PROGRESS", "bar")
    stream = io.StringIO()
    bar = metric_writer.progress(10, desc="students p17", file=stream)
    assert "compiling…" in stream.getvalue()
    bar.update(1)
    bar.refresh()
    assert "compiling" not in stream.getvalue().rsplit("\r", 1)[-1]
    bar.close()
    monkeypatch.setenv("USTAD_PROGRESS", "0")
    with metric_writer.progress(10) as quiet:
        quiet.update(10)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--config.epochs=0", "--config.epochs=0: must be an integer ≥ 1"),
        ("--config.num_students=0", "--config.num_students=0: must be an integer ≥ 1"),
        ("--config.batch_size=0", "--config.batch_size=0: must be an integer ≥ 1"),
        ("--config.batch_size=-2", "--config.batch_size=-2: must be an integer ≥ 1"),
    ],
)
def test_bad_settings_are_refused_before_any_data_is_read(tmp_path, capsys, override, message):
    # Items 6 and 8: once refused after 17–37 s of set-up, or a ZeroDivisionError.
    workdir = tmp_path / "run"
    # No data folder at all: reading data would fail with another message.
    assert cli.main(_train_args(workdir, tmp_path / "nowhere", override)) == 1
    err = capsys.readouterr().err
    assert err == f"ustad: error: {message}\n"
    assert not workdir.exists()


def test_a_changed_setting_on_resume_is_refused_from_the_metadata(trained):
    from ustad.uninformed_students.config import validate

    validate(_config(), str(trained))  # the same settings resume
    with pytest.raises(ValueError, match=r"trained with epochs=2 \(now 3\)"):
        validate(_config(epochs=3), str(trained))
    with pytest.raises(ValueError, match="num_students=2, but this run has 3"):
        validate(_config(num_students=3), str(trained))


def test_stfpm_settings_and_resume_are_validated(tmp_path):
    from ustad.stfpm.config import stfpm_config, validate

    workdir = tmp_path / "stfpm"
    shutil.copytree(REPO / "tests" / "data" / "workdir_stfpm_v1", workdir)
    config = stfpm_config("smoke")
    for name in ("num_students", "epochs", "batch_size"):
        bad = stfpm_config("smoke")
        bad[name] = 0
        with pytest.raises(ValueError, match=f"--config.{name}=0: must be an integer ≥ 1"):
            validate(bad)
    ensemble = stfpm_config("smoke")
    ensemble.score = "error_variance"
    with pytest.raises(ValueError, match="num_students ≥ 2"):
        validate(ensemble)
    from ustad.checkpointing import workdir_metadata

    saved = workdir_metadata(workdir)["config"]
    changed = stfpm_config("smoke")
    changed.learning_rate = saved["learning_rate"] * 10
    with pytest.raises(ValueError, match=r"learning_rate=0.4 \(now 4.0\); use a new --workdir"):
        validate(changed, str(workdir))
    with pytest.raises(ValueError, match="not STFPM"):
        validate(config, str(REPO / "tests" / "data" / "workdir_students_v1"))


def test_command_line_mistakes_are_one_line(tmp_path, capsys):
    # Item 8: each of these printed a traceback.
    base = ["ustad", "train-students", f"--workdir={tmp_path / 'run'}"]
    assert cli.main([*base, "--config=configs/students.py:smoke", "--config.epoch=3"]) == 2
    err = capsys.readouterr().err
    assert "--config.epoch: the config has no field 'epoch'; did you mean --config.epochs?" in err
    assert "Traceback" not in err and err.count("\n") == 2
    assert cli.main([*base, "--config=configs/students.py:p66"]) == 2
    err = capsys.readouterr().err
    assert "unknown config 'p66'; choose p17, p33, p65" in err and "Traceback" not in err
    assert err.count("\n") == 2
    args = ["--workdirs=w", "--images=x.png", "--out=o", "--batch_size=-3"]
    assert cli.main(["ustad", "score", *args]) == 2
    err = capsys.readouterr().err
    assert "--batch_size=-3" in err and "Traceback" not in err


def test_an_internal_error_is_one_line_and_verbose_shows_the_traceback(monkeypatch, capsys):
    from ustad.cli import teachers

    def broken(fv):
        raise TypeError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "teachers", dataclasses_replace(teachers.TEACHERS, broken))
    assert cli.main(["ustad", "teachers"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ustad: internal error: TypeError: a bug (at ") and "--verbose" in err
    with pytest.raises(TypeError, match="a bug"):
        cli.main(["ustad", "teachers", "--verbose"])


def dataclasses_replace(command, run):
    import dataclasses

    return dataclasses.replace(command, run=run)


def test_a_closed_pipe_ends_ustad_teachers_quietly(tmp_path):
    # Item 8: `ustad teachers | head` printed a BrokenPipeError traceback.
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    result = subprocess.run(
        [sys.executable, "-m", "ustad", "teachers"],
        cwd=REPO,
        stdout=write_end,
        stderr=subprocess.PIPE,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        text=True,
        timeout=120,
    )
    os.close(write_end)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr


def test_stray_arguments_from_an_unquoted_glob_are_refused(tmp_path, capsys):
    # Item 11: `--images dir/*.png` unquoted scored only the first file, exit 0.
    args = ["--workdirs=w", "--images", "a.png", "b.png", "c.png", f"--out={tmp_path / 'o'}"]
    assert cli.main(["ustad", "score", *args]) == 2
    err = capsys.readouterr().err
    assert "unexpected arguments 'b.png', 'c.png' (2 in all)" in err
    assert "quote it: --images='dir/*.png'" in err
    assert not (tmp_path / "o").exists()


def test_nan_or_inf_images_are_refused_by_the_detector(trained, data):
    # Item 13: NaN passed the range check and came back as NaN maps and scores.
    images, _ = data
    detector = Detector.load(trained, batch_size=2)
    bad = images[:3].copy()
    bad[1, 2, 3, 0] = np.nan
    bad[2, 0, 0, 1] = np.inf
    with pytest.raises(ValueError, match=r"images \[1, 2\] \(of 3\) hold NaN or inf"):
        detector.score(bad)


def test_nan_images_are_refused_by_an_exported_detector(trained, tmp_path):
    from ustad import deploy

    scales, sources = deploy.load_scales(trained)
    path = tmp_path / "d.jaxexport"
    deploy.export(scales, path, sources=sources, check=False)
    exported = deploy.load(path)
    bad = np.full((1, *exported.image_size, exported.channels), np.nan, np.float32)
    with pytest.raises(ValueError, match="NaN or inf"):
        exported(bad)


def test_a_shipped_teacher_name_is_not_silently_replaced(tmp_path, monkeypatch, capsys):
    # Item 14: `--install p17_small` of another teacher shadowed the shipped one silently.
    from ustad.uninformed_students.teacher import catalog

    installed = tmp_path / "teachers"
    monkeypatch.setenv("USTAD_TEACHERS", str(installed))
    shipped = catalog.shipped_dir() / "p17_small.teacher.npz"
    mine = tmp_path / "mine.teacher.npz"
    shutil.copyfile(shipped, mine)
    args = ["ustad", "teachers", "install", f"--file={mine}", "--name=p17_small"]
    assert cli.main(args) == 1
    assert "'p17_small' is the name of a teacher shipped with ustad" in capsys.readouterr().err
    assert not (installed / "p17_small.teacher.npz").exists()
    # Copied in by hand (no record): ambiguous, refused, and both listed as not loading.
    installed.mkdir()
    shutil.copyfile(mine, installed / "p17_small.teacher.npz")
    with pytest.raises(ValueError, match="both shipped with ustad and installed"):
        catalog.resolve_teacher("p17_small")
    assert cli.main(["ustad", "teachers"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    p17 = [row for row in rows if row[0] == "p17_small"]
    assert [row[6:8] for row in p17] == [["installed", "no"], ["shipped", "no"]]
    # Forced: the installed file wins, and the listing says so.
    assert cli.main([*args, "--force"]) == 0
    capsys.readouterr()
    assert catalog.resolve_teacher("p17_small") == installed / "p17_small.teacher.npz"
    assert cli.main(["ustad", "teachers"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [row[6:8] for row in rows if row[0] == "p17_small"] == [
        ["installed", "yes"],
        ["shipped", "no"],
    ]
    # The SHA-256 recorded at install is checked on load.
    data = bytearray((installed / "p17_small.teacher.npz").read_bytes())
    data[-30] ^= 1
    (installed / "p17_small.teacher.npz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        catalog.load_teacher("p17_small")


def test_a_damaged_final_checkpoint_resumes_and_saves_over_it(tmp_path, caplog, capfd):
    # Item 16: scoring fell back and said "resume training"; resuming then failed with
    # "Checkpoint for step 8 already exists". The warning printed a TensorStore repr, and an
    # emptied manifest 200 lines of event-loop tracebacks.
    directory = tmp_path / "checkpoints"
    state = {"w": np.arange(6, dtype=np.float32)}
    with Checkpointer(directory, async_save=False) as checkpointer:
        checkpointer.save(4, state, {"step": 4})
        checkpointer.save(8, {"w": state["w"] + 1}, {"step": 8})
    manifests = list((directory / "8" / "state").glob("manifest.ocdbt"))
    assert manifests
    for manifest in manifests:
        manifest.write_bytes(b"")
    with Checkpointer(directory, async_save=False) as checkpointer:
        step, restored, _ = checkpointer.restore_latest(state)
        assert step == 4
        checkpointer.save(8, {"w": state["w"] + 2}, {"step": 8})
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0] and "tensorstore" not in warnings[0]
    assert "manifest.ocdbt" in warnings[0] and "falling back to step 4" in warnings[0]
    assert (directory / "8.damaged").is_dir()
    with Checkpointer(directory) as checkpointer:
        step, restored, _ = checkpointer.restore_latest()
    assert step == 8 and np.array_equal(restored["w"], state["w"] + 2)
    assert "Event loop is closed" not in capfd.readouterr().err


def test_a_top_k_beyond_the_maps_pixels_says_it_is_the_mean(caplog):
    # Item 18: --reduction=topk --top_k larger than the map silently became the mean.
    from ustad.detector import reduce_maps

    maps = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 4, 5)), jnp.float32)
    scores = reduce_maps(maps, "topk", 1000)
    np.testing.assert_allclose(scores, maps.mean(axis=(1, 2)), rtol=1e-6)
    (warning,) = [r.getMessage() for r in caplog.records if "--top_k" in r.getMessage()]
    assert "--top_k=1000 is more than the 20 pixels of a 4×5 map" in warning
    assert "mean" in warning
    reduce_maps(maps, "topk", 1000)  # said once per map size
    assert len([r for r in caplog.records if "--top_k" in r.getMessage()]) == 1


def test_evaluate_on_only_good_images_is_refused_not_nan(tmp_path):
    # Item 20: a test set of good images only reported `image AUROC nan`, exit 0.
    from ustad.evaluation.image_report import write_image_report

    scores = {"p17": np.array([0.1, 0.3, 0.2])}
    with pytest.raises(ValueError, match="image AUROC needs both good and defective test"):
        write_image_report(tmp_path / "report", "bottle", scores, [0, 0, 0], ["good"] * 3)
    assert not (tmp_path / "report").exists()


def test_exif_orientation_is_applied(tmp_path):
    # Item 21: maps came back in sensor orientation, not as viewers show the image.
    from PIL import Image

    from ustad.data.images import read_image, read_image_size

    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:5, :10] = 255  # a bright block top-left in sensor order
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # shown rotated 90° clockwise
    path = tmp_path / "camera.jpg"
    image.save(path, exif=exif, quality=95)
    upright = read_image(path)
    assert upright.shape == (40, 20, 3) and read_image_size(path) == (40, 20)
    assert upright[:5, -5:].mean() > 0.9 and upright[-5:, :5].mean() < 0.1


def test_onnx_export_at_another_size_is_one_line_or_works(trained, tmp_path, capsys):
    pytest.importorskip("jax2onnx")
    out = tmp_path / "d.onnx"
    args = ["ustad", "export", f"--workdirs={trained}", f"--out={out}", f"--size={SIZE * 2}"]
    status = cli.main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "jax2onnx" not in err.lower()
    assert (status == 0 and out.is_file()) or (status == 1 and err.count("\n") == 1)


def test_jaxexport_at_another_size_is_checked_and_says_it_resizes_twice(
    trained, data, tmp_path, caplog
):
    import logging

    from ustad import deploy

    scales, sources = deploy.load_scales(trained)
    path = tmp_path / "d.jaxexport"
    meta = deploy.export(scales, path, size=(SIZE * 2, SIZE * 2), sources=sources)
    assert "skipped" not in meta["check"]  # checked against a reference that resizes alike
    with caplog.at_level(logging.WARNING):
        deploy.load(path).score(data[0][:2])  # 16² images: to 32² on the host, 16² inside
    assert any("resized twice" in r.getMessage() for r in caplog.records)
