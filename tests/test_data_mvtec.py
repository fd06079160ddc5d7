"""MVTec-layout reader and validation split, on tiny trees written by the tests."""

import numpy as np
import pytest
from PIL import Image

from ustad.data.images import read_image
from ustad.data.mvtec import MVTEC_CATEGORIES, index_mvtec_category, load_mvtec_category
from ustad.data.split import split_validation


def _save(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def _rgb(rng, h, w):
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _make_tree(root, category="widget"):
    """3 train images (png RGB, jpg gray, bmp RGB of other size), 2 good + 2 defective tests."""
    rng = np.random.default_rng(0)
    cat = root / category
    _save(cat / "train/good/000.png", _rgb(rng, 20, 24))
    _save(cat / "train/good/001.JPG", rng.integers(0, 256, (20, 24), dtype=np.uint8), quality=95)
    _save(cat / "train/good/002.bmp", _rgb(rng, 40, 48))
    (cat / "train/good/notes.txt").write_text("not an image")
    _save(cat / "test/good/000.png", _rgb(rng, 20, 24))
    _save(cat / "test/good/001.jpeg", _rgb(rng, 30, 30))
    crack = _rgb(rng, 20, 24)
    _save(cat / "test/crack/000.png", crack)
    mask = np.zeros((20, 24), np.uint8)
    mask[5:10, 6:18] = 255
    _save(cat / "ground_truth/crack/000_mask.png", mask)
    _save(cat / "test/crack/001.PNG", _rgb(rng, 40, 48))
    big_mask = np.zeros((40, 48), np.uint8)
    big_mask[0:4, 0:8] = 1  # non-255 positive values count as defective
    _save(cat / "ground_truth/crack/001_mask.PNG", big_mask)
    return cat


def test_categories_listed():
    assert len(MVTEC_CATEGORIES) == 15 and "bottle" in MVTEC_CATEGORIES


def test_load_shapes_labels_order(tmp_path):
    _make_tree(tmp_path)
    c = load_mvtec_category(tmp_path, "widget", image_size=(10, 12))
    assert c.train_images.shape == (3, 10, 12, 3) and c.train_images.dtype == np.float32
    assert c.test_images.shape == (4, 10, 12, 3)
    assert c.test_masks.shape == (4, 10, 12) and c.test_masks.dtype == bool
    assert c.test_labels.dtype == np.int32
    assert c.test_types == ["crack", "crack", "good", "good"]
    np.testing.assert_array_equal(c.test_labels, [1, 1, 0, 0])
    assert [p.split("/")[-1] for p in c.train_paths] == ["000.png", "001.JPG", "002.bmp"]
    assert c.test_paths[0].endswith("test/crack/000.png")
    assert 0.0 <= c.train_images.min() and c.train_images.max() <= 1.0
    # The grayscale JPEG becomes three identical channels.
    np.testing.assert_array_equal(c.train_images[1, ..., 0], c.train_images[1, ..., 2])
    assert not c.test_masks[2:].any()


def test_masks_nearest_and_binarised(tmp_path):
    _make_tree(tmp_path)
    c = load_mvtec_category(tmp_path, "widget", image_size=(10, 12))
    expected = np.zeros((10, 12), bool)
    expected[2:5, 3:9] = True  # rows 5..9 / cols 6..17 of 20x24, halved
    np.testing.assert_array_equal(c.test_masks[0], expected)
    expected_big = np.zeros((10, 12), bool)
    expected_big[0:1, 0:2] = True
    np.testing.assert_array_equal(c.test_masks[1], expected_big)


def test_native_size_is_exact_and_grayscale_option(tmp_path):
    cat = _make_tree(tmp_path)
    c = load_mvtec_category(tmp_path, "widget", image_size=(20, 24), grayscale=True)
    assert c.train_images.shape == (3, 20, 24, 1)
    original = np.asarray(Image.open(cat / "train/good/000.png"), np.float32) / 255.0
    luma = original @ np.array([0.299, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(c.train_images[0, ..., 0], luma, atol=1e-6)
    rgb = load_mvtec_category(tmp_path, "widget", image_size=(20, 24))
    np.testing.assert_array_equal(rgb.train_images[0], original)


def test_downsampling_is_antialiased(tmp_path):
    # A one-pixel checkerboard averages to grey under antialiasing; point sampling would alias.
    board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    _save(tmp_path / "c/train/good/0.png", board)
    (tmp_path / "c/test/good").mkdir(parents=True)
    _save(tmp_path / "c/test/good/0.png", board)
    c = load_mvtec_category(tmp_path, "c", image_size=8)
    np.testing.assert_allclose(c.train_images, 0.5, atol=0.01)


def test_sixteen_bit_and_rgba_images(tmp_path):
    sixteen = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000).astype(np.uint16)
    _save(tmp_path / "a.png", sixteen)
    np.testing.assert_allclose(read_image(tmp_path / "a.png")[..., 0], sixteen / 65535.0, atol=1e-6)
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 0] = 255
    _save(tmp_path / "b.png", rgba)
    image = read_image(tmp_path / "b.png")
    assert image.shape == (3, 4, 3)
    np.testing.assert_array_equal(image[..., 0], 1.0)


def test_missing_train_good(tmp_path):
    cat = _make_tree(tmp_path)
    for f in (cat / "train/good").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match="train/good"):
        load_mvtec_category(tmp_path, "widget")
    (cat / "train/good").rmdir()
    with pytest.raises(FileNotFoundError, match="train/good"):
        load_mvtec_category(tmp_path, "widget")


def test_missing_category(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing"):
        load_mvtec_category(tmp_path, "nothing")


def test_defective_image_without_mask(tmp_path):
    cat = _make_tree(tmp_path)
    (cat / "ground_truth/crack/001_mask.PNG").unlink()
    with pytest.raises(FileNotFoundError, match="test/crack/001.PNG"):
        index_mvtec_category(tmp_path, "widget")


def test_mask_size_mismatch_checked_before_resizing(tmp_path):
    cat = _make_tree(tmp_path)
    _save(cat / "ground_truth/crack/000_mask.png", np.zeros((10, 12), np.uint8))
    with pytest.raises(ValueError, match="000_mask.png"):
        load_mvtec_category(tmp_path, "widget", image_size=(10, 12))


@pytest.mark.parametrize("target", ["train/good/000.png", "test/crack/000.png"])
def test_corrupt_image(tmp_path, target):
    cat = _make_tree(tmp_path)
    data = (cat / target).read_bytes()
    (cat / target).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=target):
        load_mvtec_category(tmp_path, "widget")


def test_garbage_image(tmp_path):
    cat = _make_tree(tmp_path)
    (cat / "test/good/000.png").write_bytes(b"definitely not a png")
    with pytest.raises(ValueError, match="test/good/000.png"):
        load_mvtec_category(tmp_path, "widget")


def test_split_validation_deterministic_and_disjoint():
    train, val = split_validation(20, 0.2, seed=3)
    train2, val2 = split_validation(20, 0.2, seed=3)
    np.testing.assert_array_equal(train, train2)
    np.testing.assert_array_equal(val, val2)
    assert len(val) == 4 and len(train) == 16
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(20))
    _, val3 = split_validation(20, 0.2, seed=4)
    assert not np.array_equal(val, val3)


@pytest.mark.parametrize("n,fraction", [(2, 0.01), (2, 0.99), (3, 0.5), (5, 0.001)])
def test_split_validation_at_least_one_each(n, fraction):
    train, val = split_validation(n, fraction, seed=0)
    assert len(train) >= 1 and len(val) >= 1 and len(train) + len(val) == n


def test_split_validation_rejects_bad_arguments():
    train, val = split_validation(1, 0.5, seed=0)
    assert list(train) == [0] and len(val) == 0
    with pytest.raises(ValueError):
        split_validation(10, 0.0, seed=0)
    with pytest.raises(ValueError):
        split_validation(0, 0.5, seed=0)
