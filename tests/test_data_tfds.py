"""The MVTec AD TFDS builder, built and read without TensorFlow (ArrayRecord + data source)."""

import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ustad.data import MvtecAd, MvtecAdConfig, load_mvtec_tfds
from ustad.data.mvtec import index_mvtec_category, load_mvtec_category


def _make_tree(root, category, size):
    rng = np.random.default_rng(1)
    cat = root / category
    for folder, count in (("train/good", 3), ("test/good", 2), ("test/hole", 2)):
        (cat / folder).mkdir(parents=True)
        for i in range(count):
            image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(image).save(cat / folder / f"{i:03d}.png")
    (cat / "ground_truth/hole").mkdir(parents=True)
    for i in range(2):
        mask = np.zeros((size, size), np.uint8)
        mask[i : i + 3, 2:6] = 255
        Image.fromarray(mask).save(cat / "ground_truth/hole" / f"{i:03d}_mask.png")


def test_registered_with_one_config_per_category():
    assert tfds.builder_cls("mvtec_ad") is MvtecAd
    assert len(MvtecAd.BUILDER_CONFIGS) == 15
    assert "manual_dir" in MvtecAd.MANUAL_DOWNLOAD_INSTRUCTIONS


def test_build_and_load_matches_folder_reader(tmp_path):
    manual = tmp_path / "manual"
    _make_tree(manual, "mine", 16)
    loaded = load_mvtec_tfds("mine", manual_dir=manual, data_dir=tmp_path / "tfds", image_size=8)
    direct = load_mvtec_category(manual, "mine", image_size=8)
    assert loaded.train_images.shape == (3, 8, 8, 3)
    np.testing.assert_allclose(loaded.train_images, direct.train_images, atol=0.5 / 255 + 1e-6)
    np.testing.assert_allclose(loaded.test_images, direct.test_images, atol=0.5 / 255 + 1e-6)
    np.testing.assert_array_equal(loaded.test_masks, direct.test_masks)
    np.testing.assert_array_equal(loaded.test_labels, direct.test_labels)
    assert loaded.test_types == direct.test_types
    assert loaded.test_paths[0] == "test/good/000.png"
    assert (tmp_path / "tfds/mvtec_ad/mine_8x8/1.0.0").is_dir()
    gray = load_mvtec_tfds(
        "mine", manual_dir=manual, data_dir=tmp_path / "tfds", image_size=8, grayscale=True
    )
    assert gray.test_images.shape == (4, 8, 8, 1)
    assert "tensorflow" not in sys.modules


def test_builtin_config_through_tfds_data_source(tmp_path):
    manual = tmp_path / "manual" / "mvtec_anomaly_detection"
    _make_tree(manual, "bottle", 256)
    test = tfds.data_source(
        "mvtec_ad/bottle",
        split="test",
        data_dir=tmp_path / "tfds",
        builder_kwargs={"file_format": "array_record"},
        download_and_prepare_kwargs={
            "download_config": tfds.download.DownloadConfig(manual_dir=tmp_path / "manual")
        },
    )
    assert len(test) == 4
    example = test[0]
    assert example["image"].shape == (256, 256, 3) and example["mask"].shape == (256, 256, 1)
    assert set(np.unique(example["mask"])) <= {0, 255}


def test_generate_examples_directly(tmp_path):
    _make_tree(tmp_path, "part", 12)
    builder = MvtecAd(
        config=MvtecAdConfig(name="part_12", category="part", image_size=(12, 12)),
        data_dir=tmp_path / "unused",
    )
    examples = dict(builder._generate_examples(index_mvtec_category(tmp_path, "part"), "test"))
    assert sorted(examples) == [
        "test/good/000.png",
        "test/good/001.png",
        "test/hole/000.png",
        "test/hole/001.png",
    ]
    hole = examples["test/hole/001.png"]
    assert hole["label"] == 1 and hole["defect_type"] == "hole"
    assert hole["mask"][:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_category_in_manual_dir(tmp_path):
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual/readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_mvtec_tfds("nope", manual_dir=tmp_path / "manual", data_dir=tmp_path / "tfds")
