"""ustad.evaluation.metrics against brute-force definitions, hand-made cases and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from ustad.evaluation import metrics

# --------------------------------------------------------------------------- brute force


def _regions(masks: np.ndarray) -> list[np.ndarray]:
    """Every 8-connected ground-truth region as an `[N, H, W]` bool mask, image by image."""
    regions = []
    for i, mask in enumerate(masks):
        labeled, count = ndimage.label(mask, structure=np.ones((3, 3), int))
        for k in range(1, count + 1):
            region = np.zeros(masks.shape, bool)
            region[i] = labeled == k
            regions.append(region)
    return regions


def _brute_force_pro_curve(maps: np.ndarray, masks: np.ndarray):
    """The definition read literally: one pass over the data per distinct threshold."""
    regions = _regions(masks)
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for threshold in sorted(set(maps.ravel().tolist()), reverse=True):
        positive = maps >= threshold
        fprs.append(positive[normal].sum() / normal.sum())
        pros.append(np.mean([positive[r].sum() / r.sum() for r in regions]))
    return np.array(fprs), np.array(pros)


def _brute_force_area(fprs, pros, limit: float) -> float:
    """Segment-by-segment trapezoid, stopping at `limit` with a linearly interpolated PRO."""
    area = 0.0
    for x0, x1, y0, y1 in zip(fprs[:-1], fprs[1:], pros[:-1], pros[1:], strict=True):
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        elif x0 < limit:
            y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_limit) / 2
            break
        else:
            break
    return area


def _brute_force_au_pro(maps, masks, limit=0.3) -> float:
    return _brute_force_area(*_brute_force_pro_curve(maps, masks), limit) / limit


def _binned_rescaled_au_pro(maps, masks, num_thresholds: int, limit: float = 0.3) -> float:
    """The widely copied variant: evenly spaced thresholds between min and max (`score > t`),
    points with FPR < limit kept, FPR rescaled to [0, 1] by its largest kept value, then the
    area under the kept points."""
    regions = _regions(masks)
    low, high = maps.min(), maps.max()
    points = []
    for threshold in low + (high - low) * np.arange(num_thresholds) / num_thresholds:
        positive = maps > threshold
        fpr = positive[~masks].mean()
        if fpr < limit:
            points.append((fpr, np.mean([positive[r].mean() for r in regions])))
    fprs, pros = np.array(sorted(points)).T
    return skm.auc(fprs / fprs.max(), pros)


def _random_case(seed: int, shape=(4, 7, 9), levels: int | None = None, dtype=np.float64):
    """Small maps (ties when `levels` is set) and blobby masks with a normal-only image."""
    rng = np.random.default_rng(seed)
    if levels is None:
        maps = rng.normal(size=shape).astype(dtype)
    else:
        maps = rng.integers(0, levels, size=shape).astype(dtype)
    masks = ndimage.binary_opening(rng.random(shape) < 0.35, np.ones((1, 2, 1), bool))
    masks[0] = False  # a good image
    masks[1, 0, 0] = True  # at least one region
    masks[1, -1, -1] = False  # at least one normal pixel
    # Anomalous pixels score higher on average so the curve is not trivial.
    maps = maps + (masks * rng.random(shape) * 2).astype(dtype)
    return maps, masks


# --------------------------------------------------------------------------- AU-PRO


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [None, 4, 12])
def test_au_pro_matches_brute_force(seed, levels):
    maps, masks = _random_case(seed, levels=levels)
    fprs, pros = _brute_force_pro_curve(maps, masks)
    value, (curve_fprs, curve_pros) = metrics.au_pro(maps, masks, return_curve=True)
    np.testing.assert_allclose(curve_fprs, fprs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(curve_pros, pros, rtol=0, atol=1e-12)
    for limit in (0.3, 0.05, 1.0):
        expected = _brute_force_area(fprs, pros, limit) / limit
        assert metrics.au_pro(maps, masks, fpr_limit=limit) == pytest.approx(expected, abs=1e-12)


def test_au_pro_float32_ties_are_decided_in_float32():
    maps, masks = _random_case(7, levels=None, dtype=np.float32)
    maps = np.round(maps * 4).astype(np.float32) / np.float32(3)  # many ties, float32 values
    expected = _brute_force_au_pro(maps, masks)
    assert metrics.au_pro(maps, masks) == pytest.approx(expected, abs=1e-12)


def test_pro_curve_thresholds_and_endpoints():
    maps, masks = _random_case(3, levels=5)
    fprs, pros, thresholds = metrics.pro_curve(maps, masks)
    assert thresholds[0] == np.inf
    np.testing.assert_array_equal(thresholds[1:], np.unique(maps)[::-1])
    assert (fprs[0], pros[0], fprs[-1], pros[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fprs) >= 0) and np.all(np.diff(pros) >= 0)


def test_perfect_map_scores_one():
    _, masks = _random_case(0)
    assert metrics.au_pro(masks.astype(float), masks) == pytest.approx(1.0, abs=1e-12)
    assert metrics.pixel_auroc(masks.astype(float), masks) == 1.0


def test_constant_map_is_the_diagonal():
    # One threshold: the curve is (0,0) -> (1,1); the area to 0.3 is 0.3^2/2, i.e. 0.15 after
    # normalisation.
    _, masks = _random_case(1)
    constant = np.full(masks.shape, 0.5)
    assert metrics.au_pro(constant, masks) == pytest.approx(0.15, abs=1e-12)
    assert metrics.au_pro(constant, masks, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)
    assert metrics.pixel_auroc(constant, masks) == 0.5


def test_one_region_by_hand():
    masks = np.array([[[1, 1, 0, 0, 0]]], bool)
    maps = np.array([[[4.0, 2.0, 3.0, 1.0, 0.0]]])
    # Curve: (0,0) (0,.5) (1/3,.5) (1/3,1) (2/3,1) (1,1).
    assert metrics.au_pro(maps, masks) == pytest.approx(0.5, abs=1e-12)
    assert metrics.au_pro(maps, masks, fpr_limit=0.5) == pytest.approx(2 / 3, abs=1e-12)
    assert metrics.au_pro(maps, masks, fpr_limit=1.0) == pytest.approx(5 / 6, abs=1e-12)


def test_regions_weigh_equally_whatever_their_size():
    masks = np.zeros((1, 8, 8), bool)
    masks[0, 0, 0] = True  # region A: 1 pixel
    masks[0, 4:7, 4:7] = True  # region B: 9 pixels
    finds_small = np.where(masks & (np.arange(8)[:, None] < 2), 1.0, 0.0)
    finds_large = np.where(masks & (np.arange(8)[:, None] >= 2), 1.0, 0.0)
    # Either way PRO jumps to 1/2 at FPR 0, then the diagonal to (1,1):
    # area to 0.3 = 0.3 * (0.5 + 0.65) / 2, normalised 0.575. A pixel-weighted overlap would
    # give 0.1 and 0.9 at FPR 0 instead.
    for found in (finds_small, finds_large):
        assert metrics.au_pro(found, masks) == pytest.approx(0.575, abs=1e-12)
    assert metrics.pixel_auroc(finds_small, masks) < metrics.pixel_auroc(finds_large, masks)


def test_regions_are_eight_connected_and_per_image():
    masks = np.zeros((2, 6, 6), bool)
    masks[0, 1, 1] = masks[0, 2, 2] = True  # diagonal neighbours: one region
    masks[0, 4, 5] = True  # a second region
    masks[1, 1, 1] = True  # same position in another image: a third region
    maps = np.zeros(masks.shape)
    maps[0, 1, 1] = 1.0
    # PRO at FPR 0 = (1/2 + 0 + 0) / 3; with 4-connectivity it would be 1/4.
    fprs, pros, _ = metrics.pro_curve(maps, masks)
    assert pros[1] == pytest.approx(1 / 6) and fprs[1] == 0.0


def test_normal_only_image_counts_towards_fpr():
    maps = np.array([[[2.0, 0.0], [0.0, 0.0]], [[3.0, 3.0], [0.0, 0.0]]])
    masks = np.array([[[1, 0], [0, 0]], [[0, 0], [0, 0]]], bool)
    assert metrics.au_pro(maps[:1], masks[:1]) == pytest.approx(1.0)
    # With the good image: 2 of 7 normal pixels outrank the defect, so PRO is 0 until FPR 2/7
    # and 1 after: (0.3 - 2/7) / 0.3 = 1/21.
    assert metrics.au_pro(maps, masks) == pytest.approx(1 / 21, abs=1e-12)
    assert metrics.au_pro(maps, masks) == pytest.approx(_brute_force_au_pro(maps, masks))


def test_binned_rescaled_variant_differs_and_can_inflate():
    # Ten score bins; in each, ten normal pixels score at the top of the bin and one pixel of a
    # ten-pixel defect at the bottom, so the exact curve is a staircase that steps right before
    # it steps up. Evenly spaced thresholds only see the bin edges, whose chords lie above that
    # staircase, and the FPR rescaling then stretches the cut curve over [0, 1].
    normal_scores = np.concatenate([np.zeros(220), np.repeat(np.arange(1.0, 11.0), 10)])
    defect_scores = np.arange(1.0, 11.0) - 0.9
    maps = np.concatenate([defect_scores, normal_scores]).reshape(1, 33, 10)
    masks = np.zeros(maps.shape, bool)
    masks[0, 0, :] = True
    # Exact: PRO = m/10 on FPR [m/32, (m+1)/32); the area to 0.3 is (36 + 5.4) / 320.
    expected = (36 + 5.4) / 320 / 0.3
    assert metrics.au_pro(maps, masks) == pytest.approx(expected, abs=1e-12)
    assert _brute_force_au_pro(maps, masks) == pytest.approx(expected, abs=1e-12)
    binned = _binned_rescaled_au_pro(maps, masks, num_thresholds=10)
    assert binned == pytest.approx(0.45 * (1 - 1 / 81), abs=1e-12)  # y = 0.9 x on [1/9, 1]
    assert binned > expected + 0.01


def test_binned_rescaled_variant_differs_on_random_maps():
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[:32, :32]
    maps = ndimage.gaussian_filter(rng.normal(size=(8, 32, 32)), (0, 2, 2))
    masks = np.zeros(maps.shape, bool)
    for i in range(5):
        (cy, cx), (a, b) = rng.integers(6, 26, 2), rng.integers(2, 6, 2)
        masks[i] = ((yy - cy) / a) ** 2 + ((xx - cx) / b) ** 2 < 1
    maps = maps + 0.3 * ndimage.gaussian_filter(masks.astype(float), (0, 1, 1))
    exact = metrics.au_pro(maps, masks)
    assert exact == pytest.approx(_brute_force_au_pro(maps, masks), abs=1e-12)
    assert abs(_binned_rescaled_au_pro(maps, masks, num_thresholds=200) - exact) > 1e-3


def test_area_to_limit_interpolates_and_includes_points_at_the_limit():
    x = np.array([0.0, 0.3, 0.3, 1.0])
    y = np.array([0.0, 0.2, 0.8, 1.0])
    assert metrics.area_to_limit(x, y, 0.3) == pytest.approx(0.03)
    assert metrics.area_to_limit(x, y, 0.65) == pytest.approx(0.03 + 0.35 * (0.8 + 0.9) / 2)
    with pytest.raises(ValueError, match="x_limit"):
        metrics.area_to_limit(x, y, 1.5)


# --------------------------------------------------------------------------- ROC


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("levels", [None, 3, 50])
def test_pixel_auroc_and_roc_curve_match_sklearn(seed, levels):
    maps, masks = _random_case(seed, shape=(5, 16, 12), levels=levels)
    expected = skm.roc_auc_score(masks.ravel(), maps.ravel())
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-14)
    fprs, tprs, thresholds = metrics.roc_curve(maps, masks)
    sk_fprs, sk_tprs, sk_thresholds = skm.roc_curve(
        masks.ravel(), maps.ravel(), drop_intermediate=False
    )
    np.testing.assert_allclose(fprs, sk_fprs, atol=1e-14)
    np.testing.assert_allclose(tprs, sk_tprs, atol=1e-14)
    np.testing.assert_array_equal(thresholds, sk_thresholds)
    assert metrics.area_to_limit(fprs, tprs, 1.0) == pytest.approx(expected, abs=1e-12)


def test_image_auroc_with_ties_matches_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = rng.integers(0, 6, 200) + labels  # heavy ties across classes
    assert metrics.image_auroc(scores, labels) == pytest.approx(
        skm.roc_auc_score(labels, scores), abs=1e-15
    )
    assert metrics.image_auroc(scores.astype(np.float32), labels.astype(bool)) == pytest.approx(
        skm.roc_auc_score(labels, scores), abs=1e-15
    )
    assert metrics.image_auroc([0.1, 0.9], [0, 1]) == 1.0
    assert metrics.image_auroc([0.9, 0.1], [0, 1]) == 0.0


def test_pixel_auroc_many_pixels_is_exact():
    rng = np.random.default_rng(1)
    masks = rng.random((20, 64, 64)) < 0.03
    maps = (rng.random(masks.shape) + masks * 0.3).astype(np.float32)
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(
        skm.roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-13
    )


# --------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
    maps, masks = _random_case(0)
    with pytest.raises(ValueError, match="masks has shape"):
        metrics.au_pro(maps, masks[:, :-1])
    with pytest.raises(ValueError, match="anomaly_maps must have 3 dimensions"):
        metrics.au_pro(maps[0], masks[0])
    for bad in (np.nan, np.inf, -np.inf):
        broken = maps.copy()
        broken[0, 0, 0] = bad
        with pytest.raises(ValueError, match="anomaly_maps contains 1 NaN or infinite"):
            metrics.au_pro(broken, masks)
        with pytest.raises(ValueError, match="NaN or infinite"):
            metrics.pixel_auroc(broken, masks)
    with pytest.raises(ValueError, match="no anomalous pixel"):
        metrics.au_pro(maps, np.zeros_like(masks))
    with pytest.raises(ValueError, match="no anomaly-free pixel"):
        metrics.au_pro(maps, np.ones_like(masks))
    with pytest.raises(ValueError, match="masks must contain only 0 and 1"):
        metrics.au_pro(maps, masks.astype(np.uint8) * 255)
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.au_pro(maps, masks, fpr_limit=0.0)
    with pytest.raises(ValueError, match="must hold real numbers"):
        metrics.au_pro(maps.astype(complex), masks)
    with pytest.raises(ValueError, match="labels contain no anomalous"):
        metrics.image_auroc([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="labels contain no normal"):
        metrics.image_auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="labels has shape"):
        metrics.image_auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="masks contain no normal"):
        metrics.pixel_auroc(maps, np.ones_like(masks))
