"""Scoring large images by tiles (ustad/tiling.py, MapDetector(tile=True), `--tile`): the layout
covers every pixel, stitching is exact, and both families' tiled maps equal their tiles' own
maps stitched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

import ustad
from ustad import tiling
from ustad.cli import main as cli

DATA = Path(__file__).parent / "data"
WORKDIRS = {"students": DATA / "workdir_students_v1", "stfpm": DATA / "workdir_stfpm_v1"}


@pytest.mark.parametrize("length, tile", [(32, 32), (33, 32), (100, 32), (1130, 256), (460, 256)])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.9])
def test_starts_cover_the_axis_flush_with_the_border(length, tile, overlap):
    starts = tiling.tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] == length - tile
    assert starts == sorted(set(starts))
    covered = np.zeros(length, int)
    for s in starts:
        covered[s : s + tile] += 1
    assert (covered >= 1).all()
    if len(starts) > 1:  # neighbours overlap by at least the fraction asked for
        assert tile - np.diff(starts).max() >= round(overlap * tile)
        # ... and not by a whole stride more (no superfluous tile)
        assert len(starts) == -(-(length - tile) // max(1, tile - round(overlap * tile))) + 1


def test_ball_screw_layout():
    layout = tiling.tile_layout((460, 1130), (256, 256), 0.25)
    assert layout.tops == (0, 102, 204)
    assert layout.lefts == (0, 175, 350, 524, 699, 874)
    assert len(layout) == 18 and layout.margin == (77, 40)  # half the smallest overlaps, 154 and 81


def test_extract_tiles_are_the_image_windows():
    images = np.random.default_rng(0).random((2, 40, 70, 3)).astype(np.float32)
    layout = tiling.tile_layout((40, 70), (32, 32), 0.25)
    tiles = tiling.extract_tiles(images, layout)
    assert tiles.shape == (2 * len(layout), 32, 32, 3)
    for n in range(2):
        for i, (top, left) in enumerate(layout.origins):
            np.testing.assert_array_equal(
                tiles[n * len(layout) + i], images[n, top : top + 32, left : left + 32]
            )


@pytest.mark.parametrize("margin", [None, 0, 3])
def test_stitching_constant_maps_gives_the_constant(margin):
    layout = tiling.tile_layout((50, 90), (32, 32), 0.3, margin=margin)
    maps = np.full((3 * len(layout), 32, 32), 2.5, np.float32)
    np.testing.assert_array_equal(tiling.stitch(maps, layout), np.full((3, 50, 90), 2.5))


@pytest.mark.parametrize("overlap", [0.0, 0.4])
def test_stitching_the_images_own_tiles_gives_the_image(overlap):
    image = np.random.default_rng(1).random((2, 45, 77)).astype(np.float32)
    layout = tiling.tile_layout((45, 77), (16, 16), overlap)
    np.testing.assert_allclose(
        tiling.stitch(tiling.extract_tiles(image, layout), layout), image, rtol=1e-6
    )


def _box_filter(maps, radius):
    """A translation-equivariant map (zero-padded at the borders), receptive field ± radius."""
    size = 2 * radius + 1
    return ndimage.uniform_filter(maps, size=(1, size, size), mode="constant", cval=0.0)


@pytest.mark.parametrize("radius", [1, 3, 6])
def test_stitched_equivariant_map_equals_the_whole_images_map(radius):
    """With the default margin (half the overlap ≥ the receptive field) the stitched map of a
    zero-padded translation-equivariant function is the whole image's, everywhere."""
    image = np.random.default_rng(2).random((2, 60, 100)).astype(np.float64)
    layout = tiling.tile_layout((60, 100), (32, 32), 0.4)
    assert min(layout.margin) >= radius
    tiles = tiling.extract_tiles(image, layout)
    stitched = tiling.stitch(_box_filter(tiles, radius), layout)
    np.testing.assert_allclose(stitched, _box_filter(image, radius), rtol=1e-5, atol=1e-6)
    # The plain mean over overlaps keeps the tiles' edge artefacts: exact only in the interior.
    plain = tiling.tile_layout((60, 100), (32, 32), 0.4, margin=0)
    mean = tiling.stitch(_box_filter(tiling.extract_tiles(image, plain), radius), plain)
    assert not np.allclose(mean, _box_filter(image, radius), atol=1e-4)


def test_layout_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"image 100×80 \(H×W\) is smaller than the 128×128 tile"):
        tiling.tile_layout((100, 80), (128, 128))
    for bad in (1.0, -0.1, float("nan"), "0.2", True):
        with pytest.raises(ValueError, match="overlap must be a fraction of the tile in"):
            tiling.tile_layout((200, 200), (128, 128), bad)
    with pytest.raises(ValueError, match="margin 40 is more than half"):
        tiling.tile_layout((200, 200), (128, 128), 0.25, margin=40)
    with pytest.raises(ValueError, match=r"\(H×W, a/b.png\) is smaller than the 32×32 tile"):
        tiling.check_tiles_fit([(64, 64), (20, 40)], ["a/a.png", "a/b.png"], [(32, 32)])


@pytest.fixture(scope="module", params=["students", "stfpm"])
def family(request):
    return request.param


def test_a_tile_sized_image_scores_as_without_tiling(family):
    images = np.random.default_rng(3).random((2, 32, 32, 3)).astype(np.float32)
    whole = ustad.load_detector(WORKDIRS[family])
    tiled = ustad.load_detector(WORKDIRS[family], tile=True)
    assert tiled.input_sizes == [(32, 32)]
    for a, b in zip(whole.score(images), tiled.score(images), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("models", [1, 2])
def test_tiled_map_is_the_tiles_maps_stitched(family, models):
    """Both families, one model and two averaged: the map of a 40×75 image by tiles is each
    tile scored alone (at the training size, so no resizing) and stitched; the image score is
    the stitched map's maximum."""
    workdirs = [WORKDIRS[family]] * models
    image = np.random.default_rng(4).random((1, 40, 75, 3)).astype(np.float32)
    detector = ustad.load_detector(workdirs, tile=True, tile_overlap=0.5)
    maps, scores = detector.score(image)
    layout = tiling.tile_layout((40, 75), (32, 32), 0.5)
    tile_maps, _ = ustad.load_detector(workdirs).score(tiling.extract_tiles(image, layout))
    expected = tiling.stitch(tile_maps, layout)
    assert maps.shape == (1, 40, 75)
    np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores, expected.reshape(1, -1).max(axis=1), rtol=1e-6)
    assert detector.settings["tile"] == {"overlap": 0.5}
    assert "tile" not in ustad.load_detector(workdirs).settings


def test_detector_refuses_small_images_and_bad_options(family):
    detector = ustad.load_detector(WORKDIRS[family], tile=True)
    with pytest.raises(ValueError, match=r"image 20×40 \(H×W\) is smaller than the 32×32 tile"):
        detector.score(np.zeros((1, 20, 40, 3), np.float32))
    with pytest.raises(ValueError, match="overlap must be a fraction"):
        ustad.load_detector(WORKDIRS[family], tile=True, tile_overlap=1.5)


def _write_images(folder: Path, sizes, seed=0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        pixels = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    return folder


def _copy_workdir(tmp_path, family):
    import shutil

    return Path(shutil.copytree(WORKDIRS[family], tmp_path / family))


def test_score_tile_refuses_a_small_image_and_writes_nothing(tmp_path, capsys):
    images = _write_images(tmp_path / "images", [(48, 64), (20, 40)])
    out = tmp_path / "out"
    code = cli.main(["ustad", "score", f"--workdirs={WORKDIRS['students']}",
                     f"--images={images}", f"--out={out}", "--tile"])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "image 20×40 (H×W, " in err and "01.png) is smaller than the 32×32 tile" in err
    assert not out.exists() or not any(out.iterdir())


def test_score_tile_overlap_needs_tile(tmp_path, capsys):
    images = _write_images(tmp_path / "images", [(48, 64)])
    code = cli.main(["ustad", "score", f"--workdirs={WORKDIRS['stfpm']}", f"--images={images}",
                     f"--out={tmp_path / 'out'}", "--tile_overlap=0.5"])  # fmt: skip
    assert code == 1 and "--tile_overlap applies to tiled scoring only" in capsys.readouterr().err


def test_calibration_holds_for_the_tiling_it_was_made_with(tmp_path, capsys):
    """A workdir calibrated on resized images does not decide on tiled maps (the run says
    why and writes scores only); `calibrate --tile` files a tiled calibration that
    `score --tile` then decides with, recorded in scoring.json."""
    workdir = _copy_workdir(tmp_path, "stfpm")
    good = _write_images(tmp_path / "good", [(40, 56)] * 20, seed=1)
    images = _write_images(tmp_path / "images", [(40, 56), (64, 48)], seed=2)
    assert cli.main(["ustad", "calibrate", f"--workdirs={workdir}", f"--good={good}",
                     "--max_fpr=0.1"]) == 0  # fmt: skip
    score = ["ustad", "score", f"--workdirs={workdir}", f"--images={images}", "--tile"]
    assert cli.main([*score, f"--out={tmp_path / 'a'}"]) == 0
    printed = capsys.readouterr().out
    assert (
        "calibrated on images scored resized to the model's size, these are scored by "
        "tiles (overlap 0.25)"
        in printed
        and "ustad calibrate --good <folder> --tile" in printed
    )
    assert json.loads((tmp_path / "a" / "scoring.json").read_text())["tile"] == {"overlap": 0.25}
    code = cli.main([*score, f"--out={tmp_path / 'b'}", "--fail_on_anomaly"])
    assert code == 1  # no thresholds for tiled maps: refused, not silently decided

    assert cli.main(["ustad", "calibrate", f"--workdirs={workdir}", f"--good={good}",
                     "--max_fpr=0.1", "--tile"]) == 0  # fmt: skip
    entries = json.loads((workdir / "calibration.json").read_text())["entries"]
    assert sorted("tile" in e["settings"] for e in entries) == [False, True]
    assert cli.main([*score, f"--out={tmp_path / 'c'}"]) == 0
    assert "anomalous (threshold" in capsys.readouterr().out
    rows = (tmp_path / "c" / "scores.csv").read_text().splitlines()
    assert "is_anomalous" in rows[0] and len(rows) == 3
    record = json.loads((tmp_path / "c" / "scoring.json").read_text())
    assert record["calibration"]["settings"]["tile"] == {"overlap": 0.25}


def test_random_crops_are_windows_drawn_from_the_seed_and_step():
    images = np.random.default_rng(5).random((4, 40, 56, 3)).astype(np.float32)
    crops = tiling.random_crops(images, (32, 32), seed=0, step=7)
    assert crops.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(crops, tiling.random_crops(images, (32, 32), seed=0, step=7))
    assert not np.array_equal(crops, tiling.random_crops(images, (32, 32), seed=0, step=8))
    for crop, image in zip(crops, images, strict=True):  # each crop is a window of its image
        found = [
            (t, left)
            for t in range(9)
            for left in range(25)
            if np.array_equal(crop, image[t : t + 32, left : left + 32])
        ]
        assert len(found) == 1
    with pytest.raises(ValueError, match=r"train_tiles: the training images are 40×56 \(H×W\), "
                       r"smaller than the 48×48 tile"):  # fmt: skip
        tiling.random_crops(images, (48, 48), seed=0, step=0)


def _tile_config(family):
    from ustad.stfpm.config import stfpm_config
    from ustad.uninformed_students.config import students_config

    config = (stfpm_config if family == "stfpm" else students_config)("smoke")
    config.train_tiles, config.epochs, config.batch_size = True, 1, 2
    config.prng_impl = "rbg"  # fast to compile on XLA:CPU
    config.val_min_images = 2
    return config


def test_training_on_tiles(tmp_path, family):
    """Both families: native-size images, the model's size is the tile's, an epoch is N // B
    updates as for whole images, and the held-out images are validated and normalised as
    tiles of the scoring layout."""
    from ustad.checkpointing import workdir_metadata

    images = np.random.default_rng(6).random((10, 40, 56, 3)).astype(np.float32)
    if family == "stfpm":
        from ustad.stfpm.train import train_stfpm

        model = train_stfpm(_tile_config(family), tmp_path, images)
    else:
        from ustad.uninformed_students.train import train_students

        model = train_students(_tile_config(family), tmp_path, images)
    assert tuple(model.image_size) == (32, 32)
    meta = workdir_metadata(tmp_path)
    assert meta["image_size"] == [32, 32]
    tiles = len(tiling.tile_layout((40, 56), (32, 32)))  # 4 per held-out image
    held, rest = divmod(meta["normalization_images"], tiles)
    assert rest == 0 and 2 <= held <= 3
    assert meta["total_steps"] == (10 - held) // 2  # one epoch of pairs, as for whole images
    # Scored by tiles, a training-size image is one tile: the same as without tiling.
    image = images[:1, :32, :32]
    from ustad.families import detector_for as detector

    a = detector(family_name(family), [model]).score(image)[0]
    b = detector(family_name(family), [model], tile=True).score(image)[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def family_name(family):
    return "stfpm" if family == "stfpm" else "uninformed_students"


def test_a_calibration_by_tiles_does_not_decide_resized_maps(tmp_path):
    from ustad.calibration import calibrate
    from ustad.calibration_files import find_calibration, model_names, write_calibration

    rng = np.random.default_rng(7)
    settings = {"reduction": "max", "top_k": 100, "smooth_sigma": 0.0}
    tiled = dict(settings, tile={"overlap": 0.25})
    workdir = tmp_path / "wd"
    workdir.mkdir()
    made = calibrate(rng.random(30), rng.random((30, 8, 8)), max_fpr=0.1,
                     settings=tiled, models=model_names([workdir]))  # fmt: skip
    write_calibration(workdir, made)
    found, why = find_calibration([workdir], tiled)
    assert found is not None and found.image_threshold == made.image_threshold
    found, why = find_calibration([workdir], settings)
    assert found is None
    assert "calibrated on images scored by tiles (overlap 0.25), these are scored resized" in why
    assert "or score with --tile --tile_overlap=0.25" in why
    found, why = find_calibration([workdir], dict(settings, tile={"overlap": 0.5}))
    assert found is None and "ustad calibrate --good <folder> --tile --tile_overlap=0.5" in why
