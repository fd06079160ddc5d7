"""Target statistics and anomaly scores against brute-force NumPy definitions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ustad.detector import reduce_maps
from ustad.ensemble import (
    ScoreNormalization,
    normalized_score,
    predictive_variance,
    regression_error,
)
from ustad.stats import (
    Moments,
    batch_moments,
    descriptor_stats,
    empty_moments,
    finalize,
    merge_moments,
)
from ustad.uninformed_students.checkpoints import ScaleModel, find_scale_dirs
from ustad.uninformed_students.dense import dense_apply
from ustad.uninformed_students.maps import compute_normalization
from ustad.uninformed_students.nets import patch_net
from ustad.uninformed_students.score import Detector

KEY = functools.partial(jax.random.key, impl="rbg")  # fast to compile on CPU


def test_streaming_stats_match_two_pass_numpy():
    # A large offset with a small spread: E[x²] − E[x]² in float32 would lose every digit.
    rng = np.random.default_rng(0)
    data = (1000.0 + 0.01 * rng.normal(size=(7, 5, 6, 4)) * np.arange(1, 5)).astype(np.float32)
    total = empty_moments(4)
    for chunk in (data[:1], data[1:4], data[4:]):  # unequal batches
        total = merge_moments(total, jax.jit(batch_moments)(jnp.asarray(chunk)))
    stats = finalize(total)
    flat = data.reshape(-1, 4).astype(np.float64)
    mean = flat.mean(0)
    std = np.sqrt(((flat - mean) ** 2).mean(0))  # two passes, float64
    assert stats.count == flat.shape[0]
    np.testing.assert_allclose(stats.mean, mean, rtol=2e-7)  # float32 resolution
    np.testing.assert_allclose(stats.std, std, rtol=1e-4)


def test_merge_is_order_independent_and_empty_is_neutral():
    rng = np.random.default_rng(1)
    parts = [rng.normal(size=(n, 3)) * 3 + 1 for n in (2, 9, 4)]
    moments = [Moments(len(p), p.mean(0), ((p - p.mean(0)) ** 2).sum(0)) for p in parts]
    forward = merge_moments(merge_moments(moments[0], moments[1]), moments[2])
    backward = merge_moments(moments[2], merge_moments(moments[1], moments[0]))
    for a, b in zip(forward, backward, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    same = merge_moments(empty_moments(3), moments[0])
    np.testing.assert_allclose(same.m2, moments[0].m2)


def test_descriptor_stats_of_a_teacher(scales):
    teacher, variables = scales[0].network, scales[0].params["teacher"]
    images = np.random.default_rng(2).uniform(size=(5, 20, 20, 3)).astype(np.float32)
    describe = lambda v, x: dense_apply(teacher, v, x)  # noqa: E731
    stats = descriptor_stats(describe, variables, images, batch_size=2)
    everything = np.asarray(describe(variables, images), np.float64).reshape(-1, 8)
    np.testing.assert_allclose(stats.mean, everything.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats.std, everything.std(0), rtol=1e-4)


def test_error_and_variance_match_the_papers_formulas():
    rng = np.random.default_rng(3)
    outputs = rng.normal(size=(3, 2, 4, 5, 8)) + 2.0  # [M, N, H, W, D]
    targets = rng.normal(size=(2, 4, 5, 8))
    mixture = outputs.mean(0)
    error = ((mixture - targets) ** 2).sum(-1)
    variance = (outputs**2).sum(-1).mean(0) - (mixture**2).sum(-1)  # paper §5, as printed
    np.testing.assert_allclose(
        regression_error(jnp.asarray(outputs), jnp.asarray(targets)), error, rtol=1e-5
    )
    np.testing.assert_allclose(predictive_variance(jnp.asarray(outputs)), variance, rtol=1e-4)
    norm = ScoreNormalization(1.5, 2.0, 0.5, 0.25)
    expected = (error - 1.5) / 2.0 + (variance - 0.5) / 0.25
    np.testing.assert_allclose(normalized_score(error, variance, norm), expected, rtol=1e-6)


def test_reduce_maps():
    maps = np.random.default_rng(4).normal(size=(3, 6, 7)).astype(np.float32)
    flat = maps.reshape(3, -1)
    np.testing.assert_allclose(reduce_maps(maps, "max"), flat.max(1))
    np.testing.assert_allclose(reduce_maps(maps, "mean"), flat.mean(1), atol=1e-6)
    top5 = np.sort(flat, axis=1)[:, -5:].mean(1)
    np.testing.assert_allclose(reduce_maps(maps, "topk", top_k=5), top5, atol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        reduce_maps(maps, "median")


NORM = ScoreNormalization(1.0, 2.0, 0.1, 0.05)


NETWORK = patch_net(17, widths=1 / 16, out_dim=8)
SAMPLE = jnp.zeros((1, 17, 17, 3))


@jax.jit
def _init(key):
    """Teacher and 3 students, in one compiled program."""
    keys = jax.random.split(key, 4)
    return NETWORK.init(keys[0], SAMPLE), jax.vmap(lambda k: NETWORK.init(k, SAMPLE))(keys[1:])


def _scale(seed, size=20, norm=NORM):
    teacher, students = _init(KEY(seed))
    params = {
        "teacher": teacher,
        "students": students,
        "mean": jnp.full(8, 0.01),
        "std": jnp.full(8, 0.2),
    }
    return ScaleModel(NETWORK, jax.tree.map(np.asarray, params), norm, (size, size), 3)


@pytest.fixture(scope="module")
def scales():
    # Two scales of one architecture (compiled once); p=33's pooling is covered by test_dense.
    return _scale(0), _scale(1, norm=ScoreNormalization(-1.0, 0.5, 0.2, 0.1))


def _brute_force_map(scale, images):
    """The score map from first principles, in NumPy float64."""
    params = scale.params
    targets = np.asarray(dense_apply(scale.network, params["teacher"], images), np.float64)
    targets = (targets - params["mean"]) / params["std"]
    outputs = np.stack(
        [
            np.asarray(
                dense_apply(
                    scale.network, jax.tree.map(lambda x, i=i: x[i], params["students"]), images
                ),
                np.float64,
            )
            for i in range(3)
        ]
    )
    mixture = outputs.mean(0)
    error = ((mixture - targets) ** 2).sum(-1)
    variance = (outputs**2).sum(-1).mean(0) - (mixture**2).sum(-1)
    e_mean, e_std, v_mean, v_std = scale.normalization
    return (error - e_mean) / e_std + (variance - v_mean) / v_std


def test_detector_multiscale_average_equals_brute_force(scales):
    images = np.random.default_rng(5).uniform(size=(3, 20, 20, 3)).astype(np.float32)
    maps, scores = Detector(scales, batch_size=2).score(images)
    expected = (_brute_force_map(scales[0], images) + _brute_force_map(scales[1], images)) / 2
    assert maps.shape == (3, 20, 20) and scores.shape == (3,)
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(scores, expected.reshape(3, -1).max(1), rtol=1e-4, atol=1e-3)
    # The students run one after another (the default on CPU) or batched by vmap: same maps.
    vmapped, _ = Detector(scales, batch_size=2, member_strategy="vmap").score(images)
    np.testing.assert_allclose(vmapped, maps, rtol=1e-5, atol=1e-4)


def test_detector_resizes_inputs_and_returns_maps_at_their_size(scales):
    images = np.random.default_rng(6).uniform(size=(2, 24, 20, 1)).astype(np.float32)
    maps, scores = Detector(scales[:1], reduction="mean").score(images)
    assert maps.shape == (2, 24, 20)
    np.testing.assert_allclose(scores, maps.reshape(2, -1).mean(1), rtol=1e-5)


def test_bfloat16_scoring_is_close(scales):
    images = np.random.default_rng(7).uniform(size=(2, 20, 20, 3)).astype(np.float32)
    maps, _ = Detector(scales[:1]).score(images)
    bf16_maps, _ = Detector(scales[:1], compute_dtype=jnp.bfloat16).score(images)
    assert bf16_maps.dtype == np.float32
    correlation = np.corrcoef(maps.ravel(), bf16_maps.ravel())[0, 1]
    assert correlation > 0.95


def test_normalization_matches_numpy_over_all_pixels(scales):
    scale = scales[0]
    images = np.random.default_rng(8).uniform(size=(3, 20, 20, 3)).astype(np.float32)
    norm = compute_normalization(scale.network, scale.network, scale.params, images, batch_size=2)
    # With this normalisation the mean map over the same images is 0 + 0.
    unit = ScaleModel(scale.network, scale.params, norm, scale.image_size, 3)
    maps = _brute_force_map(unit, images)
    np.testing.assert_allclose(maps.mean(), 0.0, atol=1e-4)
    raw = ScaleModel(scale.network, scale.params, ScoreNormalization(0, 1, 0, 1), (20, 20), 3)
    e_plus_v = _brute_force_map(raw, images)  # e + v: its mean is e_μ + v_μ
    np.testing.assert_allclose(e_plus_v.mean(), norm.error_mean + norm.variance_mean, rtol=1e-4)


def test_scale_folders_of_a_multiscale_run(tmp_path):
    for name in ("p65", "p17", "p33", "other"):
        (tmp_path / name / ("checkpoints" if name != "other" else "x")).mkdir(parents=True)
    assert [d.name for d in find_scale_dirs(tmp_path)] == ["p17", "p33", "p65"]
    assert find_scale_dirs(tmp_path / "p33") == [tmp_path / "p33"]
    with pytest.raises(FileNotFoundError, match="no trained students"):
        find_scale_dirs(tmp_path / "other")


def test_score_command_names_an_unreadable_image(tmp_path, capsys):
    from ustad.cli import main as cli

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    args = ["--workdirs", str(tmp_path), "--images", str(tmp_path / "images")]
    assert cli.main(["ustad", "score", *args, "--out", str(tmp_path / "out")]) == 1
    assert "broken.png" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
