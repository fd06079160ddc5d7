"""Training crops and tiles cover the images' borders as often as their middle
(:func:`ustad.tiling.crop_offsets`): uniform offsets cover a border pixel ``crop`` times less
often, and a part seen only near the borders then scores as a defect."""

import numpy as np
import pytest

from ustad import tiling
from ustad.uninformed_students.crops import sample_crops


def _coverage(offsets, size, crop):
    counts = np.zeros(size)
    for offset in offsets:
        counts[offset : offset + crop] += 1
    return counts / len(offsets)


@pytest.mark.parametrize("size, crop", [(1130, 256), (460, 256), (64, 16), (40, 40)])
def test_borders_are_covered_as_often_as_the_least_covered_pixel(size, crop):
    offsets = tiling.crop_offsets(np.random.default_rng(0), size, crop, 200_000)
    assert offsets.min() >= 0 and offsets.max() <= size - crop
    coverage = _coverage(offsets, size, crop)
    least = crop / (size + crop - 1)  # every pixel's least coverage, the borders' exactly
    assert coverage.min() >= 0.97 * least
    if size > crop:
        assert abs(coverage[0] - least) < 0.03 * least
        assert abs(coverage[-1] - least) < 0.03 * least
    # The uniform draw it replaces covers the border pixel `crop` times less often than this.
    uniform = np.random.default_rng(0).integers(0, size - crop + 1, 200_000)
    if size > crop:
        assert _coverage(uniform, size, crop)[0] < 0.5 * coverage[0]


def test_random_crops_and_student_crops_use_the_covering_offsets():
    images = np.arange(1 * 8 * 300 * 1, dtype=np.float32).reshape(1, 8, 300, 1)
    lefts = [
        int(tiling.random_crops(images, (8, 32), seed=1, step=step)[0, 0, 0, 0])
        for step in range(3000)
    ]
    # Border-touching windows get the probability mass of every window that overhangs.
    assert np.mean(np.array(lefts) == 0) > 0.08  # uniform offsets: 1 in 269
    _, tops, lefts = sample_crops(0, 0, 4, (64, 300), 32, 4000)
    assert np.mean(lefts == 0) > 0.08 and np.mean(lefts == 300 - 32) > 0.08
    assert np.mean(tops == 0) > 0.3 and tops.max() <= 32
