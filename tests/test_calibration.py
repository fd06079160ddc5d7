"""ustad.calibration: thresholds from good images only, checked against their definitions."""

import json
import math

import numpy as np
import pytest

from ustad import calibration as cal
from ustad import calibration_files as cal_files
from ustad import decisions
from ustad.evaluation.operating_point import f1_max, image_operating_point, pixel_operating_point


def _good(n, seed=0, size=8):
    rng = np.random.default_rng(seed)
    maps = rng.gamma(2.0, 1.0, (n, size, size)).astype(np.float32)
    return maps.reshape(n, -1).max(axis=1), maps


def test_required_good_images_is_the_conformal_minimum():
    assert cal.required_good_images(0.01) == 99
    assert cal.required_good_images(0.05) == 19
    assert cal.required_good_images(0.5) == cal.MIN_GOOD_IMAGES
    for alpha in (0.01, 0.02, 0.05, 0.1):
        n = cal.required_good_images(alpha)
        assert math.ceil((n + 1) * (1 - alpha) - 1e-9) <= n  # the quantile exists
        assert math.ceil(n * (1 - alpha) - 1e-9) > n - 1 or n == cal.MIN_GOOD_IMAGES


@pytest.mark.parametrize("n, alpha", [(99, 0.01), (199, 0.01), (40, 0.05), (7, 0.2)])
def test_threshold_is_the_conformal_order_statistic(n, alpha):
    scores, maps = _good(n)
    result = cal.calibrate(scores, maps, max_fpr=alpha)
    k = math.ceil((n + 1) * (1 - alpha) - 1e-9)
    assert result.image_threshold == pytest.approx(np.sort(scores)[k - 1])
    # The image score is the map's maximum, so the pixel threshold is the same number.
    assert result.pixel_threshold == pytest.approx(result.image_threshold)
    record = result.record()
    assert record["good_images"] == n and record["max_fpr"] == alpha
    assert record["achieved_false_reject_rate"] == pytest.approx(
        np.mean(scores > result.image_threshold)
    )
    assert record["achieved_false_reject_rate"] <= alpha
    dist = record["image_score_distribution"]
    assert dist["mean"] == pytest.approx(scores.mean()) and dist["std"] == pytest.approx(
        scores.std()
    )
    assert dist["quantiles"]["0.5"] == pytest.approx(np.median(scores))
    assert record["pixels"]["mean"] == pytest.approx(maps.mean(), rel=1e-5)


def test_new_good_images_are_rejected_at_most_max_fpr_on_average():
    rng = np.random.default_rng(1)
    rejected = []
    for _ in range(400):
        scores = rng.normal(size=99)
        threshold = cal.conformal_threshold(np.sort(scores), 0.05)
        rejected.append(np.mean(rng.normal(size=200) > threshold))
    assert np.mean(rejected) <= 0.05 + 0.01


def test_too_few_good_images_is_a_named_error():
    scores, maps = _good(2)
    with pytest.raises(cal.TooFewGoodImages, match="2 good images .* at least 99"):
        cal.calibrate(scores, maps, max_fpr=0.01)
    with pytest.raises(cal.TooFewGoodImages):
        cal.calibrate(scores, maps, max_fpr=0.01, coarsen=True)  # below MIN_GOOD_IMAGES
    assert issubclass(cal.TooFewGoodImages, ValueError)
    with pytest.raises(ValueError, match="max_fpr must be"):
        cal.calibrate(*_good(200), max_fpr=0.0)


def test_coarsen_uses_the_smallest_rate_the_images_allow_and_says_so(caplog):
    scores, maps = _good(8)
    result = cal.calibrate(scores, maps, max_fpr=0.01, coarsen=True, source="held-out")
    assert result.max_fpr == pytest.approx(1 / 9) and result.requested_max_fpr == 0.01
    assert result.image_threshold == pytest.approx(scores.max())
    assert result.record()["requested_max_fpr"] == 0.01
    assert "too few for a 0.01 false-reject rate" in caplog.text


def test_normalised_score_is_one_half_exactly_at_the_threshold():
    result = cal.calibrate(*_good(50), max_fpr=0.05)
    t, m = result.image_threshold, result.median
    values = result.normalize([t, m, t + (t - m), -1e9, 1e9])
    assert values[0] == 0.5
    assert values[1] == pytest.approx(0.1) and values[2] == pytest.approx(0.9)
    assert values[3] == 0.0 and values[4] == 1.0
    grid = np.linspace(m - 5, t + 5, 101)
    assert np.all(np.diff(result.normalize(grid)) > 0)
    low, high = result.colour_scale()
    assert (low + high) / 2 == pytest.approx(result.pixel_threshold)


def test_other_rates_and_hand_thresholds():
    scores, maps = _good(100)
    result = cal.calibrate(scores, maps, max_fpr=0.05)
    # k = ⌈101 · 0.99⌉ = 100: the largest of 100 scores.
    assert result.at(0.01).image_threshold == pytest.approx(np.sort(scores)[100 - 1])
    with pytest.raises(cal.TooFewGoodImages):
        result.at(0.001)
    hand = result.with_threshold(float(np.median(scores)))
    assert hand.image_threshold == hand.pixel_threshold == pytest.approx(np.median(scores))
    with pytest.raises(ValueError, match="below every calibration image's score"):
        result.with_threshold(float(scores.min()) - 1)
    with pytest.raises(ValueError, match="finite"):
        result.with_threshold(float("nan"))
    manual = cal.manual_calibration(3.0)
    assert list(manual.normalize([2.0, 3.0, 4.0])) == [0.0, 0.5, 1.0]
    json.dumps(manual.record(), allow_nan=False)


def test_decide_counts_area_and_8_connected_regions():
    result = cal.manual_calibration(0.5)
    maps = np.zeros((2, 6, 6), np.float32)
    maps[0, 0, 0] = maps[0, 1, 1] = 1.0  # diagonal neighbours: one region
    maps[0, 4, 4] = 1.0
    prediction = decisions.decide(maps, maps.reshape(2, -1).max(axis=1), result)
    assert prediction.regions.tolist() == [2, 0] and prediction.defect_area.tolist() == [3, 0]
    assert prediction.is_anomalous.tolist() == [True, False]
    assert decisions.decide(maps, [1.0, 0.0], None).threshold is None


def test_calibration_file_keeps_one_entry_per_models_and_settings(tmp_path):
    workdir = tmp_path / "run"
    settings = {"reduction": "max", "top_k": 100, "smooth_sigma": 0.0}
    first = cal.calibrate(*_good(30), max_fpr=0.1, settings=settings, models=["run"])
    cal_files.write_calibration(workdir, first)
    cal_files.write_calibration(workdir, first)
    other = cal.calibrate(*_good(30, seed=2), max_fpr=0.1, settings=settings | {"top_k": 5},
                          models=["run"])  # fmt: skip
    cal_files.write_calibration(workdir, other)
    entries = json.loads((workdir / cal_files.CALIBRATION_FILE).read_text())["entries"]
    assert len(entries) == 2
    found, why = cal_files.find_calibration([workdir], settings)
    assert found.image_threshold == first.image_threshold and why == ""
    assert found.record() == first.record()
    missing, why = cal_files.find_calibration([workdir], settings | {"reduction": "mean"})
    assert missing is None and "holds no calibration" in why
    (workdir / cal_files.CALIBRATION_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="unreadable calibration"):
        cal_files.find_calibration([workdir], settings)


class _FakeDetector:
    batch_size = 4
    settings = {"reduction": "max", "top_k": 100, "smooth_sigma": 0.0}

    def __init__(self):
        self.calls = []

    def score(self, images):
        self.calls.append(len(images))
        maps = images[..., 0]
        return maps, maps.reshape(len(maps), -1).max(axis=1)


def test_calibrate_workdir_streams_batches_and_writes_the_file(tmp_path):
    rng = np.random.default_rng(0)
    batches = [rng.uniform(size=(4, 8, 8, 3)).astype(np.float32) for _ in range(3)]
    detector = _FakeDetector()
    result = cal_files.calibrate_workdir(tmp_path / "run", detector, iter(batches), max_fpr=0.01)
    assert detector.calls == [4, 4, 4] and result.count == 12
    assert result.requested_max_fpr == 0.01 and result.models == ("run",)
    found, _ = cal_files.find_calibration([tmp_path / "run"], detector.settings)
    assert found.image_threshold == result.image_threshold


def _brute_f1(scores, labels, threshold):
    flagged = scores > threshold
    tp = np.sum(flagged & labels)
    return 2 * tp / (2 * tp + np.sum(flagged & ~labels) + np.sum(~flagged & labels))


def test_f1_max_equals_a_brute_force_search():
    rng = np.random.default_rng(3)
    for _ in range(20):
        scores = np.round(rng.normal(size=15), 1)
        labels = rng.uniform(size=15) < 0.4
        if not labels.any():
            continue
        best = max(_brute_f1(scores, labels, t) for t in np.append(scores, scores.min() - 1))
        oracle = f1_max(scores, labels)
        assert oracle["f1"] == pytest.approx(best) and oracle["uses_test_labels"]
        assert _brute_f1(scores, labels, oracle["threshold"]) == pytest.approx(best)


def test_image_and_pixel_operating_points():
    point = image_operating_point([0.1, 0.9, 0.8, 0.2], [0, 1, 0, 1], 0.5)
    assert (point["tp"], point["fp"], point["fn"], point["tn"]) == (1, 1, 1, 1)
    assert point["false_reject_rate"] == 0.5 and point["miss_rate"] == 0.5
    assert image_operating_point([0.1], [0], 0.5)["miss_rate"] is None
    maps = np.array([[[0.0, 1.0], [1.0, 0.0]]])
    masks = np.array([[[False, True], [False, False]]])
    pixels = pixel_operating_point(maps, masks, 0.5)
    assert pixels["pixel_iou"] == 0.5 and pixels["pixel_f1"] == pytest.approx(2 / 3)
