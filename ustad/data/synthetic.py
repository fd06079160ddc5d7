"""Synthetic anomaly-detection data: real textures with procedural defects and exact masks.

Anomaly-free images are random crops (with random flips) of a texture or photo bundled with
scikit-image, so the good images vary and the task is a genuine one-class problem. Defective
images are good images with one procedural defect; the mask is computed as the set of pixels
whose saved 8-bit value actually changed, so it covers exactly the altered pixels.

The result is written in the MVTec AD layout and loads with `load_mvtec_category`.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from ustad.data.images import as_size, resize_image, to_uint8

# Stationary textures (good images look alike wherever they are cropped).
TEXTURES = ("brick", "grass", "gravel", "immunohistochemistry", "hubble_deep_field")
# Photos also work as sources (crops then vary more; a harder one-class problem).
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "moon", "rocket", "retina")
# Rendered objects on a plain background (`object_view`): the object's place, turn and light
# vary a little from image to image, as parts on a conveyor do.
OBJECTS = ("washer",)
DEFECT_TYPES = ("scratch", "stain", "foreign", "hole")


def _skimage(module: str):
    """``skimage.<module>``, imported only when synthetic data is made: training and scoring
    image folders do not need scikit-image (a plain ``pip install`` may lack it)."""
    import importlib

    try:
        return importlib.import_module(f"skimage.{module}")
    except ImportError as error:
        raise ImportError(
            "synthetic data (the demo, the smoke configs) needs scikit-image, which is not "
            "installed here: pip install scikit-image (training on your own images does not)"
        ) from error


@functools.cache
def _source(name: str) -> np.ndarray:
    if name not in TEXTURES + PHOTOS:
        raise ValueError(f"Unknown texture {name!r}; choose from {TEXTURES + PHOTOS}")
    array = np.asarray(getattr(_skimage("data"), name)())
    if array.ndim == 2:
        array = array[..., None]
    array = array[..., :3].astype(np.float32) / 255.0
    array.setflags(write=False)
    return array


def load_texture(name: str) -> np.ndarray:
    """A bundled scikit-image texture or photo, `[H, W, C]` float32 in [0, 1], C = 1 or 3."""
    return _source(name)


def random_view(
    source: np.ndarray, size: tuple[int, int], rng: np.random.Generator, crop_fraction: float
) -> np.ndarray:
    """A random crop of `source` (random flips), resized to `size`.

    Args:
        source: `[H, W, C]` float32.
        size: output `(height, width)`.
        rng: numpy generator.
        crop_fraction: crop height as a fraction of `min(H, W)`; the width follows the output
            aspect ratio. A fixed fraction keeps the texture at one scale across images.

    Returns:
        `[height, width, C]` float32 in [0, 1].
    """
    height, width = size
    crop_h = max(1, round(crop_fraction * min(source.shape[:2])))
    crop_w = min(source.shape[1], max(1, round(crop_h * width / height)))
    top = rng.integers(0, source.shape[0] - crop_h + 1)
    left = rng.integers(0, source.shape[1] - crop_w + 1)
    crop = source[top : top + crop_h, left : left + crop_w]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1]
    return resize_image(np.ascontiguousarray(crop), size)


def object_view(size: tuple[int, int], rng: np.random.Generator, surface: np.ndarray) -> np.ndarray:
    """A "washer" on a plain dark background: a copper-coloured ring, shaded by a radial
    profile, its surface modulated by a texture, at a slightly random place and turn.

    Args:
        size: output `(height, width)`.
        rng: numpy generator (each image its own, for determinism).
        surface: `[H', W', C]` float32 texture whose random view (mean over channels) modulates
            the ring's surface by ±15 %.

    Returns:
        `[height, width, 3]` float32 in [0, 1].
    """
    height, width = size
    side = min(size)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    centre = np.array([height, width], np.float32) / 2 + rng.uniform(-0.03, 0.03, 2) * side
    turn = rng.uniform(0, 2 * np.pi)
    dy, dx = rows - centre[0], cols - centre[1]
    # A slightly elliptical ring (axes 0.34 / 0.31 of the side), turned as a whole.
    u = dx * np.cos(turn) + dy * np.sin(turn)
    v = -dx * np.sin(turn) + dy * np.cos(turn)
    radius = np.sqrt((u / 0.34) ** 2 + (v / 0.31) ** 2) / side  # 1 on the outer edge
    edge = 1.5 / side  # anti-aliasing width, in the same normalised radius
    inner = 0.42
    outside_hole = np.clip((radius - inner) / edge + 0.5, 0, 1)
    coverage = np.clip((1 - radius) / edge + 0.5, 0, 1) * outside_hole
    # Radial shading: a bevel bright in the middle of the ring, darker at both edges.
    profile = 0.65 + 0.35 * np.cos(np.pi * (radius - (1 + inner) / 2) / (1 - inner))
    texture = random_view(surface, size, rng, 0.5).mean(axis=-1)
    modulation = 1 + 0.3 * (texture - texture.mean())
    light = rng.uniform(0.95, 1.05)
    copper = np.array([0.85, 0.55, 0.32], np.float32)
    ring = np.clip((profile * modulation * light)[..., None] * copper, 0, 1)
    background = np.float32(0.1 + rng.uniform(-0.01, 0.01))
    noise = rng.normal(0.0, 0.008, size=(height, width, 1)).astype(np.float32)
    image = coverage[..., None] * ring + (1 - coverage[..., None]) * (background + noise)
    return np.clip(image, 0, 1).astype(np.float32)


def _contrasting_value(image: np.ndarray, region: np.ndarray, rng: np.random.Generator):
    """An intensity far from the region's mean (dark on bright textures, bright on dark)."""
    mean = float(image[region].mean()) if region.any() else float(image.mean())
    return rng.uniform(0.0, 0.15) if mean > 0.5 else rng.uniform(0.85, 1.0)


def _random_colour(image: np.ndarray, region: np.ndarray, rng: np.random.Generator):
    """`[C]` colour: contrasting intensity, and for RGB images a random tint of it."""
    value = _contrasting_value(image, region, rng)
    if image.shape[-1] == 1:
        return np.array([value], np.float32)
    tint = rng.uniform(-0.25, 0.25, size=3)
    return np.clip(value + tint, 0.0, 1.0).astype(np.float32)


def _scratch_region(shape, rng):
    height, width = shape
    side = min(shape)
    length = rng.uniform(0.3, 0.7) * side
    angle = rng.uniform(0, np.pi)
    direction = np.array([np.sin(angle), np.cos(angle)])
    normal = np.array([-direction[1], direction[0]])
    centre = rng.uniform(0.25, 0.75, size=2) * np.array([height, width])
    bend = rng.uniform(-0.15, 0.15) * length
    t = np.linspace(-0.5, 0.5, int(4 * length))
    points = centre + np.outer(t * length, direction) + np.outer(bend * np.cos(np.pi * t), normal)
    rows = np.clip(np.rint(points[:, 0]).astype(int), 0, height - 1)
    cols = np.clip(np.rint(points[:, 1]).astype(int), 0, width - 1)
    region = np.zeros(shape, bool)
    region[rows, cols] = True
    thickness = int(rng.integers(1, 4))
    if thickness > 1:
        region = ndimage.binary_dilation(region, iterations=thickness - 1)
    return region


def _blob_region(shape, rng, scale=(0.05, 0.13)):
    """A smooth-edged random blob: union of ellipses, boundary smoothed and re-thresholded."""
    side = min(shape)
    centre = rng.uniform(0.25, 0.75, size=2) * np.array(shape)
    region = np.zeros(shape, bool)
    for _ in range(int(rng.integers(2, 6))):
        offset = rng.normal(0.0, 0.05 * side, size=2)
        radii = rng.uniform(*scale, size=2) * side
        rr, cc = _skimage("draw").ellipse(
            *(centre + offset), *radii, shape=shape, rotation=rng.uniform(0, np.pi)
        )
        region[rr, cc] = True
    return ndimage.gaussian_filter(region.astype(np.float32), 0.02 * side + 0.5) > 0.5


def _polygon_region(shape, rng):
    side = min(shape)
    centre = rng.uniform(0.25, 0.75, size=2) * np.array(shape)
    count = int(rng.integers(4, 8))
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=count))
    radii = rng.uniform(0.07, 0.18, size=count) * side
    rows = centre[0] + radii * np.sin(angles)
    cols = centre[1] + radii * np.cos(angles)
    region = np.zeros(shape, bool)
    rr, cc = _skimage("draw").polygon(rows, cols, shape=shape)
    region[rr, cc] = True
    return region


def _apply(kind, image, rng, foreign_view):
    """The defective float image (before quantisation) for one defect kind."""
    shape = image.shape[:2]
    out = image.copy()
    if kind == "scratch":
        region = _scratch_region(shape, rng)
        out[region] = _random_colour(image, region, rng)
    elif kind == "stain":
        region = _blob_region(shape, rng)
        alpha = rng.uniform(0.5, 0.8)
        out[region] = (1 - alpha) * image[region] + alpha * _random_colour(image, region, rng)
    elif kind == "foreign":
        region = _polygon_region(shape, rng)
        patch = foreign_view()
        if patch.shape[-1] != image.shape[-1]:
            patch = (
                patch.mean(axis=-1, keepdims=True)
                if image.shape[-1] == 1
                else np.repeat(patch, image.shape[-1], axis=-1)
            )
        out[region] = patch[region]
    elif kind == "hole":
        region = _blob_region(shape, rng, scale=(0.04, 0.09))
        depth = np.zeros(shape, np.float32)
        depth[region] = rng.uniform(0.02, 0.12)
        noise = rng.normal(0.0, 0.02, size=shape).astype(np.float32)
        out[region] = np.clip(depth + noise, 0.0, 1.0)[region][:, None]
    else:
        raise ValueError(f"Unknown defect type {kind!r}; choose from {DEFECT_TYPES}")
    return out


def add_defect(
    image: np.ndarray,
    kind: str,
    rng: np.random.Generator,
    *,
    foreign_view: Callable[[], np.ndarray] | None = None,
    within: np.ndarray | None = None,
    max_tries: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Adds one procedural defect to an 8-bit image.

    Args:
        image: `[H, W, C]` uint8.
        kind: "scratch" (thin curved line of a contrasting colour), "stain" (blob blended with
            a colour), "foreign" (polygon cut out of another texture) or "hole" (dark blob).
        rng: numpy generator.
        foreign_view: returns a `[H, W, C']` float32 view of another texture; needed for
            "foreign".
        within: optional `[H, W]` bool: the defect changes only these pixels (an object's, not
            its background's), and is redrawn unless it changes at least 16 of them.
        max_tries: redraws if a defect happens to change no pixel (too few, with `within`).

    Returns:
        `(defective, mask)`: `[H, W, C]` uint8 and `[H, W]` bool, with
        `mask == (defective != image).any(-1)` exactly.
    """
    if kind == "foreign" and foreign_view is None:
        raise ValueError("The 'foreign' defect needs foreign_view")
    base = image.astype(np.float32) / 255.0
    least = 1 if within is None else 16
    for _ in range(max_tries):
        defective = to_uint8(_apply(kind, base, rng, foreign_view))
        if within is not None:
            defective = np.where(within[..., None], defective, image)
        mask = (defective != image).any(axis=-1)
        if mask.sum() >= least:
            return defective, mask
    raise RuntimeError(f"Defect {kind!r} changed fewer than {least} pixels in {max_tries} tries")


def _save(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array).save(path)


def make_synthetic_category(
    root: str | os.PathLike,
    category: str = "synthetic",
    *,
    texture: str = "grass",
    foreign_texture: str | None = None,
    image_size: int | Sequence[int] = 128,
    num_train: int = 30,
    num_test_good: int = 10,
    num_test_per_defect: int = 5,
    defect_types: Sequence[str] = DEFECT_TYPES,
    crop_fraction: float = 0.5,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Writes a synthetic category in the MVTec AD layout.

    ```
    <root>/<category>/train/good/000.png ...
    <root>/<category>/test/good/000.png ...
    <root>/<category>/test/<defect>/000.png ...
    <root>/<category>/ground_truth/<defect>/000_mask.png   (0 / 255)
    <root>/<category>/synthetic.json                       (the arguments)
    ```
    Gray sources give 8-bit gray PNGs, colour sources RGB. Each image draws from its own
    generator seeded by `(seed, split, defect, index)`, so the output depends only on the
    arguments, and changing one count leaves the other images unchanged. The category is
    written to a temporary folder and renamed into place when complete.

    Args:
        root: parent folder.
        category: category folder name.
        texture: one of `TEXTURES` or `PHOTOS` (scikit-image bundled images: random crops),
            or of `OBJECTS` (a rendered object on a plain background, `object_view`, whose
            surface is modulated by "gravel"; `crop_fraction` is then unused).
        foreign_texture: source of "foreign" cut-outs; default "gravel" (or "brick" when
            `texture` is "gravel").
        image_size: int or `(height, width)`.
        num_train: anomaly-free training images.
        num_test_good: anomaly-free test images.
        num_test_per_defect: defective test images per defect type.
        defect_types: subset of `DEFECT_TYPES`.
        crop_fraction: crop height / shorter side of the source (sets the texture's scale).
        seed: random seed.
        overwrite: replace an existing `<root>/<category>`; otherwise it is an error.

    Returns:
        `<root>/<category>`.
    """
    size = as_size(image_size)
    unknown = [k for k in defect_types if k not in DEFECT_TYPES]
    if unknown:
        raise ValueError(f"Unknown defect types {unknown}; choose from {DEFECT_TYPES}")
    if num_train < 1 or min(num_test_good, num_test_per_defect) < 0 or seed < 0:
        raise ValueError("Need num_train >= 1, test counts >= 0 and seed >= 0")
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    if texture not in TEXTURES + PHOTOS + OBJECTS:
        raise ValueError(f"Unknown texture {texture!r}; choose from {TEXTURES + PHOTOS + OBJECTS}")
    if foreign_texture is None:
        foreign_texture = "brick" if texture == "gravel" else "gravel"
    foreign = _source(foreign_texture)
    if texture in OBJECTS:
        surface = _source("gravel")

        def view(rng: np.random.Generator) -> np.ndarray:
            return object_view(size, rng, surface)
    else:
        source = _source(texture)

        def view(rng: np.random.Generator) -> np.ndarray:
            return random_view(source, size, rng, crop_fraction)

    root = Path(root)
    target = root / category
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    root.mkdir(parents=True, exist_ok=True)

    def good_image(split: int, index: int) -> np.ndarray:
        rng = np.random.default_rng([seed, split, 0, index])
        return to_uint8(view(rng))

    tmp = Path(tempfile.mkdtemp(prefix=f".{category}.tmp-", dir=root))
    try:
        (tmp / "train/good").mkdir(parents=True)
        (tmp / "test/good").mkdir(parents=True)
        for i in range(num_train):
            _save(tmp / "train/good" / f"{i:03d}.png", good_image(0, i))
        for i in range(num_test_good):
            _save(tmp / "test/good" / f"{i:03d}.png", good_image(1, i))
        for kind in defect_types:
            # Seeded by the kind's place in DEFECT_TYPES, so a subset keeps the same images.
            d = DEFECT_TYPES.index(kind)
            (tmp / "test" / kind).mkdir(parents=True)
            (tmp / "ground_truth" / kind).mkdir(parents=True)
            for i in range(num_test_per_defect):
                rng = np.random.default_rng([seed, 2, d + 1, i])
                clean = to_uint8(view(rng))
                defective, mask = add_defect(
                    clean,
                    kind,
                    rng,
                    foreign_view=lambda rng=rng: random_view(foreign, size, rng, crop_fraction),
                    # Objects: defects on the object (a hole in the background is no defect).
                    within=clean.mean(axis=-1) > 0.2 * 255 if texture in OBJECTS else None,
                )
                _save(tmp / "test" / kind / f"{i:03d}.png", defective)
                mask_png = mask.astype(np.uint8) * 255
                _save(tmp / "ground_truth" / kind / f"{i:03d}_mask.png", mask_png)
        arguments = {
            "texture": texture,
            "foreign_texture": foreign_texture,
            "image_size": list(size),
            "num_train": num_train,
            "num_test_good": num_test_good,
            "num_test_per_defect": num_test_per_defect,
            "defect_types": list(defect_types),
            "crop_fraction": crop_fraction,
            "seed": seed,
        }
        (tmp / "synthetic.json").write_text(json.dumps(arguments, indent=2) + "\n")
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{category}.old-", dir=root))
            os.replace(target, trash / category)
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
