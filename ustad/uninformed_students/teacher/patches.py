"""Patches for teacher pretraining (paper §3): random crops of an image source, positives.

:class:`ContextSampler` draws random crops from a pool of images held in memory, out of any
source of :mod:`ustad.uninformed_students.teacher.sources`; a source larger than the pool is
visited pool by pool, each pool a seeded random subset loaded in the background.
Crops are drawn at several scales (each pool image is kept at a few resize factors, ``levels``),
optionally flipped left-right and colour-jittered (brightness, contrast, saturation).
A crop is a *context*: the p×p patch plus a margin, so that the positive p⁺ (a slightly shifted,
zoomed and noisy copy) can be resampled around the same centre on the device by
:func:`perturb`, vectorised over the batch. Everything is a function of ``(key, step)``: a
resumed run draws exactly the patches the interrupted one would have.
"""

from __future__ import annotations

import concurrent.futures
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ustad.data.images import resize_image
from ustad.data.pipeline import numpy_rng
from ustad.host_images import LUMA
from ustad.uninformed_students.teacher.sources import as_rgb

__all__ = [
    "ContextSampler",
    "center_crop",
    "perturb",
    "perturbation_margin",
    "to_gray",
]


# ITU-R BT.601 luma, as ustad.data.images uses for grayscale reading.


# A pool is the unit of image loading; a seed tag keeps pool choice apart from patch positions.
_POOL_TAG = 0x504F4F4C


def _as_float(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    return np.clip(image.astype(np.float32), 0.0, 1.0)


class ContextSampler:
    """Random square crops ("contexts") from a pool of images, a function of ``(key, step)``.

    Positions are uniform over all valid crop positions of the pool, so an image contributes in
    proportion to its area.

    Args:
      images: a sequence of ``[H, W, C]`` images (C ∈ {1, 3, 4}; uint8, bool or float in
        [0, 1]): a list, or a source of :mod:`ustad.uninformed_students.teacher.sources`.
      size: side of the crops (the patch size p plus twice any margin).
      key: typed PRNG key; the crops of step s depend only on ``(key, s)``.
      scale: images are resized by this factor when they enter the pool (e.g. ``p /
        crop_size`` to make a p×p crop cover ``crop_size`` pixels of the original, antialiased).
      pool_size: images held in memory at a time. A source this small or smaller is loaded once;
        a larger one is visited in pools of ``pool_size`` random images.
      steps_per_pool: calls of :meth:`sample` (steps) served by one pool.
      workers: threads that load a pool (image decoding releases the GIL); the next pool is
        loaded in the background while the current one serves.
      levels: resize factors (relative to ``scale``) at which every pool image is kept; each
        crop first picks a level uniformly, then a position uniform over that level's valid
        crop positions. ``(1.0, 0.5, 0.25)`` makes a crop cover 1×, 2× or 4× as many original
        pixels. A level at which an image is smaller than a crop is skipped for that image
        (its first level is always kept, enlarged if need be).
      flip: mirror each crop left-right with probability ½.
      color_jitter: j ≥ 0; each crop's brightness, contrast and saturation are scaled by
        factors uniform in [1 − j, 1 + j] (then clipped to [0, 1]). 0 turns it off.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        size: int,
        key: jax.Array,
        *,
        scale: float = 1.0,
        pool_size: int = 1024,
        steps_per_pool: int = 64,
        workers: int = 8,
        levels: Sequence[float] = (1.0,),
        flip: bool = False,
        color_jitter: float = 0.0,
    ):
        if len(images) == 0:
            raise ValueError("the image source is empty")
        levels = tuple(float(level) for level in levels)
        if not levels or any(not 0 < level <= 1 for level in levels):
            raise ValueError(f"levels must be resize factors in (0, 1], got {levels}")
        if not 0 <= color_jitter < 1:
            raise ValueError(f"color_jitter must be in [0, 1), got {color_jitter}")
        self.levels = levels
        self.flip = bool(flip)
        self.color_jitter = float(color_jitter)
        if size < 1 or scale <= 0:
            raise ValueError(f"need size >= 1 and scale > 0, got size={size}, scale={scale}")
        self.images = images
        self.size = int(size)
        self.key = key
        self.scale = float(scale)
        self.pool_size = int(pool_size)
        self.steps_per_pool = int(steps_per_pool)
        # Two executors: a pool is assembled in the background by one thread that waits on the
        # image loads of the others (sharing one executor could deadlock).
        self._loaders = concurrent.futures.ThreadPoolExecutor(max(1, workers))
        self._background = concurrent.futures.ThreadPoolExecutor(1)
        self._pools: dict[int, concurrent.futures.Future] = {}

    @property
    def single_pool(self) -> bool:
        """Whether the whole source fits in one pool (loaded once)."""
        return len(self.images) <= self.pool_size

    def pool_index(self, step: int) -> int:
        return 0 if self.single_pool else step // self.steps_per_pool

    def pool_members(self, pool: int) -> np.ndarray:
        """Indices into the source of the images of pool ``pool``."""
        if self.single_pool:
            return np.arange(len(self.images))
        rng = numpy_rng(jax.random.fold_in(jax.random.fold_in(self.key, _POOL_TAG), pool))
        return np.sort(rng.choice(len(self.images), self.pool_size, replace=False))

    def _resized(self, image: np.ndarray, scale: float) -> np.ndarray:
        """The image resized by ``scale``, as uint8: a pool of float32 photos would take 4× the
        memory (2–3 GB for 500 photos at three levels), and a photo decoded from 8 bits loses
        nothing in the round trip."""
        height, width = image.shape[:2]
        if scale != 1.0:
            size = (max(self.size, round(height * scale)), max(self.size, round(width * scale)))
            image = resize_image(_as_float(image), size)
        if image.dtype == np.uint8:
            return image
        return np.rint(_as_float(image) * 255).astype(np.uint8)

    def _prepare(self, index: int) -> list[np.ndarray]:
        """The image of source index ``index`` at every level it is large enough for."""
        image = as_rgb(np.asarray(self.images[index]))
        short = min(image.shape[:2])
        out = []
        for k, level in enumerate(self.levels):
            scale = self.scale * level
            if short * scale < self.size:
                if k:
                    continue
                # Only images too small for one crop are enlarged beyond `self.scale`.
                scale = self.size / short
            out.append(self._resized(image, scale))
        return out

    def _load_pool(self, pool: int) -> list[list[np.ndarray]]:
        return list(self._loaders.map(self._prepare, self.pool_members(pool)))

    def pool(self, pool: int) -> list[list[np.ndarray]]:
        """The prepared images of pool ``pool``, each a list of ``[H, W, 3]`` arrays (one per
        level it is large enough for); starts loading the next pool."""
        if pool not in self._pools:
            self._pools[pool] = self._background.submit(self._load_pool, pool)
        if not self.single_pool and pool + 1 not in self._pools:
            self._pools[pool + 1] = self._background.submit(self._load_pool, pool + 1)
        for old in [k for k in self._pools if k < pool]:
            del self._pools[old]
        return self._pools[pool].result()

    def sample(self, step: int, batch_size: int, key: jax.Array | None = None) -> np.ndarray:
        """The crops of one step.

        Args:
          step: training step (with the key, it fixes the crops and the pool).
          batch_size: B.
          key: draw positions with this key instead of the sampler's (same pool), e.g. for
            patches that must not repeat the training batches.

        Returns:
          ``[B, size, size, 3]`` float32 in [0, 1].
        """
        pyramids = self.pool(self.pool_index(step))
        rng = numpy_rng(jax.random.fold_in(self.key if key is None else key, step))
        # (image, level) pairs; every level gets the same total probability and, within a
        # level, an image's share is its number of valid crop positions.
        images, weights = [], []
        for level in range(len(self.levels)):
            members = [pyramid[level] for pyramid in pyramids if len(pyramid) > level]
            valid = np.array(
                [(x.shape[0] - self.size + 1) * (x.shape[1] - self.size + 1) for x in members],
                np.float64,
            )
            if valid.sum() > 0:
                images += members
                weights.append(valid / valid.sum())
        probabilities = np.concatenate(weights) / len(weights)
        which = rng.choice(len(images), size=batch_size, p=probabilities)
        tops = rng.random(batch_size)
        lefts = rng.random(batch_size)
        out = np.empty((batch_size, self.size, self.size, 3), np.float32)
        # One slice copy per crop: ~20x faster on CPU than a single fancy-index gather over
        # variably sized images, whose index arrays alone are B·size²·3 int64s.
        for k, i in enumerate(which):
            image = images[i]
            top = int(tops[k] * (image.shape[0] - self.size + 1))
            left = int(lefts[k] * (image.shape[1] - self.size + 1))
            crop = image[top : top + self.size, left : left + self.size]
            out[k] = crop / 255.0 if crop.dtype == np.uint8 else crop
        # Drawn after the positions, so a sampler without augmentation keeps its old stream.
        if self.flip:
            mirrored = rng.random(batch_size) < 0.5
            out[mirrored] = out[mirrored, :, ::-1]
        if self.color_jitter:
            out = _jitter(out, rng.uniform(-1, 1, (3, batch_size)) * self.color_jitter)
        return out

    def close(self) -> None:
        self._background.shutdown(wait=False, cancel_futures=True)
        self._loaders.shutdown(wait=False, cancel_futures=True)
        self._pools.clear()

    def __enter__(self) -> ContextSampler:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _jitter(crops: np.ndarray, amounts: np.ndarray) -> np.ndarray:
    """Brightness, contrast and saturation of ``[B, h, w, 3]`` crops scaled by ``1 + amounts``
    (``[3, B]``), clipped to [0, 1]."""
    brightness, contrast, saturation = (1.0 + amounts[:, :, None, None, None]).astype(np.float32)
    crops = crops * brightness
    mean = crops.mean(axis=(1, 2, 3), keepdims=True)
    crops = (crops - mean) * contrast + mean
    gray = crops @ np.asarray(LUMA, np.float32)
    crops = gray[..., None] + (crops - gray[..., None]) * saturation
    return np.clip(crops, 0.0, 1.0)


def perturbation_margin(patch_size: int, max_shift: float, zoom: float) -> int:
    """Pixels needed on each side of a p×p patch to resample it shifted by up to ``max_shift``
    and zoomed out by up to ``1 + zoom``."""
    half = (patch_size - 1) / 2
    return math.ceil(half * zoom + max_shift)


def center_crop(contexts: jax.Array, patch_size: int) -> jax.Array:
    """The p×p centre of each context: ``[B, c, c, C] -> [B, p, p, C]`` (c − p even)."""
    margin = (contexts.shape[1] - patch_size) // 2
    return contexts[:, margin : margin + patch_size, margin : margin + patch_size]


def _interpolation_matrix(coords: jax.Array, size: int) -> jax.Array:
    """``[B, p]`` sample coordinates -> ``[B, p, size]`` linear-interpolation weights (the hat
    function ``max(0, 1 − |x − k|)``, exactly one-hot at integer coordinates)."""
    coords = jnp.clip(coords, 0.0, size - 1.0)
    grid = jnp.arange(size, dtype=coords.dtype)
    return jnp.maximum(0.0, 1.0 - jnp.abs(coords[..., None] - grid))


def perturb(
    key: jax.Array,
    contexts: jax.Array,
    patch_size: int,
    *,
    max_shift: float = 2.0,
    zoom: float = 0.1,
    noise_std: float = 0.02,
) -> jax.Array:
    """Positives p⁺: slightly shifted, zoomed and noisy copies of the contexts' centre patches.

    Per patch: a shift uniform in ``[−max_shift, max_shift]`` px per axis (sub-pixel), a zoom
    factor uniform in ``[1 − zoom, 1 + zoom]`` (bilinear resampling; > 1 shows more of the
    surroundings), then Gaussian noise of std ``noise_std``, clipped to [0, 1]. The resampling is
    separable (no rotation), so it is two batched matrix products: vectorised and cheap.

    Args:
      key: typed PRNG key.
      contexts: ``[B, c, c, C]`` with ``c ≥ p + 2 · perturbation_margin(p, max_shift, zoom)``
        and c − p even; the anchor is :func:`center_crop`.
      patch_size: p.
      max_shift: largest shift in pixels.
      zoom: largest relative change of scale.
      noise_std: std of the additive noise (images in [0, 1]).

    Returns:
      ``[B, p, p, C]`` float32.
    """
    batch, size = contexts.shape[0], contexts.shape[1]
    needed = patch_size + 2 * perturbation_margin(patch_size, max_shift, zoom)
    if size < needed or (size - patch_size) % 2:
        raise ValueError(
            f"contexts of side {size} cannot hold p={patch_size} patches shifted by {max_shift} "
            f"and zoomed by {zoom}; need an odd margin-symmetric side >= {needed}"
        )
    shift_key, zoom_key, noise_key = jax.random.split(key, 3)
    shifts = jax.random.uniform(shift_key, (batch, 2), minval=-max_shift, maxval=max_shift)
    scales = jax.random.uniform(zoom_key, (batch, 1), minval=1.0 - zoom, maxval=1.0 + zoom)
    centre = (size - 1) / 2
    offsets = jnp.arange(patch_size, dtype=jnp.float32) - (patch_size - 1) / 2
    rows = _interpolation_matrix(centre + shifts[:, :1] + offsets * scales, size)
    cols = _interpolation_matrix(centre + shifts[:, 1:] + offsets * scales, size)
    patches = jnp.einsum(
        "bpy,byxc,bqx->bpqc",
        rows,
        contexts.astype(jnp.float32),
        cols,
        precision=jax.lax.Precision.HIGHEST,
    )
    noise = noise_std * jax.random.normal(noise_key, patches.shape, jnp.float32)
    return jnp.clip(patches + noise, 0.0, 1.0)


def to_gray(images: jax.Array) -> jax.Array:
    """``[..., 3]`` RGB -> ``[..., 1]`` luma (BT.601, as :func:`ustad.data.images.read_image`)."""
    return (images @ jnp.asarray(LUMA, images.dtype))[..., None]
