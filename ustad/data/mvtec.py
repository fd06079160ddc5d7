"""Reader for data in the MVTec AD folder layout.

```
<root>/<category>/train/good/*.png
<root>/<category>/test/good/*.png
<root>/<category>/test/<defect_type>/<name>.png
<root>/<category>/ground_truth/<defect_type>/<name>_mask.png
```
Any category name works, so users' own data in this layout loads the same way as MVTec AD.
Images may be png/jpg/jpeg/bmp (any case), grayscale or RGB, of any size; resizing that changes
their aspect ratio by more than 1.5× logs a warning (see `ustad.data.images.warn_if_squashed`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ustad.data.images import (
    IMAGE_EXTENSIONS,
    as_size,
    fit_size,
    list_image_files,
    read_image,
    read_image_size,
    read_mask,
    resize_image,
    resize_mask,
    warn_if_squashed,
)

logger = logging.getLogger(__name__)

# keep_aspect="auto" keeps the aspect ratio of training images whose long side is more than this
# factor of their short side: rounding both sides to a network's stride alone changes a square
# image's ratio by a few percent, a 4:3 image (1.33) is not square, a ball screw (1130×460,
# 2.46) far from it.
AUTO_ASPECT_RATIO = 1.1


def resolve_keep_aspect(
    keep_aspect: bool | str, native_hw: Sequence[int], image_size: int | Sequence[int] | None
) -> bool:
    """Whether images of the native size `native_hw` keep their aspect ratio.

    Args:
        keep_aspect: True, False, or "auto": True when `image_size` is one int and the long
            side of `native_hw` is more than `AUTO_ASPECT_RATIO` × its short side (a size given
            as `(H, W)` is used as it is).
        native_hw: the training images' (most common) `(H, W)`.
        image_size: the configured size.

    Raises:
        ValueError: `keep_aspect` is none of the three.
    """
    if keep_aspect == "auto":
        if not isinstance(image_size, int | np.integer):
            return False
        height, width = (int(s) for s in native_hw)
        return max(height, width) > AUTO_ASPECT_RATIO * min(height, width)
    if isinstance(keep_aspect, bool | np.bool_):
        return bool(keep_aspect)
    raise ValueError(f"--config.keep_aspect={keep_aspect!r}: choose True, False or 'auto'")


MVTEC_CATEGORIES = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)
MVTEC_TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
GOOD = "good"


@dataclasses.dataclass(frozen=True)
class TestEntry:
    """One test image of an MVTec-layout category.

    Attributes:
        image_path: the test image.
        defect_type: its folder name under `test/` ("good" for anomaly-free images).
        mask_path: its ground-truth mask, None for "good" images.
    """

    __test__ = False  # not a pytest test class despite the name

    image_path: Path
    defect_type: str
    mask_path: Path | None


@dataclasses.dataclass(frozen=True)
class MVTecIndex:
    """The files of one category, checked for completeness but not yet decoded.

    Attributes:
        category_dir: `<root>/<category>`.
        train_paths: the images in `train/good`, sorted.
        test: the test images, sorted by defect type then file name.
    """

    category_dir: Path
    train_paths: list[Path]
    test: list[TestEntry]


@dataclasses.dataclass
class MVTecCategory:
    """One category loaded into memory.

    Attributes:
        train_images: `[N, H, W, C]` float32 in [0, 1], anomaly-free.
        train_paths: N file paths.
        test_images: `[M, H, W, C]` float32 in [0, 1].
        test_masks: `[M, H, W]` bool, True on defective pixels (all False for good images).
        test_labels: `[M]` int32, 1 = defective, 0 = good.
        test_types: M defect-type names ("good" for anomaly-free images).
        test_paths: M file paths.
    """

    train_images: np.ndarray
    train_paths: list[str]
    test_images: np.ndarray
    test_masks: np.ndarray
    test_labels: np.ndarray
    test_types: list[str]
    test_paths: list[str]


def _find_mask(ground_truth_dir: Path, image_path: Path) -> Path | None:
    """`<name>_mask.<ext>` for the image `<name>.<ext>`; `<name>.<ext>` is the fallback."""
    if not ground_truth_dir.is_dir():
        return None
    by_name = {p.name.lower(): p for p in list_image_files(ground_truth_dir)}
    for stem in (f"{image_path.stem}_mask", image_path.stem):
        for ext in IMAGE_EXTENSIONS:
            if (found := by_name.get(f"{stem}{ext}".lower())) is not None:
                return found
    return None


def category_folder(root: str | os.PathLike, category: str) -> Path:
    """`<root>/<category>`, checked to exist.

    Raises:
        FileNotFoundError: `root` or the category is missing; the message lists the categories
            that `root` holds (folders with a `train/` or `test/` inside).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Data folder not found: {root} (--config.data_dir)")
    category_dir = root / category
    if not category_dir.is_dir():
        found = sorted(
            d.name
            for d in root.iterdir()
            if d.is_dir() and ((d / "train").is_dir() or (d / "test").is_dir())
        )
        holds = ", ".join(found) if found else "no category folders (<category>/train/good/)"
        raise FileNotFoundError(
            f"Category {category!r} not found in {root} (--config.category); it holds: {holds}"
        )
    return category_dir


def index_train(category_dir: str | os.PathLike) -> list[Path]:
    """The images of `<category_dir>/train/good`, sorted; all that training needs.

    Raises:
        FileNotFoundError: no `train/good` folder.
        ValueError: it holds no images.
    """
    train_dir = Path(category_dir) / "train" / GOOD
    if not train_dir.is_dir():
        raise FileNotFoundError(f"Missing training folder {train_dir}")
    train_paths = list_image_files(train_dir)
    if not train_paths:
        raise ValueError(
            f"No images ({', '.join(IMAGE_EXTENSIONS)}) in training folder {train_dir}"
        )
    return train_paths


def index_test(category_dir: str | os.PathLike, *, require_masks: bool = True) -> list[TestEntry]:
    """The test images of a category, sorted by defect type then file name.

    Args:
        category_dir: `<root>/<category>`.
        require_masks: every defective image needs a mask. With False, a category without a
            `ground_truth/` folder gives entries with `mask_path=None` (image labels only); one
            with the folder still needs every mask.

    Raises:
        FileNotFoundError: no `test/` folder, or a defective image without a mask (the message
            names the image and the mask looked for).
        ValueError: `test/` holds no images.
    """
    category_dir = Path(category_dir)
    test_dir = category_dir / "test"
    if not test_dir.is_dir():
        raise FileNotFoundError(f"Missing test folder {test_dir}")
    masks_optional = not require_masks and not (category_dir / "ground_truth").is_dir()
    test: list[TestEntry] = []
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        for image_path in list_image_files(type_dir):
            if type_dir.name == GOOD or masks_optional:
                test.append(TestEntry(image_path, type_dir.name, None))
                continue
            gt_dir = category_dir / "ground_truth" / type_dir.name
            mask_path = _find_mask(gt_dir, image_path)
            if mask_path is None:
                raise FileNotFoundError(
                    f"Defective test image {image_path} has no mask: expected "
                    f"{gt_dir / (image_path.stem + '_mask.png')}"
                )
            test.append(TestEntry(image_path, type_dir.name, mask_path))
    if not test:
        raise ValueError(f"No test images in {test_dir}")
    return test


def index_mvtec_category(root: str | os.PathLike, category: str) -> MVTecIndex:
    """Lists and checks the files of `<root>/<category>` without decoding them.

    Raises:
        FileNotFoundError: the category (the message lists those that exist), `train/good` or
            `test` folder is missing, or a defective test image has no mask (the message names
            the image and the mask looked for).
        ValueError: `train/good` or `test` holds no images.
    """
    category_dir = category_folder(root, category)
    return MVTecIndex(category_dir, index_train(category_dir), index_test(category_dir))


def load_mvtec_train(
    root: str | os.PathLike,
    category: str,
    *,
    image_size: int | Sequence[int] | None = 256,
    grayscale: bool = False,
    keep_aspect: bool | str = False,
    multiple: int = 1,
) -> tuple[np.ndarray, list[str]]:
    """Only `<root>/<category>/train/good`, for training (no `test/` or masks needed).

    Args:
        root, category, image_size, grayscale: see `load_mvtec_category`.
        keep_aspect: resize the short side to `image_size` (an int) and the long side by the
            same factor, both rounded to a multiple of `multiple` (see
            `ustad.data.images.fit_size`); the size comes from the most common native size, so
            images of another aspect ratio are squashed to it (with a warning). "auto": the
            same when that size is not square (`resolve_keep_aspect`), else `image_size`.
        multiple: what `keep_aspect` rounds to: the patch networks' pooling stride.

    `image_size=None` keeps the most common native size (training on tiles: nothing resized).

    Returns:
        `(images [N, H, W, C] float32 in [0, 1], N paths)`; see `load_mvtec_category`.
    """
    paths = index_train(category_folder(root, category))
    native = [read_image_size(path) for path in paths]
    common = collections.Counter(native).most_common(1)[0][0]
    if image_size is None:
        image_size, keep_aspect = tuple(common), False
    keep = resolve_keep_aspect(keep_aspect, common, image_size)
    size = fit_size(common, image_size, keep_aspect=keep, multiple=multiple)
    if keep_aspect == "auto" and keep:
        logger.info(
            "keep_aspect='auto': the training images are %d×%d (H×W), not square: trained at "
            "%d×%d (the short side %s, both sides multiples of %d)",
            *common, *size, image_size, multiple,
        )  # fmt: skip
    keep_aspect = keep
    warn_if_squashed(native, paths, size, multiple=multiple, keep_aspect=keep_aspect)
    images = np.empty((len(paths), *size, 1 if grayscale else 3), np.float32)
    for i, path in enumerate(paths):
        images[i] = resize_image(read_image(path, grayscale=grayscale), size)
    return images, [str(p) for p in paths]


def read_test_mask(entry: TestEntry, image_hw: tuple[int, int]) -> np.ndarray:
    """The native-size `[H, W]` bool mask of a test entry, checked against its image size.

    Args:
        entry: the test entry.
        image_hw: `(H, W)` of its image at native size.

    Returns:
        `[H, W]` bool; all False for good images. The size check happens before any resizing,
        because a mask of the wrong size would otherwise be silently stretched onto its image.
    """
    height, width = image_hw
    if entry.mask_path is None:
        return np.zeros((height, width), bool)
    mask = read_mask(entry.mask_path)
    if mask.shape != (height, width):
        raise ValueError(
            f"Mask {entry.mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
            f"{entry.image_path} is {width}x{height}"
        )
    return mask


def load_mvtec_category(
    root: str | os.PathLike,
    category: str,
    *,
    image_size: int | Sequence[int] = 256,
    grayscale: bool = False,
    keep_aspect: bool | str = False,
    multiple: int = 1,
) -> MVTecCategory:
    """Loads one category of MVTec AD (or any data in its folder layout) into memory.

    Args:
        root: the folder that holds `<category>/`.
        category: the category folder name (any name, not only the 15 of MVTec AD).
        image_size: output size, an int or `(height, width)`; images are resized bilinearly with
            antialiasing, masks by nearest neighbour and then binarised (> 0).
        grayscale: one luminance channel (C = 1) instead of three (C = 3).
        keep_aspect, multiple: see `load_mvtec_train`; the test images get the training size.

    Returns:
        The category; see `MVTecCategory` for shapes.

    Raises:
        FileNotFoundError: a missing folder, or a defective test image without a mask.
        ValueError: empty `train/good`, a mask whose size differs from its image, or an image
            file that cannot be decoded. Every message names the file at fault.
    """
    index = index_mvtec_category(root, category)
    train_images, train_paths = load_mvtec_train(
        root,
        category,
        image_size=image_size,
        grayscale=grayscale,
        keep_aspect=keep_aspect,
        multiple=multiple,
    )
    test = _load_test_entries(index.test, train_images.shape[1:3], grayscale)
    return MVTecCategory(
        train_images=train_images,
        train_paths=train_paths,
        test_images=test.images,
        test_masks=test.masks,
        test_labels=test.labels,
        test_types=test.types,
        test_paths=test.paths,
    )


@dataclasses.dataclass
class MVTecTestSet:
    """The test images of one category, for evaluation.

    Attributes:
        images: `[N, H, W, C]` float32 in [0, 1].
        masks: `[N, H, W]` bool, True on defective pixels; None when the category has no
            `ground_truth/` (then only image-level metrics can be computed).
        labels: `[N]` int32, 1 = defective (any folder but `test/good`), 0 = good.
        types: N defect-type names.
        paths: N file paths.
    """

    images: np.ndarray
    masks: np.ndarray | None
    labels: np.ndarray
    types: list[str]
    paths: list[str]


def load_mvtec_test(
    category_dir: str | os.PathLike,
    *,
    image_size: int | Sequence[int] | None = 256,
    grayscale: bool = False,
) -> MVTecTestSet:
    """`<category_dir>/test/<type>/*` with the masks of `ground_truth/<type>/` if it exists.

    `train/` is not needed. Without `ground_truth/`, `masks` is None; with it, every defective
    image needs its mask (see `index_test`).

    Args:
        category_dir: a category folder in the MVTec layout.
        image_size, grayscale: as in `load_mvtec_category`; `image_size=None`: the test images'
            most common native size (others are resized to it, with a warning).
    """
    entries = index_test(Path(category_dir), require_masks=False)
    if image_size is None:
        native = [read_image_size(entry.image_path) for entry in entries]
        image_size = collections.Counter(native).most_common(1)[0][0]
    test = _load_test_entries(entries, as_size(image_size), grayscale)
    has_masks = (Path(category_dir) / "ground_truth").is_dir()
    return test if has_masks else dataclasses.replace(test, masks=None)


def _load_test_entries(entries, size, grayscale) -> MVTecTestSet:
    size = tuple(int(s) for s in size)
    images = np.empty((len(entries), *size, 1 if grayscale else 3), np.float32)
    masks = np.empty((len(entries), *size), bool)
    native = []
    for i, entry in enumerate(entries):
        image = read_image(entry.image_path, grayscale=grayscale)
        native.append(image.shape[:2])
        masks[i] = resize_mask(read_test_mask(entry, image.shape[:2]), size)
        images[i] = resize_image(image, size)
    warn_if_squashed(native, [e.image_path for e in entries], size)
    return MVTecTestSet(
        images=images,
        masks=masks,
        labels=np.array([e.defect_type != GOOD for e in entries], np.int32),
        types=[e.defect_type for e in entries],
        paths=[str(e.image_path) for e in entries],
    )
