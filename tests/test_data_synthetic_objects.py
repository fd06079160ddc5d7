"""Synthetic objects on a plain background: the "washer" category, defects only on the object."""

import numpy as np
import pytest
from PIL import Image

from ustad.data.images import to_uint8
from ustad.data.mvtec import load_mvtec_category
from ustad.data.synthetic import (
    DEFECT_TYPES,
    OBJECTS,
    add_defect,
    load_texture,
    make_synthetic_category,
    object_view,
)


def _object(seed, size=(64, 80)):
    return object_view(size, np.random.default_rng(seed), load_texture("gravel"))


def test_object_on_plain_background_varies_a_little():
    first, second = _object(0), _object(1)
    assert first.shape == (64, 80, 3) and first.dtype == np.float32
    assert 0 <= first.min() and first.max() <= 1
    np.testing.assert_array_equal(first, _object(0))  # deterministic per generator
    # Corners are the plain dark background; the ring is bright and copper (red > blue).
    corners = first[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert np.all(corners < 0.2)
    ring = first.mean(-1) > 0.2
    assert 0.2 < ring.mean() < 0.6
    assert first[ring][:, 0].mean() > first[ring][:, 2].mean() + 0.2
    # Another image: the object moved / turned a little, not much.
    other = second.mean(-1) > 0.2
    assert 0 < (ring != other).mean() < 0.2


@pytest.mark.parametrize("kind", DEFECT_TYPES)
def test_defects_within_the_object_only(kind):
    clean = to_uint8(_object(3))
    within = clean.mean(-1) > 0.2 * 255
    rng = np.random.default_rng(0)
    gravel = load_texture("gravel")
    defective, mask = add_defect(
        clean, kind, rng, within=within,
        foreign_view=lambda: object_view((64, 80), rng, gravel),
    )  # fmt: skip
    np.testing.assert_array_equal(mask, (defective != clean).any(-1))
    assert mask.sum() >= 16
    assert not mask[~within].any()


def test_object_category_writes_mvtec_layout(tmp_path):
    assert "washer" in OBJECTS
    kwargs = dict(texture="washer", image_size=48, num_train=3, num_test_good=1,
                  num_test_per_defect=1)  # fmt: skip
    path = make_synthetic_category(tmp_path, "washer", **kwargs)
    data = load_mvtec_category(tmp_path, "washer", image_size=48)
    assert data.train_images.shape == (3, 48, 48, 3)
    assert sorted(data.test_types) == sorted(["good", *DEFECT_TYPES])
    defective = data.test_labels == 1
    assert defective.sum() == len(DEFECT_TYPES)
    assert data.test_masks[defective].any(axis=(1, 2)).all()
    assert not data.test_masks[~defective].any()
    again = make_synthetic_category(tmp_path / "again", "washer", **kwargs)
    for name in ("train/good/000.png", "test/hole/000.png", "ground_truth/scratch/000_mask.png"):
        np.testing.assert_array_equal(
            np.asarray(Image.open(path / name)), np.asarray(Image.open(again / name))
        )


def test_unknown_texture_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="'lamp'.*washer"):
        make_synthetic_category(tmp_path, "x", texture="lamp")
    assert not any(tmp_path.iterdir())
