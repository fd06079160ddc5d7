"""Non-square images (issue 12, item 7): ``image_size`` takes ``(H, W)``, ``keep_aspect`` keeps
the aspect ratio, squashing it by more than 1.5× warns how to keep it, and maps come back at the
input's own size."""

import logging

import numpy as np
import pytest
from absl import flags
from PIL import Image
from test_bad_inputs import _config

from ustad.cli import main as cli
from ustad.cli.common import config_flag, rewrite_config_args
from ustad.data.images import as_size, aspect_change, fit_size, write_png
from ustad.data.mvtec import load_mvtec_category, load_mvtec_train
from ustad.data.synthetic import make_synthetic_category
from ustad.overlays import overlay_size
from ustad.uninformed_students.inputs import check_image_size, size_multiple
from ustad.uninformed_students.nets import patch_net
from ustad.uninformed_students.score import Detector
from ustad.uninformed_students.train import train_and_evaluate

NATIVE = (24, 36)  # H × W of the tiny non-square category
SHORT = 16  # its short side after keep_aspect: 16 × 24 (p = 17: stride 1)


def _parse(*overrides):
    """``configs/students.py:smoke`` as ``ustad train-students`` parses it."""
    argv = ["ustad train-students", "--config=configs/students.py:smoke", *overrides]
    argv = [argv[0], *rewrite_config_args(argv[1:])]
    fv = flags.FlagValues()
    config_flag(fv, argv, "", "config")
    fv(argv)
    return fv["config"].value


def test_image_size_takes_an_int_or_a_pair_on_the_command_line():
    assert _parse("--config.image_size=48").image_size == 48
    config = _parse("--config.image_size=(16, 24)", "--config.keep_aspect=True")
    assert as_size(config.image_size) == (16, 24) and config.keep_aspect is True
    assert _parse().keep_aspect == "auto"  # non-square training images keep their aspect
    assert _parse("--config.keep_aspect=False").keep_aspect is False
    with pytest.raises(ValueError, match=r"got 'big' \(--config.image_size=256 or"):
        as_size(_parse("--config.image_size=big").image_size)


def test_keep_aspect_resizes_the_short_side_and_rounds_to_the_stride():
    assert fit_size((460, 1130), 256, keep_aspect=True, multiple=8) == (256, 632)
    assert fit_size((1600, 1200), 256, keep_aspect=True, multiple=8) == (344, 256)
    assert fit_size((1200, 1600), 250, keep_aspect=True, multiple=8) == (248, 336)
    assert fit_size((460, 1130), (256, 320)) == (256, 320)
    assert fit_size((460, 1130), 256) == (256, 256)
    with pytest.raises(ValueError, match="keep_aspect=True .* must then be one int"):
        fit_size((460, 1130), (256, 320), keep_aspect=True)
    assert size_multiple((17,)) == 1 and size_multiple((33,)) == 4
    assert size_multiple((17, 33, 65)) == 8
    assert aspect_change((460, 1130), (256, 256)) == pytest.approx(1130 / 460)
    # A pair that is not a multiple of the stride: the suggestion is quoted for the shell.
    with pytest.raises(ValueError, match=r"18×30 .*--config.image_size='\(20, 32\)'"):
        check_image_size((18, 30), patch_net(33, widths=1 / 16, out_dim=8))


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _category(root, sizes):
    rng = np.random.default_rng(0)
    for i, (height, width) in enumerate(sizes):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        write_png(root / "wide" / "train" / "good" / f"{i:03d}.png", pixels)


def test_squashing_by_more_than_1_5x_warns_how_to_keep_the_aspect(tmp_path, caplog):
    _category(tmp_path, [(16, 40)] * 3 + [(16, 32)])
    with caplog.at_level(logging.WARNING, logger="ustad"):
        images, _ = load_mvtec_train(tmp_path, "wide", image_size=16)
    assert images.shape == (4, 16, 16, 3)
    (message,) = _warnings(caplog)
    assert "4 of 4 images are resized to 16×16" in message
    assert "aspect ratio by up to 2.50×" in message and "000.png, 16×40" in message
    assert "--config.keep_aspect=True" in message and "--config.image_size='(16, 40)'" in message
    caplog.clear()
    # keep_aspect: the most common shape sets the size; the 16×32 image (1.25×) stays quiet.
    with caplog.at_level(logging.WARNING, logger="ustad"):
        images, _ = load_mvtec_train(tmp_path, "wide", image_size=8, keep_aspect=True, multiple=4)
        same, _ = load_mvtec_train(tmp_path, "wide", image_size=(8, 20))
    assert images.shape == (4, 8, 20, 3) and not _warnings(caplog)
    np.testing.assert_array_equal(images, same)
    # One portrait image among landscapes: one size cannot keep both, and the warning says so.
    write_png(tmp_path / "wide" / "train" / "good" / "004.png", np.zeros((40, 16, 3), np.uint8))
    with caplog.at_level(logging.WARNING, logger="ustad"):
        load_mvtec_train(tmp_path, "wide", image_size=8, keep_aspect=True, multiple=4)
    (message,) = _warnings(caplog)
    assert "1 of 5 images are resized to 8×20" in message and "004.png, 40×16" in message
    assert "keep_aspect=True keeps the most common shape only" in message


def test_keep_aspect_train_score_and_maps_at_the_inputs_size(tmp_path, capsys, caplog):
    data = tmp_path / "data"
    make_synthetic_category(
        data, "tiny", image_size=NATIVE, num_train=8, num_test_good=1, num_test_per_defect=1
    )
    config = _config(data_dir=str(data), category="tiny", image_size=SHORT, epochs=1)
    config.keep_aspect = True
    (scale,) = train_and_evaluate(config, tmp_path / "run")
    assert scale.image_size == (16, 24)
    # The same run asked for by its (H, W): the same images, so the finished model comes back.
    config = _config(data_dir=str(data), category="tiny", image_size=(16, 24), epochs=1)
    assert train_and_evaluate(config, tmp_path / "run")[0].image_size == (16, 24)

    test = load_mvtec_category(data, "tiny", image_size=SHORT, keep_aspect=True)
    assert test.test_images.shape[1:3] == (16, 24) and test.test_masks.shape[1:] == (16, 24)

    detector = Detector.load(tmp_path / "run", batch_size=2)
    native = np.random.default_rng(1).uniform(size=(2, *NATIVE, 3)).astype(np.float32)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ustad"):
        maps, scores = detector.score(native)
    assert maps.shape == (2, *NATIVE) and scores.shape == (2,) and not _warnings(caplog)
    # Transposed images would be squashed 2.25×: scored, with a warning that says how to keep it.
    with caplog.at_level(logging.WARNING, logger="ustad"):
        maps, _ = detector.score(native.transpose(0, 2, 1, 3))
    assert maps.shape == (2, 36, 24)
    (message,) = _warnings(caplog)
    assert "36×24 (H×W) are scored at the model's training size 16×24" in message
    assert "2.25×" in message and "--config.keep_aspect=True" in message

    # `ustad score`: every map, overlay and score at its image's own size.
    images = sorted((data / "tiny" / "test").rglob("*.png"))
    out = tmp_path / "maps"
    args = [f"--workdirs={tmp_path / 'run'}", f"--images={data / 'tiny' / 'test'}/*/*.png"]
    assert cli.main(["ustad", "score", *args, f"--out={out}", "--batch_size=2"]) == 0
    assert f"scored {len(images)} images" in capsys.readouterr().out
    for path in images:
        name = path.relative_to(data / "tiny" / "test")
        saved = np.load(out / f"{name}.npz")
        assert saved["anomaly_map"].shape == NATIVE and np.isfinite(saved["anomaly_map"]).all()
        with Image.open(out / f"{name}.overlay.png") as overlay:
            assert overlay.size == overlay_size(*NATIVE)
