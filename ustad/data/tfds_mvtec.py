"""TFDS builder for MVTec AD (or any data in its layout) from a manually downloaded copy.

Building works without TensorFlow when the builder writes ArrayRecord files
(`file_format="array_record"`) and is read with `as_data_source()`: examples are passed to TFDS
as already-encoded PNG bytes, so TFDS never needs `tf.image` to encode them, and the data
source decodes with PIL. `tfds.load` / `as_dataset` (tf.data) still need TensorFlow.

Usage:
    builder = MvtecAd(config="bottle", data_dir="~/tensorflow_datasets",
                      file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir="~/mvtec_anomaly_detection"))
    test = builder.as_data_source()["test"]
or simply `load_mvtec_tfds("bottle", manual_dir=..., data_dir=...)`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from ustad.data.images import as_size, encode_png, read_image, resize_image, resize_mask, to_uint8
from ustad.data.mvtec import (
    GOOD,
    MVTEC_CATEGORIES,
    MVTecCategory,
    MVTecIndex,
    index_mvtec_category,
    read_test_mask,
)
from ustad.host_images import luma

_DESCRIPTION = """\
MVTec AD: 15 categories of industrial objects and textures; anomaly-free training images and
test images with pixel-precise ground truth of defects. Images are resized to the config's
image size (bilinear, antialiased); masks (nearest) are stored as uint8 0/255.
"""

_CITATION = """\
@inproceedings{bergmann2019mvtec,
  title={{MVTec AD} -- A Comprehensive Real-World Dataset for Unsupervised Anomaly Detection},
  author={Bergmann, Paul and Fauser, Michael and Sattlegger, David and Steger, Carsten},
  booktitle={CVPR},
  year={2019}
}
"""


@dataclasses.dataclass(kw_only=True)
class MvtecAdConfig(tfds.core.BuilderConfig):
    """One category at one image size.

    Attributes:
        category: the folder name under the manual directory.
        image_size: `(height, width)` the images and masks are resized to.
    """

    category: str = ""
    image_size: tuple[int, int] = (256, 256)


def _find_category_root(manual_dir: Path, category: str) -> Path:
    """Accepts `<manual_dir>/<category>` or `<manual_dir>/mvtec_anomaly_detection/<category>`."""
    for root in (manual_dir, manual_dir / "mvtec_anomaly_detection"):
        if (root / category).is_dir():
            return root
    raise FileNotFoundError(
        f"Category folder {category}/ not found in the manual directory {manual_dir} "
        f"(nor in {manual_dir / 'mvtec_anomaly_detection'})"
    )


class MvtecAd(tfds.core.GeneratorBasedBuilder):
    """MVTec AD, one config per category; reads a manually downloaded copy."""

    # TFDS derives this from the package by a check that needs the `importlib_resources`
    # backport (not a TFDS dependency); stating it directly avoids that import.
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download MVTec AD from https://www.mvtec.com/company/research/datasets/mvtec-ad (licence
CC BY-NC-SA 4.0) or with `ustad.data.download_mvtec_ad(manual_dir)`, and extract it so that
`<manual_dir>/<category>/train/good/` exists (or
`<manual_dir>/mvtec_anomaly_detection/<category>/...`). Any category folder in the MVTec AD
layout works with a custom `MvtecAdConfig(name=..., category=...)`.
"""
    BUILDER_CONFIGS = [
        MvtecAdConfig(name=c, category=c, description=f"MVTec AD {c}, 256x256")
        for c in MVTEC_CATEGORIES
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        height, width = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(height, width, 3)),
                    "mask": tfds.features.Image(shape=(height, width, 1)),
                    "label": tfds.features.ClassLabel(names=["good", "defective"]),
                    "defect_type": tfds.features.Text(),
                    "filename": tfds.features.Text(),
                }
            ),
            homepage="https://www.mvtec.com/company/research/datasets/mvtec-ad",
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager):
        category = self.builder_config.category
        root = _find_category_root(Path(dl_manager.manual_dir), category)
        index = index_mvtec_category(root, category)
        return {
            "train": self._generate_examples(index, "train"),
            "test": self._generate_examples(index, "test"),
        }

    def _generate_examples(self, index: MVTecIndex, split: str) -> Iterator[tuple[str, dict]]:
        """Yields `(key, example)` with PNG-encoded `image` [H, W, 3] and `mask` [H, W, 1].

        Args:
            index: the checked file list of the category.
            split: "train" (train/good) or "test".
        """
        size = tuple(self.builder_config.image_size)
        if split == "train":
            entries = [(path, GOOD, None) for path in index.train_paths]
        else:
            entries = [(e.image_path, e.defect_type, e) for e in index.test]
        for image_path, defect_type, entry in entries:
            image = read_image(image_path)
            if entry is None:
                mask = np.zeros(size, bool)
            else:
                mask = resize_mask(read_test_mask(entry, image.shape[:2]), size)
            filename = image_path.relative_to(index.category_dir).as_posix()
            yield (
                filename,
                {
                    "image": encode_png(to_uint8(resize_image(image, size))),
                    "mask": encode_png(mask.astype(np.uint8)[..., None] * 255),
                    "label": int(defect_type != GOOD),
                    "defect_type": defect_type,
                    "filename": filename,
                },
            )


def _as_text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def load_mvtec_tfds(
    category: str,
    *,
    manual_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    image_size: int | Sequence[int] = 256,
    grayscale: bool = False,
) -> MVTecCategory:
    """Builds (once) the ArrayRecord TFDS dataset of a category and loads it, without TF.

    Args:
        category: one of `MVTEC_CATEGORIES` or any folder in the MVTec layout.
        manual_dir: the folder holding the extracted `<category>/` (see the builder's
            `MANUAL_DOWNLOAD_INSTRUCTIONS`).
        data_dir: where TFDS keeps the prepared dataset.
        image_size: int or `(height, width)`; 256 for a built-in category uses its registered
            config, anything else a config named `<category>_<H>x<W>`.
        grayscale: one luminance channel instead of three.

    Returns:
        The category as `MVTecCategory`, examples in file-name order. Images went through
        8-bit PNG, so they differ from `load_mvtec_category` by at most 0.5/255. Paths are
        relative to the category folder (e.g. "test/crack/000.png").
    """
    size = as_size(image_size)
    if category in MVTEC_CATEGORIES and size == (256, 256):
        config: str | MvtecAdConfig = category
    else:
        config = MvtecAdConfig(
            name=f"{category}_{size[0]}x{size[1]}", category=category, image_size=size
        )
    builder = MvtecAd(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
    )
    sources = builder.as_data_source()

    def read_split(split: str) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        source = sources[split]
        examples = sorted((source[i] for i in range(len(source))), key=lambda e: e["filename"])
        images = np.stack([e["image"] for e in examples]).astype(np.float32) / 255.0
        if grayscale:
            images = luma(images)
        masks = np.stack([e["mask"][..., 0] > 0 for e in examples])
        return images, masks, examples

    train_images, _, train_examples = read_split("train")
    test_images, test_masks, test_examples = read_split("test")
    return MVTecCategory(
        train_images=train_images,
        train_paths=[_as_text(e["filename"]) for e in train_examples],
        test_images=test_images,
        test_masks=test_masks,
        test_labels=np.array([e["label"] for e in test_examples], np.int32),
        test_types=[_as_text(e["defect_type"]) for e in test_examples],
        test_paths=[_as_text(e["filename"]) for e in test_examples],
    )
