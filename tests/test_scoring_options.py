"""Scoring options off by default (not in the paper): Gaussian smoothing and top-k image scores."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from ustad.cli import main as cli
from ustad.detector import reduce_maps, smooth_maps
from ustad.ensemble import ScoreNormalization
from ustad.evaluation.reports import image_scores_from_maps
from ustad.score_files import score_files
from ustad.uninformed_students.checkpoints import ScaleModel
from ustad.uninformed_students.nets import patch_net
from ustad.uninformed_students.score import Detector

KEY = functools.partial(jax.random.key, impl="rbg")
NETWORK = patch_net(17, widths=1 / 16, out_dim=8)
SIZE = 20


@pytest.fixture(scope="module")
def scale():
    sample = jnp.zeros((1, 17, 17, 3))

    @jax.jit  # one compiled program: eager init is slow
    def init(key):
        keys = jax.random.split(key, 4)
        return NETWORK.init(keys[0], sample), jax.vmap(lambda k: NETWORK.init(k, sample))(keys[1:])

    teacher, students = init(KEY(0))
    params = {"teacher": teacher, "students": students, "mean": jnp.zeros(8), "std": jnp.ones(8)}
    norm = ScoreNormalization(0.5, 0.2, 0.1, 0.05)
    return ScaleModel(NETWORK, jax.tree.map(np.asarray, params), norm, (SIZE, SIZE), 3)


def _images(n=3, seed=1):
    return np.random.default_rng(seed).uniform(size=(n, SIZE, SIZE, 3)).astype(np.float32)


def test_smoothing_is_scipys_gaussian_per_map_and_zero_is_identity():
    maps = np.random.default_rng(0).normal(size=(3, 12, 9)).astype(np.float32)
    for sigma in (0.5, 2.0, 8.0):  # 8: a kernel wider than the map (reflected again)
        expected = np.stack([ndimage.gaussian_filter(m.astype(np.float64), sigma) for m in maps])
        np.testing.assert_allclose(smooth_maps(maps, sigma), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(smooth_maps(maps, 0), maps)
    # Images do not bleed into each other, and a constant map stays constant.
    spike = np.zeros((2, 11, 11), np.float32)
    spike[0, 5, 5] = 1.0
    smoothed = smooth_maps(spike, 2.0)
    assert smoothed[1].max() == 0 and smoothed[0].argmax() == 5 * 11 + 5
    np.testing.assert_allclose(smoothed[0].sum(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(smooth_maps(np.full((1, 7, 5), 3.0), 4.0), 3.0, rtol=1e-6)


def test_topk_image_score_is_the_mean_of_the_k_highest_pixels():
    maps = np.random.default_rng(2).normal(size=(4, 6, 7))
    flat = np.sort(maps.reshape(4, -1), axis=1)[:, ::-1]
    for k in (1, 5, 42, 1000):  # 1000 > H·W: clipped to every pixel
        expected = flat[:, : min(k, 42)].mean(axis=1)
        np.testing.assert_allclose(image_scores_from_maps(maps, "topk", k), expected, rtol=1e-12)
        got = reduce_maps(jnp.asarray(maps, jnp.float32), "topk", k)
        np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_array_equal(image_scores_from_maps(maps), flat[:, 0])
    np.testing.assert_allclose(image_scores_from_maps(maps, "topk", 1), flat[:, 0])
    np.testing.assert_allclose(image_scores_from_maps(maps, "mean"), maps.mean(axis=(1, 2)))


def test_detector_smooths_the_averaged_map_then_reduces_it(scale):
    images = _images()
    plain_maps, plain_scores = Detector([scale, scale]).score(images)
    np.testing.assert_allclose(plain_scores, plain_maps.reshape(3, -1).max(1), rtol=1e-6)
    detector = Detector([scale, scale], smooth_sigma=2.0, reduction="topk", top_k=10)
    maps, scores = detector.score(images)
    np.testing.assert_allclose(maps, smooth_maps(plain_maps, 2.0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scores, image_scores_from_maps(maps, "topk", 10), rtol=1e-5)
    assert detector.settings == {"reduction": "topk", "top_k": 10, "smooth_sigma": 2.0}
    assert Detector([scale]).settings == {"reduction": "max", "top_k": 100, "smooth_sigma": 0.0}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"smooth_sigma": -1.0}, "smooth_sigma must be ≥ 0"),
        ({"smooth_sigma": float("nan")}, "smooth_sigma must be a finite number"),
        ({"top_k": 0}, "top_k must be an integer ≥ 1"),
        ({"top_k": 2.5}, "top_k must be an integer ≥ 1"),
        ({"reduction": "median"}, "reduction must be one of"),
    ],
)
def test_bad_options_are_refused_by_name(scale, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Detector([scale], **kwargs)
    with pytest.raises(ValueError, match=message):
        if "smooth_sigma" in kwargs:
            smooth_maps(np.zeros((1, 4, 4)), kwargs["smooth_sigma"])
        else:
            image_scores_from_maps(np.zeros((1, 4, 4)), **kwargs)


def test_reduce_maps_refuses_k_below_one():
    with pytest.raises(ValueError, match="top_k must be an integer ≥ 1"):
        reduce_maps(jnp.zeros((1, 4, 4)), "topk", 0)


def test_score_files_records_the_options(scale, tmp_path):
    from ustad.data.images import to_uint8, write_png

    paths = []
    for i, image in enumerate(_images(2)):
        paths.append(tmp_path / "in" / f"{i}.png")
        write_png(paths[-1], to_uint8(image))
    detector = Detector([scale], smooth_sigma=1.5, reduction="topk", top_k=7)
    _, scores, _ = score_files(detector, paths, tmp_path / "out", settings=detector.settings)
    record = json.loads((tmp_path / "out" / "scoring.json").read_text())
    assert record["smooth_sigma"] == 1.5 and record["reduction"] == "topk" and record["top_k"] == 7
    assert record["images"] == 2
    rows = (tmp_path / "out" / "scores.csv").read_text().splitlines()
    assert rows[0] == "path,score" and len(rows) == 3


def _one_image(tmp_path):
    from ustad.data.images import to_uint8, write_png

    write_png(tmp_path / "x.png", to_uint8(_images(1)[0]))
    return tmp_path / "x.png"


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--smooth_sigma=-2", "smooth_sigma must be ≥ 0"),
        ("--top_k=0", "top_k must be an integer ≥ 1"),
    ],
)
def test_cli_refuses_bad_options_before_loading_anything(tmp_path, capsys, flag, message):
    image = _one_image(tmp_path)
    missing = tmp_path / "no_students"
    args = [f"--workdirs={missing}", f"--images={image}", f"--out={tmp_path / 'o'}", flag]
    assert cli.main(["ustad", "score", *args]) == 1
    assert message in capsys.readouterr().err
    args = [f"--workdirs={missing}", f"--out={tmp_path / 'm.jaxexport'}", flag]
    assert cli.main(["ustad", "export", *args]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.jaxexport").exists()


def test_export_does_not_smooth_and_says_so(tmp_path, capsys):
    args = [f"--workdirs={tmp_path}", f"--out={tmp_path / 'm.onnx'}", "--smooth_sigma=2"]
    assert cli.main(["ustad", "export", *args]) == 1
    assert "exported models score without smoothing" in capsys.readouterr().err


def test_score_with_an_exported_model_refuses_the_options(tmp_path, capsys):
    image = _one_image(tmp_path)
    for flag in ("--smooth_sigma=2", "--reduction=topk"):
        args = [f"--model={tmp_path / 'm.onnx'}", f"--images={image}", f"--out={tmp_path}/o", flag]
        assert cli.main(["ustad", "score", *args]) == 1
        assert "is fixed when it is exported" in capsys.readouterr().err


def test_help_names_the_options(capsys):
    for name in ("score", "evaluate"):
        assert cli.main(["ustad", name, "--help"]) == 0
        assert "--smooth_sigma" in capsys.readouterr().out
