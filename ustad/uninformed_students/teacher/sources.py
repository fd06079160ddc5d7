"""Image sources for teacher pretraining (paper §3): random-access sequences of images.

Every source is a random-access sequence of ``[H, W, C]`` images, what
:class:`ustad.uninformed_students.teacher.patches.ContextSampler` crops from:

* in-memory arrays (:func:`natural_photos` gives the photos bundled with scikit-image and
  scikit-learn, the default when ImageNet is not at hand);
* image folders or glob patterns (:func:`image_files`, read lazily); :func:`photo_folder` reads
  a folder tree of photographs (such as ``../shared/data/photos`` or ImageNet's ``train/``) with
  a fixed held-out split that training never sees;
* a TFDS dataset such as ``imagenet2012`` or ``imagenette`` through ``tfds.data_source``
  (:func:`tfds_images`, random access without TensorFlow).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ustad.data.images import read_image, resolve_image_paths

__all__ = [
    "NATURAL_PHOTOS",
    "LazyImages",
    "as_rgb",
    "image_files",
    "natural_photos",
    "photo_folder",
    "tfds_images",
]


# Natural photographs that ship inside scikit-image (no download); scientific, synthetic and
# document images of that module are left out. "stereo_motorcycle" is its left view.
NATURAL_PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "moon",
    "rocket",
    "stereo_motorcycle",
)


def natural_photos() -> list[np.ndarray]:
    """The default pretraining images: scikit-image's natural photos and scikit-learn's two
    sample images (china, flower), 14 images of 300–740 px.

    Returns:
      ``[H_i, W_i, 3]`` uint8 arrays (grayscale photos repeated to 3 channels).
    """
    import skimage.data
    from sklearn.datasets import load_sample_images

    images = []
    for name in NATURAL_PHOTOS:
        image = getattr(skimage.data, name)()
        if name == "stereo_motorcycle":
            image = image[0]
        images.append(as_rgb(np.asarray(image)))
    images.extend(as_rgb(np.asarray(x)) for x in load_sample_images().images)
    return images


class LazyImages(Sequence):
    """A random-access sequence whose items are loaded on demand.

    Args:
      length: number of images.
      load: ``index -> [H, W, C]`` image (uint8, or float in [0, 1]).
      names: optional names for error messages.
    """

    def __init__(
        self, length: int, load: Callable[[int], np.ndarray], names: Sequence[str] | None = None
    ):
        self._length = int(length)
        self._load = load
        self.names = names

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._length))]
        if not -self._length <= index < self._length:
            raise IndexError(f"image {index} out of range for {self._length} images")
        return self._load(int(index) % self._length)


def image_files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> LazyImages:
    """Images of a folder, glob pattern (``"photos/**/*.jpg"``) or list of files, read lazily.

    Returns:
      A :class:`LazyImages` of ``[H, W, 3]`` float32 in [0, 1].
    """
    paths = [str(p) for p in resolve_image_paths(source)]
    return LazyImages(len(paths), lambda i: read_image(paths[i]), names=paths)


def _is_holdout(relative: str, fraction: float) -> bool:
    """A fixed, content-independent split: the SHA-256 of the relative path, as a number in
    [0, 1), below ``fraction``. Adding or removing other files never moves a file across."""
    digest = hashlib.sha256(relative.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def photo_folder(
    root: str | os.PathLike, *, split: str = "train", holdout_fraction: float = 0.05
) -> LazyImages:
    """The photographs under ``root`` (recursively), read lazily, with a fixed held-out split.

    Teachers train on ``split="train"``; ``"holdout"`` (≈ ``holdout_fraction`` of the files,
    chosen by a hash of each file's path relative to ``root``) is kept for measuring how well a
    teacher distils P on photos it never saw; ``"all"`` is every file.

    Args:
      root: a folder; every file below it with an extension in
        ``ustad.data.images.IMAGE_EXTENSIONS`` counts.
      split: ``"train"``, ``"holdout"`` or ``"all"``.
      holdout_fraction: share of files held out, in [0, 1).

    Returns:
      A :class:`LazyImages` of ``[H, W, 3]`` float32 in [0, 1] (``names``: the paths).

    Raises:
      FileNotFoundError: ``root`` is not a folder or the split is empty.
    """
    from ustad.data.images import IMAGE_EXTENSIONS

    if split not in ("train", "holdout", "all"):
        raise ValueError(f"split must be train, holdout or all, got {split!r}")
    if not 0 <= holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"photo folder {root} does not exist or is not a folder")
    paths = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        held = _is_holdout(path.relative_to(root).as_posix(), holdout_fraction)
        if split == "all" or held == (split == "holdout"):
            paths.append(path)
    if not paths:
        raise FileNotFoundError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) for split {split!r} under {root}"
        )
    return image_files(paths)


def tfds_images(
    name: str,
    *,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    image_key: str = "image",
    download: bool = False,
) -> LazyImages:
    """A TFDS dataset's images through ``tfds.data_source`` (random access, no TensorFlow).

    Args:
      name: a TFDS name, e.g. ``"imagenet2012"`` (needs the manually downloaded archives, see
        the TFDS catalog) or ``"imagenette/full-size-v2"``; the dataset must be prepared in the
        ``array_record`` file format (``tfds build --file_format=array_record``).
      split: e.g. ``"train"`` or ``"train[:10%]"``.
      data_dir: TFDS data folder (default ``~/tensorflow_datasets``).
      image_key: the feature holding the image.
      download: let TFDS download and prepare the dataset if it is missing.

    Returns:
      A :class:`LazyImages` of ``[H, W, 3]`` uint8 images.
    """
    import tensorflow_datasets as tfds

    source = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
    return LazyImages(len(source), lambda i: np.asarray(source[i][image_key]))


def as_rgb(image: np.ndarray) -> np.ndarray:
    """``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]`` or ``[H, W, 4]`` -> ``[H, W, 3]``, same dtype
    (bool -> uint8)."""
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"expected an [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] image, got {image.shape}"
        )
    if image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    return image[..., :3]
