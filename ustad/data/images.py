"""Reading, resizing and writing image files as float32 arrays in [0, 1].

Every reader in `ustad.data` goes through these functions so that all datasets agree on
channel handling (grayscale images become 3 identical channels unless `grayscale=True`),
resampling (images bilinear with antialiasing, masks nearest), orientation (a JPEG's EXIF
orientation tag is applied, so arrays and maps are upright as image viewers show them) and
error messages (an unreadable file raises an error that names it).
"""

from __future__ import annotations

import glob
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ustad.host_images import luma, resize_bilinear
from ustad.io import atomic_write

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")

# Resizing that changes an image's aspect ratio by more than this factor gets a warning: a 2-px
# pit squashed 2× along one axis is a 1-px line, and small defects are what students must find.
SQUASH_WARNING_RATIO = 1.5

logger = logging.getLogger(__name__)

# ITU-R BT.601 luma weights, the same ones PIL uses for RGB -> "L".

# PIL modes that hold one intensity channel; everything else is converted to RGB.
_GRAY_MODES = ("1", "L", "LA", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def as_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    """Normalises an image size argument to `(height, width)`.

    Args:
        image_size: an int (square) or a pair `(height, width)` of positive ints.

    Returns:
        `(height, width)`.
    """
    try:
        if isinstance(image_size, int | np.integer):
            size = (int(image_size), int(image_size))
        else:
            size = tuple(int(s) for s in image_size)
    except (TypeError, ValueError):
        size = ()
    if len(size) != 2 or min(size) < 1:
        raise ValueError(
            f"image_size must be a positive int or (height, width), got {image_size!r} "
            f"(--config.image_size=256 or --config.image_size='(256, 320)')"
        )
    return size


def fit_size(
    native_hw: Sequence[int],
    image_size: int | Sequence[int],
    *,
    keep_aspect: bool = False,
    multiple: int = 1,
) -> tuple[int, int]:
    """The `(height, width)` an image of native size `native_hw` is resized to.

    Args:
        native_hw: the image's `(H, W)`.
        image_size: an int or `(height, width)`.
        keep_aspect: False: `image_size` as it is (an int is a square). True: the short side
            becomes `image_size` (one int) and the long side keeps the aspect ratio; both are
            rounded to the nearest multiple of `multiple` (at least `multiple`).
        multiple: what `keep_aspect` rounds to, e.g. the pooling stride of the patch networks.

    Returns:
        `(height, width)`.
    """
    if not keep_aspect:
        return as_size(image_size)
    if not isinstance(image_size, int | np.integer):
        raise ValueError(
            f"--config.keep_aspect=True resizes the short side to --config.image_size, which "
            f"must then be one int, got {image_size!r}"
        )
    short = as_size(image_size)[0]
    height, width = (int(s) for s in native_hw)
    scale = short / min(height, width)
    return tuple(
        max(multiple, int(side * scale / multiple + 0.5) * multiple) for side in (height, width)
    )


def aspect_change(native_hw: Sequence[int], size_hw: Sequence[int]) -> float:
    """How much resizing `native_hw` to `size_hw` changes the aspect ratio, as a factor ≥ 1."""
    ratio = (native_hw[0] / native_hw[1]) / (size_hw[0] / size_hw[1])
    return max(ratio, 1 / ratio)


def warn_if_squashed(
    native_sizes: Sequence[Sequence[int]],
    names: Sequence[str | os.PathLike],
    size_hw: Sequence[int],
    *,
    multiple: int = 1,
    keep_aspect: bool = False,
) -> str | None:
    """Logs one warning when resizing images to `size_hw` changes the aspect ratio of any of
    them by more than `SQUASH_WARNING_RATIO`; the warning says how to keep it.

    Args:
        native_sizes: each image's native `(H, W)`.
        names: the images (paths), for the example named in the message.
        size_hw: the `(height, width)` they are resized to.
        multiple: the pooling stride, for the suggested `--config.image_size`.
        keep_aspect: `size_hw` already keeps the aspect ratio of most images (the others have
            another shape, which one size cannot keep).

    Returns:
        The warning, or None.
    """
    changes = [aspect_change(hw, size_hw) for hw in native_sizes]
    squashed = [i for i, change in enumerate(changes) if change > SQUASH_WARNING_RATIO]
    if not squashed:
        return None
    worst = max(squashed, key=changes.__getitem__)
    native = tuple(int(s) for s in native_sizes[worst])
    keep = fit_size(native, min(size_hw), keep_aspect=True, multiple=multiple)
    if keep_aspect:
        hint = (
            "--config.keep_aspect=True keeps the most common shape only: crop these images, or "
            "train them as a category of their own"
        )
    else:
        hint = (
            f"to keep it, train with --config.keep_aspect=True (the short side becomes "
            f"--config.image_size) or --config.image_size='({keep[0]}, {keep[1]})'"
        )
    message = (
        f"{len(squashed)} of {len(changes)} images are resized to {size_hw[0]}×{size_hw[1]} "
        f"(H×W), changing their aspect ratio by up to {changes[worst]:.2f}× (e.g. "
        f"{names[worst]}, {native[0]}×{native[1]}), which distorts small defects; {hint}"
    )
    logger.warning("%s", message)
    return message


def list_image_files(directory: str | os.PathLike) -> list[Path]:
    """Image files (png/jpg/jpeg/bmp, any case) directly inside `directory`, sorted by name.

    Hidden files (names starting with ".") are skipped, so editor and OS droppings such as
    `.DS_Store` or `._000.png` do not turn into corrupt-image errors.
    """
    directory = Path(directory)
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _pil_to_float(img: Image.Image) -> np.ndarray:
    """Returns `[H, W]` (one channel) or `[H, W, 3]` float32 in [0, 1]."""
    if img.mode in _SIXTEEN_BIT_MODES:
        return np.asarray(img, np.float32) / 65535.0
    if img.mode == "I":
        # PIL opens 16-bit grayscale PNGs as 32-bit "I"; values are in the 16-bit range.
        return np.clip(np.asarray(img, np.float32) / 65535.0, 0.0, 1.0)
    if img.mode == "F":
        return np.clip(np.asarray(img, np.float32), 0.0, 1.0)
    if img.mode in _GRAY_MODES:
        return np.asarray(img.convert("L"), np.float32) / 255.0
    return np.asarray(img.convert("RGB"), np.float32) / 255.0


# EXIF orientations (1–8) that swap height and width: transposed, or rotated by 90° or 270°.
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_ORIENTATION_TAG = 0x0112


def _open_and_convert(path: Path, convert, *, load: bool = True):
    try:
        with Image.open(path) as img:
            if load:
                img.load()
                # Cameras store pixels in sensor order and the rotation in the EXIF tag.
                if img.getexif().get(_ORIENTATION_TAG, 1) != 1:
                    img = ImageOps.exif_transpose(img)
            return convert(img)
    except FileNotFoundError:
        raise FileNotFoundError(f"Image file not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # PIL signals truncated/corrupt data with OSError (UnidentifiedImageError included),
        # SyntaxError (bad PNG chunks) or ValueError; all mean "this file is unusable".
        raise ValueError(f"Cannot read image file {path}: {err}") from err


def read_image(path: str | os.PathLike, *, grayscale: bool = False) -> np.ndarray:
    """Reads an image file at its native size.

    Args:
        path: a png/jpg/jpeg/bmp file, 8 or 16 bit, grayscale, palette, RGB or RGBA (alpha is
            dropped).
        grayscale: return one luminance channel instead of three.

    Returns:
        `[H, W, C]` float32 in [0, 1], upright (an EXIF orientation tag is applied); `C = 1` if
        `grayscale` else 3 (gray images are repeated).

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the file cannot be decoded (the message names it).
    """
    array = _open_and_convert(Path(path), _pil_to_float)
    if array.ndim == 2:
        array = array[..., None]
        return array if grayscale else np.repeat(array, 3, axis=-1)
    if grayscale:
        return luma(array)
    return array


def read_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """`(H, W)` of an image file from its header (the pixels are not decoded), upright as
    `read_image` returns it.

    Raises:
        FileNotFoundError, ValueError: as `read_image` (the message names the file).
    """

    def upright_size(img: Image.Image) -> tuple[int, int]:
        orientation = img.getexif().get(_ORIENTATION_TAG, 1)
        swap = orientation in _SWAPPING_ORIENTATIONS
        return (img.width, img.height) if swap else (img.height, img.width)

    return _open_and_convert(Path(path), upright_size, load=False)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Reads a mask file at its native size as `[H, W]` bool (True where any channel > 0)."""

    def convert(img: Image.Image) -> np.ndarray:
        if img.mode == "P":
            img = img.convert("RGB")
        elif img.mode in ("LA", "La", "PA"):
            img = img.convert("L")
        elif img.mode in ("RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"):
            img = img.convert("RGB")
        array = np.asarray(img)
        return array.any(axis=-1) if array.ndim == 3 else array > 0

    return _open_and_convert(Path(path), convert)


def resize_image(image: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """Bilinear resize with antialiasing (PIL's filter widens when downsampling).

    Args:
        image: `[H, W, C]` float32.
        size: target `(height, width)` or an int for a square.

    Returns:
        `[height, width, C]` float32; `image` itself when it already has that size.
    """
    height, width = as_size(size)
    if image.shape[:2] == (height, width):
        return image
    return resize_bilinear(image, (height, width))


def resize_mask(mask: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of a `[H, W]` bool mask to `[height, width]` bool."""
    height, width = as_size(size)
    if mask.shape == (height, width):
        return mask
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.resize((width, height), Image.Resampling.NEAREST)) > 0


def to_uint8(image: np.ndarray) -> np.ndarray:
    """`[..., C]` float in [0, 1] -> same shape uint8 (rounded, clipped)."""
    return np.clip(np.rint(np.asarray(image, np.float32) * 255.0), 0, 255).astype(np.uint8)


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a `[H, W]`, `[H, W, 1]` or `[H, W, 3]` uint8 array."""
    if array.dtype != np.uint8:
        raise ValueError(f"encode_png needs uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes a uint8 `[H, W]`/`[H, W, 1]`/`[H, W, 3]` array as PNG, atomically.

    The bytes go to a temporary file in the same directory that is then renamed, so a reader
    never sees a half-written image.
    """
    path = Path(path)
    atomic_write(path, encode_png(array))


def resolve_image_paths(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Image paths named by a directory, a glob pattern or an explicit list.

    Args:
        source: a directory (its image files, sorted; not recursive), a glob pattern such as
            `"photos/**/*.jpg"` (recursive `**` allowed; sorted), or a sequence of paths.

    Returns:
        The paths; raises FileNotFoundError if there are none.
    """
    if isinstance(source, str | os.PathLike):
        text = os.fspath(source)
        if Path(text).is_dir():
            paths = list_image_files(text)
        elif glob.has_magic(text):
            paths = sorted(
                Path(p)
                for p in glob.glob(text, recursive=True)
                if Path(p).suffix.lower() in IMAGE_EXTENSIONS and Path(p).is_file()
            )
        elif Path(text).is_file():
            paths = [Path(text)]
        else:
            raise FileNotFoundError(f"No such image file, directory or pattern: {text}")
        if not paths:
            raise FileNotFoundError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) in {text}")
        return paths
    paths = [Path(p) for p in source]
    if not paths:
        raise ValueError("Empty list of image paths")
    return paths


def load_images(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    image_size: int | Sequence[int] | None = None,
    grayscale: bool = False,
) -> tuple[list[np.ndarray], list[str]]:
    """Loads an image folder, glob or list of files.

    Args:
        source: see `resolve_image_paths`.
        image_size: resize every image to this size; None keeps native sizes.
        grayscale: one channel instead of three.

    Returns:
        `(images, paths)`: a list of `[H_i, W_i, C]` float32 arrays in [0, 1] and their paths.
    """
    paths = resolve_image_paths(source)
    images = []
    for path in paths:
        image = read_image(path, grayscale=grayscale)
        if image_size is not None:
            image = resize_image(image, image_size)
        images.append(image)
    return images, [str(p) for p in paths]
