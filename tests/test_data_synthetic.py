"""Synthetic defects: exact masks, determinism, MVTec layout."""

import json

import numpy as np
import pytest
from PIL import Image

from ustad.data.images import to_uint8
from ustad.data.mvtec import load_mvtec_category
from ustad.data.synthetic import (
    DEFECT_TYPES,
    add_defect,
    load_texture,
    make_synthetic_category,
    random_view,
)


@pytest.mark.parametrize("kind", DEFECT_TYPES)
@pytest.mark.parametrize("texture", ["gravel", "coffee"])
def test_mask_is_exactly_the_changed_pixels(kind, texture):
    rng = np.random.default_rng(0)
    source = load_texture(texture)
    clean = to_uint8(random_view(source, (48, 40), rng, 0.5))
    foreign = load_texture("brick")
    defective, mask = add_defect(
        clean, kind, rng, foreign_view=lambda: random_view(foreign, (48, 40), rng, 0.5)
    )
    assert defective.shape == clean.shape and defective.dtype == np.uint8
    np.testing.assert_array_equal(mask, (defective != clean).any(-1))
    assert 0 < mask.mean() < 0.5


def test_unknown_defect():
    with pytest.raises(ValueError, match="dent"):
        add_defect(np.zeros((8, 8, 1), np.uint8), "dent", np.random.default_rng(0))


def test_category_layout_masks_and_determinism(tmp_path):
    kwargs = dict(
        texture="grass", image_size=(32, 40), num_train=4, num_test_good=2, num_test_per_defect=2
    )
    cat = make_synthetic_category(tmp_path / "a", "syn", seed=5, **kwargs)
    assert cat == tmp_path / "a/syn"
    assert sorted(p.name for p in (cat / "test").iterdir()) == sorted(("good", *DEFECT_TYPES))
    assert (cat / "ground_truth/stain/001_mask.png").exists()
    assert json.loads((cat / "synthetic.json").read_text())["seed"] == 5
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]

    data = load_mvtec_category(tmp_path / "a", "syn", image_size=(32, 40))
    assert data.train_images.shape == (4, 32, 40, 3)
    assert data.test_labels.sum() == 2 * len(DEFECT_TYPES)
    defective = data.test_labels == 1
    assert data.test_masks[defective].any(axis=(1, 2)).all()
    assert not data.test_masks[~defective].any()
    # Good images are different crops, not copies.
    assert np.abs(data.train_images[0] - data.train_images[1]).mean() > 0.02

    # Same seed -> identical files; another seed -> different images.
    same = make_synthetic_category(tmp_path / "b", "syn", seed=5, **kwargs)
    other = make_synthetic_category(tmp_path / "c", "syn", seed=6, **kwargs)
    for rel in ("train/good/003.png", "test/scratch/001.png", "ground_truth/hole/000_mask.png"):
        assert (cat / rel).read_bytes() == (same / rel).read_bytes()
    assert (cat / "train/good/000.png").read_bytes() != (other / "train/good/000.png").read_bytes()


def test_written_masks_match_changed_pixels(tmp_path):
    # Regenerate the clean image each defective one started from (same per-image seed) and
    # check the saved mask against the saved pixels.
    cat = make_synthetic_category(
        tmp_path, "s", texture="gravel", image_size=24, num_train=1, num_test_good=1,
        num_test_per_defect=2, seed=9,
    )  # fmt: skip
    source = load_texture("gravel")
    for d, kind in enumerate(DEFECT_TYPES):
        for i in range(2):
            rng = np.random.default_rng([9, 2, d + 1, i])
            clean = to_uint8(random_view(source, (24, 24), rng, 0.5))[..., 0]
            saved = np.asarray(Image.open(cat / f"test/{kind}/{i:03d}.png"))
            mask = np.asarray(Image.open(cat / f"ground_truth/{kind}/{i:03d}_mask.png")) > 0
            np.testing.assert_array_equal(mask, saved != clean)


def test_existing_category_needs_overwrite(tmp_path):
    kwargs = dict(image_size=16, num_train=1, num_test_good=1, num_test_per_defect=1)
    make_synthetic_category(tmp_path, "x", seed=0, **kwargs)
    with pytest.raises(FileExistsError):
        make_synthetic_category(tmp_path, "x", seed=0, **kwargs)
    make_synthetic_category(tmp_path, "x", seed=1, overwrite=True, defect_types=["hole"], **kwargs)
    assert sorted(p.name for p in (tmp_path / "x/test").iterdir()) == ["good", "hole"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="wallpaper"):
        make_synthetic_category(tmp_path, texture="wallpaper")
    with pytest.raises(ValueError, match="dent"):
        make_synthetic_category(tmp_path, defect_types=["dent"])
    assert list(tmp_path.iterdir()) == []
