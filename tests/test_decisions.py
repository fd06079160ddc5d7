"""``ustad calibrate`` and ``ustad score`` that decides, on copies of the committed tiny workdirs
(tests/data, smoke-trained on 32² synthetic grass) and synthetic images from the same source."""

import csv
import errno
import json
import shutil

import numpy as np
import pytest
from calibrated_setup import DATA, calibrated_students, run
from PIL import Image

from ustad import calibration as cal
from ustad import calibration_files as cal_files
from ustad import decisions


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("decisions")
    calibrated_students(root, 70, f"--data={root / 'data' / 'synthetic'}")
    shutil.copytree(DATA / "workdir_stfpm_v1", root / "stfpm")
    return root


def _rows(out):
    with open(out / "scores.csv") as f:
        return list(csv.DictReader(f))


def test_calibrate_refuses_too_few_good_images_and_writes_nothing(setup, tmp_path, capsys):
    workdir = tmp_path / "w"
    shutil.copytree(DATA / "workdir_students_v1", workdir)
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted((setup / "good").iterdir())[:2]:
        shutil.copy(path, few / path.name)
    assert run("calibrate", f"--workdirs={workdir}", f"--good={few}") == 1
    assert "2 good images cannot calibrate" in capsys.readouterr().err
    assert not (workdir / cal_files.CALIBRATION_FILE).exists()


def test_calibration_record_says_what_it_used(setup):
    record = json.loads((setup / "students" / cal_files.CALIBRATION_FILE).read_text())["entries"][0]
    assert record["good_images"] == 40 and record["max_fpr"] == 0.05
    assert record["achieved_false_reject_rate"] <= 0.05
    assert set(record["image_score_distribution"]) >= {"count", "mean", "std", "quantiles"}
    labelled = record[cal.LABELLED_KEY]
    assert labelled["f1"] > 0 and "labelled defects" in labelled["note"]


@pytest.mark.parametrize("family", ["students", "stfpm"])
def test_score_decides_with_the_calibration(setup, family, tmp_path, capsys):
    workdir = setup / family
    if family == "stfpm":  # calibrations are family-neutral
        assert run("calibrate", f"--workdirs={workdir}", f"--good={setup / 'good'}",
                   "--max_fpr=0.05") == 0  # fmt: skip
    images = str(setup / "data" / "synthetic" / "test" / "*" / "*.png")
    out = tmp_path / "out"
    assert run("score", f"--workdirs={workdir}", f"--images={images}", f"--out={out}") == 0
    rows = _rows(out)
    anomalous = sum(r["is_anomalous"] == "true" for r in rows)
    assert f"scored {len(rows)} images, {anomalous} anomalous (threshold" in capsys.readouterr().out
    threshold = cal_files.find_calibration([workdir], json.loads((out / "scoring.json").read_text())
                                     ["calibration"]["settings"])[0].image_threshold  # fmt: skip
    from scipy import ndimage

    for row in rows:
        score, norm = float(row["score"]), float(row["normalized_score"])
        assert (row["is_anomalous"] == "true") == (score > float(row["threshold"]))
        assert float(row["threshold"]) == pytest.approx(threshold, rel=1e-5)
        assert (norm > 0.5) == (score > threshold) and 0 <= norm <= 1
        mask = np.asarray(Image.open(out / row["mask"])) > 0
        assert int(row["defect_area_px"]) == mask.sum()
        assert int(row["defect_regions"]) == ndimage.label(mask, np.ones((3, 3)))[1]
        assert np.load(out / row["map"])["anomaly_map"].shape == mask.shape
        # The image score is the map's maximum: a region exactly on anomalous images.
        assert (row["is_anomalous"] == "true") == (int(row["defect_area_px"]) > 0)
    if family == "students":  # the committed students separate these test images
        good = [r for r in rows if "/good/" in r["path"]]
        assert all(r["is_anomalous"] == "false" for r in good)


def test_fail_on_anomaly_exit_codes_and_thresholds_by_hand(setup, tmp_path, capsys):
    workdir = setup / "students"
    good = str(setup / "data" / "synthetic" / "test" / "good")
    scratch = str(setup / "data" / "synthetic" / "test" / "scratch")
    assert run("score", f"--workdirs={workdir}", f"--images={good}", f"--out={tmp_path / 'g'}",
               "--fail_on_anomaly") == 0  # fmt: skip
    assert run("score", f"--workdirs={workdir}", f"--images={scratch}", f"--out={tmp_path / 's'}",
               "--fail_on_anomaly") == 3  # fmt: skip
    assert "2 anomalous" in capsys.readouterr().out
    # A threshold by hand above every score passes them; one below every good score is refused.
    assert run("score", f"--workdirs={workdir}", f"--images={scratch}", f"--out={tmp_path / 'h'}",
               "--fail_on_anomaly", "--threshold=1e6") == 0  # fmt: skip
    assert run("score", f"--workdirs={workdir}", f"--images={good}", f"--out={tmp_path / 'x'}",
               "--threshold=-1e6") == 1  # fmt: skip
    assert "below every calibration image's score" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert run("score", f"--workdirs={workdir}", f"--images={good}", f"--out={tmp_path / 'y'}",
               "--max_fpr=0.01") == 1  # fmt: skip
    assert "at least 99" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_uncalibrated_workdir_scores_only_and_fail_on_anomaly_needs_a_threshold(
    setup, tmp_path, capsys
):
    workdir = tmp_path / "w"
    shutil.copytree(DATA / "workdir_students_v1", workdir)
    images = str(setup / "data" / "synthetic" / "test" / "good")
    assert (
        run("score", f"--workdirs={workdir}", f"--images={images}", f"--out={tmp_path / 'o'}") == 0
    )
    assert "no threshold, scores only" in capsys.readouterr().out
    assert (tmp_path / "o" / "scores.csv").read_text().splitlines()[0] == "path,score"
    assert run("score", f"--workdirs={workdir}", f"--images={images}", f"--out={tmp_path / 'p'}",
               "--fail_on_anomaly") == 1  # fmt: skip
    assert "--fail_on_anomaly needs a calibration" in capsys.readouterr().err


def test_unwritable_output_fails_before_the_model_loads(setup, tmp_path, monkeypatch, capsys):
    from ustad import families, score_files

    def no_write(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded before the output folder was checked")

    monkeypatch.setattr(score_files.tempfile, "mkstemp", no_write)
    monkeypatch.setattr(families, "load_detector", no_load)
    images = str(setup / "data" / "synthetic" / "test" / "good")
    assert run("score", f"--workdirs={setup / 'students'}", f"--images={images}",
               f"--out={tmp_path / 'o'}") == 1  # fmt: skip
    assert "cannot write to" in capsys.readouterr().err


def test_disk_full_is_one_line_and_scores_csv_lists_what_was_done(setup, tmp_path, capsys,
                                                                  monkeypatch):  # fmt: skip
    from ustad import score_files

    real = score_files.atomic_write
    written = []

    def filling_disk(path, data):
        if str(path).endswith(".npz"):
            written.append(path)
            if len(written) == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(score_files, "atomic_write", filling_disk)
    images = str(setup / "data" / "synthetic" / "test" / "good")
    out = tmp_path / "o"
    assert run("score", f"--workdirs={setup / 'students'}", f"--images={images}", f"--out={out}",
               "--batch_size=1") == 1  # fmt: skip
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "disk full" in errors[0] and "2 of 4 images scored" in errors[0]
    assert len(_rows(out)) == 2


def test_images_are_read_one_batch_at_a_time_and_extreme_resizes_warned(
    setup, tmp_path, monkeypatch, caplog
):
    from ustad import image_batches, score_files

    events = []
    real_read = image_batches.read_image
    monkeypatch.setattr(
        image_batches, "read_image", lambda p: events.append("read") or real_read(p)
    )
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(folder / f"{i}.png")
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(folder / "tiny.png")
    from ustad import families

    detector = families.load_detector(setup / "students", batch_size=2)
    real_score = detector.score
    detector.score = lambda images: events.append("score") or real_score(images)
    paths = sorted(folder.iterdir())
    score_files.score_files(detector, paths, tmp_path / "out", calibration=None, vmin=0, vmax=1)
    assert events.count("score") == 6
    # Reading runs at most image_batches.PREFETCH_BATCHES (2) batches ahead of scoring, so of 6
    # batches the last is read after the first is scored: never all images at once.
    assert events.index("score") < len(events) - 1 - events[::-1].index("read")
    assert "resized by more than 8×" in caplog.text and "tiny.png" in caplog.text


def test_overlays_use_the_calibration_scale_so_an_image_looks_the_same_alone(setup, tmp_path):
    workdir = setup / "students"
    test = setup / "data" / "synthetic" / "test"
    alone, together = tmp_path / "alone", tmp_path / "together"
    assert run("score", f"--workdirs={workdir}", f"--images={test / 'good' / '000.png'}",
               f"--out={alone}") == 0  # fmt: skip
    assert run("score", f"--workdirs={workdir}", f"--images={test}/*/*.png",
               f"--out={together}") == 0  # fmt: skip
    a = np.asarray(Image.open(alone / "000.png.overlay.png"))
    b = np.asarray(Image.open(together / "good" / "000.png.overlay.png"))
    np.testing.assert_array_equal(a, b)
    assert a.shape[1] == 2 * a.shape[0] + 64  # image | map | colour bar


def test_float16_maps_are_smaller(setup, tmp_path):
    images = str(setup / "data" / "synthetic" / "test" / "good" / "000.png")
    for dtype in ("float32", "float16"):
        assert run("score", f"--workdirs={setup / 'students'}", f"--images={images}",
                   f"--out={tmp_path / dtype}", f"--map_dtype={dtype}") == 0  # fmt: skip
    small, full = tmp_path / "float16" / "000.png.npz", tmp_path / "float32" / "000.png.npz"
    assert np.load(small)["anomaly_map"].dtype == np.float16
    np.testing.assert_allclose(np.load(small)["anomaly_map"], np.load(full)["anomaly_map"],
                               rtol=1e-3, atol=1e-3)  # fmt: skip


def test_python_api_predict(setup):
    from ustad import families
    from ustad.data.images import read_image

    detector = families.load_detector(setup / "students")
    calibration, _ = cal_files.find_calibration([setup / "students"], detector.settings)
    images = np.stack([read_image(p) for p in sorted((setup / "good").iterdir())[:3]])
    prediction = detector.predict(images, calibration)
    assert isinstance(prediction, decisions.Prediction)
    assert prediction.threshold == calibration.image_threshold
    assert prediction.masks.shape == images.shape[:3]
    np.testing.assert_array_equal(prediction.is_anomalous, prediction.scores > prediction.threshold)
    assert detector.predict(images).threshold is None
