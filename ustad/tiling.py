"""Scoring images larger than the training size: tiles at the training resolution, stitched.

An image of H × W pixels is covered by tiles of the model's input size ``(th, tw)`` at its own
resolution (nothing is resized, so a defect of a few pixels stays a few pixels). Along each
axis the tiles overlap by at least ``overlap`` (a fraction of the tile, 0 ≤ overlap < 1): with
``n = ceil((L − t) / (t − round(overlap·t))) + 1`` tiles the starts are spread evenly over
``0 … L − t`` (rounded), so the first tile starts at 0, the last one ends flush with the image's
border, every pixel is covered and no tile leaves the image.

Stitching (:func:`stitch`) is a trimmed mean: each tile's map is trusted only where it is at
least ``margin`` pixels from an edge that another tile covers (a tile's edge on the image's own
border is kept: the whole image has that border too), and each pixel is the mean of the tiles
that trust it. The default margin is half the smallest overlap (rounded down), the most that
still leaves every pixel trusted by at least one tile. A map computed by a translation-
equivariant function whose receptive field reaches at most ``margin`` pixels (zero-padded at
the borders) is then exactly the map of the whole image (tests/test_tiling.py); a network's
zero-padding artefacts along inner tile edges never reach the stitched map. ``margin=0`` is the
plain mean over overlaps.

Pure NumPy; knows no model (:class:`ustad.detector.MapDetector` uses it with ``tile=True``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

DEFAULT_OVERLAP = 0.25


def check_overlap(overlap) -> float:
    """``overlap`` as a float, or ``ValueError`` unless it is a finite number in [0, 1)."""
    if isinstance(overlap, bool) or not isinstance(overlap, int | float | np.integer | np.floating):
        raise ValueError(f"tile overlap must be a fraction of the tile in [0, 1), got {overlap!r}")
    if not (math.isfinite(overlap) and 0 <= overlap < 1):
        raise ValueError(
            f"tile overlap must be a fraction of the tile in [0, 1) (e.g. 0.25), got {overlap!r}"
        )
    return float(overlap)


def tile_starts(length: int, tile: int, overlap: float = DEFAULT_OVERLAP) -> list[int]:
    """Starts of the tiles covering ``length`` pixels with tiles of ``tile`` pixels overlapping
    by at least ``overlap`` (a fraction of ``tile``); the first is 0, the last ``length − tile``.

    Raises:
      ValueError: ``length < tile`` or a bad ``overlap``.
    """
    overlap = check_overlap(overlap)
    length, tile = int(length), int(tile)
    if tile < 1:
        raise ValueError(f"tile size must be ≥ 1 pixel, got {tile}")
    if length < tile:
        raise ValueError(f"{length} pixels are fewer than the {tile}-pixel tile")
    if length == tile:
        return [0]
    stride = max(1, tile - round(overlap * tile))
    count = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


@dataclasses.dataclass(frozen=True)
class TileLayout:
    """Where the tiles of one image size lie.

    Attributes:
      image_hw: ``(H, W)`` of the image.
      tile_hw: ``(th, tw)`` of each tile.
      tops: the tiles' first rows (one per row of tiles).
      lefts: the tiles' first columns (one per column of tiles).
      margin: ``(my, mx)`` pixels of each tile's inner edges not trusted when stitching.
    """

    image_hw: tuple[int, int]
    tile_hw: tuple[int, int]
    tops: tuple[int, ...]
    lefts: tuple[int, ...]
    margin: tuple[int, int]

    @property
    def origins(self) -> list[tuple[int, int]]:
        """``(top, left)`` of every tile, row by row (the order of :func:`extract_tiles`)."""
        return [(top, left) for top in self.tops for left in self.lefts]

    def __len__(self) -> int:
        return len(self.tops) * len(self.lefts)


def _min_overlap(starts: Sequence[int], tile: int) -> int:
    gaps = np.diff(starts)
    return int(tile - gaps.max()) if len(gaps) else 0


def tile_layout(
    image_hw: Sequence[int],
    tile_hw: Sequence[int],
    overlap: float = DEFAULT_OVERLAP,
    margin: int | None = None,
) -> TileLayout:
    """The tiles covering an image (see the module docstring).

    Args:
      image_hw: ``(H, W)``.
      tile_hw: ``(th, tw)``, the model's input size.
      overlap: the least overlap of neighbouring tiles, a fraction of the tile in [0, 1).
      margin: pixels of each inner tile edge left out of the stitched map; None = half the
        smallest overlap along each axis (rounded down).

    Raises:
      ValueError: the image is smaller than the tile (message "image H×W is smaller than the
        th×tw tile"), a bad overlap, or a margin larger than half the overlap.
    """
    height, width = (int(s) for s in image_hw)
    th, tw = (int(s) for s in tile_hw)
    if height < th or width < tw:
        raise ValueError(
            f"image {height}×{width} (H×W) is smaller than the {th}×{tw} tile: score it "
            f"without tiling, or use a model trained at a smaller size"
        )
    tops, lefts = tile_starts(height, th, overlap), tile_starts(width, tw, overlap)
    halves = (_min_overlap(tops, th) // 2, _min_overlap(lefts, tw) // 2)
    if margin is None:
        margins = halves
    else:
        if isinstance(margin, bool) or not isinstance(margin, int | np.integer) or margin < 0:
            raise ValueError(f"tile margin must be an integer ≥ 0 pixels, got {margin!r}")
        for count, half in zip((len(tops), len(lefts)), halves, strict=True):
            if count > 1 and margin > half:
                raise ValueError(
                    f"tile margin {margin} is more than half the tiles' smallest overlap "
                    f"({2 * half} pixels): some pixels would be in no tile's trusted part"
                )
        margins = (int(margin), int(margin))
    return TileLayout((height, width), (th, tw), tuple(tops), tuple(lefts), margins)


def extract_tiles(images: np.ndarray, layout: TileLayout) -> np.ndarray:
    """``[N, H, W, ...]`` images → ``[N·T, th, tw, ...]`` tiles, image by image, each image's
    tiles in :attr:`TileLayout.origins` order."""
    images = np.asarray(images)
    if tuple(images.shape[1:3]) != layout.image_hw:
        raise ValueError(
            f"images of {images.shape[1]}×{images.shape[2]} do not match the layout's "
            f"{layout.image_hw[0]}×{layout.image_hw[1]}"
        )
    th, tw = layout.tile_hw
    tiles = [images[:, t : t + th, left : left + tw] for t, left in layout.origins]
    return np.stack(tiles, axis=1).reshape(-1, th, tw, *images.shape[3:])


def _weights(starts: Sequence[int], tile: int, length: int, margin: int) -> list[np.ndarray]:
    """Per tile along one axis: 1 where the tile is trusted, 0 within ``margin`` of an edge
    that is not the image's border."""
    weights = []
    for start in starts:
        w = np.ones(tile, np.float32)
        if margin:
            if start > 0:
                w[:margin] = 0
            if start + tile < length:
                w[tile - margin :] = 0
        weights.append(w)
    return weights


def stitch(tile_maps: np.ndarray, layout: TileLayout) -> np.ndarray:
    """``[N·T, th, tw]`` tile maps (in :func:`extract_tiles` order) → ``[N, H, W]`` float32: the
    trimmed mean over overlapping tiles (module docstring)."""
    tile_maps = np.asarray(tile_maps, np.float32)
    th, tw = layout.tile_hw
    count = len(layout)
    if tile_maps.ndim != 3 or tile_maps.shape[1:] != (th, tw) or len(tile_maps) % count:
        raise ValueError(
            f"tile maps must be [N·{count}, {th}, {tw}] for this layout, got {tile_maps.shape}"
        )
    height, width = layout.image_hw
    row_w = _weights(layout.tops, th, height, layout.margin[0])
    col_w = _weights(layout.lefts, tw, width, layout.margin[1])
    maps = tile_maps.reshape(-1, count, th, tw)
    total = np.zeros((len(maps), height, width), np.float32)
    weight = np.zeros((height, width), np.float32)
    i = 0
    for top, wy in zip(layout.tops, row_w, strict=True):
        for left, wx in zip(layout.lefts, col_w, strict=True):
            w = wy[:, None] * wx[None, :]
            total[:, top : top + th, left : left + tw] += maps[:, i] * w
            weight[top : top + th, left : left + tw] += w
            i += 1
    if not (weight > 0).all():  # a layout built by tile_layout never gets here
        raise ValueError("the tiles' trusted parts do not cover the image: lower the margin")
    return total / weight


def check_tiles_fit(sizes, paths, tile_sizes) -> None:
    """``ValueError`` naming the first image smaller than a tile, before anything is scored.

    Args:
      sizes: each image's ``(H, W)``.
      paths: the images (for the message).
      tile_sizes: the ``(th, tw)`` of each group of models (their training sizes).
    """
    for size, path in zip(sizes, paths, strict=True):
        height, width = (int(s) for s in size)
        for th, tw in tile_sizes:
            if height < th or width < tw:
                raise ValueError(
                    f"image {height}×{width} (H×W, {path}) is smaller than the {th}×{tw} tile: "
                    f"score it without --tile, or use a model trained at a smaller size"
                )


def check_tile_fits_training(image_hw, tile_hw, source: str = "the training images") -> None:
    """``ValueError`` when training tiles of ``tile_hw`` cannot be cut from images of
    ``image_hw`` (training on tiles: ``--config.train_tiles``)."""
    (height, width), (th, tw) = (tuple(int(s) for s in image_hw), tuple(int(s) for s in tile_hw))
    if height < th or width < tw:
        raise ValueError(
            f"--config.train_tiles: {source} are {height}×{width} (H×W), smaller than the "
            f"{th}×{tw} tile (--config.image_size); lower --config.image_size or train without "
            f"tiles"
        )


def crop_offsets(rng: np.random.Generator, size: int, crop: int, count: int) -> np.ndarray:
    """``count`` offsets of a ``crop``-pixel window along an axis of ``size`` pixels, drawn so
    that the border pixels are inside the window no less often than the least-covered others.

    Offsets uniform over the ``size − crop + 1`` places where the window fits cover a border
    pixel ``crop`` times less often than a central one (for a 256-px tile of a 1130-px side:
    one offset in 875 against 256): a part that appears only near the images' borders is then
    barely trained on, and scores as a defect. Here the window's position is drawn uniformly
    over the ``size + crop − 1`` places where it overlaps the axis, then moved inside: every
    pixel is covered with probability at least ``crop / (size + crop − 1)``, the border pixels
    exactly that when ``crop < size`` (uniform offsets: ``1 / (size − crop + 1)``).
    """
    return np.clip(rng.integers(-(crop - 1), size, size=count), 0, size - crop)


def random_crops(images: np.ndarray, tile_hw, seed: int, step: int) -> np.ndarray:
    """One tile-sized crop of each image at a random position (:func:`crop_offsets`: borders
    covered as often as the middle), drawn from ``numpy.random.default_rng([seed, step])`` (a
    resumed run draws the same crops).

    Args:
      images: ``[B, H, W, C]`` host images.
      tile_hw: ``(th, tw)`` ≤ ``(H, W)``.

    Returns:
      ``[B, th, tw, C]``.
    """
    images = np.asarray(images)
    th, tw = (int(s) for s in tile_hw)
    check_tile_fits_training(images.shape[1:3], (th, tw))
    rng = np.random.default_rng([int(seed), int(step)])
    tops = crop_offsets(rng, images.shape[1], th, len(images))
    lefts = crop_offsets(rng, images.shape[2], tw, len(images))
    return np.stack(
        [
            image[t : t + th, left : left + tw]
            for image, t, left in zip(images, tops, lefts, strict=True)
        ]
    )


def image_tiles(images: np.ndarray, tile_hw, overlap: float = DEFAULT_OVERLAP) -> np.ndarray:
    """Every image's tiles as scoring by tiles cuts them (:func:`tile_layout`):
    ``[N·T, th, tw, C]`` (validation and score statistics of a run trained on tiles)."""
    images = np.asarray(images)
    check_tile_fits_training(images.shape[1:3], tile_hw, "the held-out images")
    return extract_tiles(images, tile_layout(images.shape[1:3], tile_hw, overlap))
