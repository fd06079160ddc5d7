"""Exact-context crops for student training (an option; the paper trains on whole images).

A student step on a whole image spends all its compute on one image's highly correlated
pixels. With ``config.crop_size = c`` a step instead takes ``batch_size`` crops of c × c output
pixels, each from its own randomly drawn training image at a random position, together with
their receptive-field margin: the crop of the image padded once as dense extraction pads it
(:func:`ustad.uninformed_students.dense.pad_images`), ``c + p − 1`` pixels a side. Dense extraction
of that crop with
``padding="none"`` gives exactly the full image's descriptors of its c × c pixels, so the loss of a
crop is exactly the paper's loss restricted to those pixels: the objective is unchanged, only the
sampling of its terms is (tests/test_student_crops.py checks the equality).

An epoch is defined by pixels: ``ceil(N·H·W / (B·c²))`` steps see as many output pixels as one
pass over the N whole images. Crops are drawn from ``numpy.random.default_rng([seed, step])``,
so a resumed run draws exactly the crops the uninterrupted run would have.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from ustad.tiling import crop_offsets
from ustad.uninformed_students.dense import crop_with_context, pad_images
from ustad.uninformed_students.nets import PatchNet


def check_crop_size(crop_size: int, image_size: tuple[int, int], module: PatchNet) -> None:
    """``ValueError`` naming ``crop_size`` unless it is a positive multiple of the network's
    stride no larger than the image."""
    stride = module.stride
    if crop_size <= 0 or crop_size % stride:
        raise ValueError(
            f"crop_size={crop_size} must be a positive multiple of {stride} (the pooling "
            f"stride of p={module.patch_size}); 0 trains on whole images"
        )
    if crop_size > min(image_size):
        raise ValueError(
            f"crop_size={crop_size} is larger than the images ({image_size[0]}×{image_size[1]}); "
            f"use at most {min(image_size) // stride * stride} or 0 (whole images)"
        )


def crop_steps_per_epoch(
    num_images: int, image_size: tuple[int, int], crop_size: int, batch_size: int
) -> int:
    """Steps of ``batch_size`` crops that see as many output pixels as one pass over the
    images."""
    pixels = num_images * image_size[0] * image_size[1]
    return max(1, math.ceil(pixels / (batch_size * crop_size * crop_size)))


def sample_crops(
    seed: int, step: int, num_images: int, image_size: tuple[int, int], crop_size: int, batch: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The crops of one step: ``(image indices, tops, lefts)``, each ``[batch]``.

    Distinct images within a step while ``batch <= num_images``; positions by
    :func:`ustad.tiling.crop_offsets` (every output pixel, borders included, inside a crop at
    least as often as the middle). A function of ``(seed, step)`` only.
    """
    rng = np.random.default_rng([seed, step])
    indices = rng.choice(num_images, size=batch, replace=batch > num_images)
    tops = crop_offsets(rng, image_size[0], crop_size, batch)
    lefts = crop_offsets(rng, image_size[1], crop_size, batch)
    return indices, tops, lefts


class CropBatches:
    """The batches of crops of a run, by step number.

    Args:
      data: ``{"image": [N, H, W, C]}`` and, when the targets are cached, ``"target": [N, H, W,
        D]`` (host arrays).
      module: the teacher (its p and receptive field fix the margin).
      padding: the dense-extraction padding mode of the run (how the full images are padded).
      crop_size: c, output pixels per side.
      batch_size: crops per step.
      seed: the run's seed.
    """

    def __init__(self, data, module: PatchNet, padding: str, crop_size: int, batch_size: int, seed):
        images = np.asarray(data["image"])
        self.image_size = tuple(images.shape[1:3])
        check_crop_size(crop_size, self.image_size, module)
        self.module = module
        self.padded = pad_images(images, module, padding)  # once: crops are views of this
        self.targets = None if data.get("target") is None else np.asarray(data["target"])
        self.crop_size, self.batch_size, self.seed = crop_size, batch_size, seed
        self.num_images = len(images)

    def steps_per_epoch(self) -> int:
        return crop_steps_per_epoch(
            self.num_images, self.image_size, self.crop_size, self.batch_size
        )

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """``{"image": [B, c + p − 1, c + p − 1, C]}`` and, if cached, ``"target": [B, c, c,
        D]``."""
        c = self.crop_size
        indices, tops, lefts = sample_crops(
            self.seed, step, self.num_images, self.image_size, c, self.batch_size
        )
        images = np.stack(
            [
                crop_with_context(self.padded[i : i + 1], t, left, (c, c), self.module)[0]
                for i, t, left in zip(indices, tops, lefts, strict=True)
            ]
        )
        out = {"image": images}
        if self.targets is not None:
            out["target"] = np.stack(
                [
                    self.targets[i, t : t + c, left : left + c]
                    for i, t, left in zip(indices, tops, lefts, strict=True)
                ]
            )
        return out

    def iterate(self, start_step: int, stop_step: int) -> Iterator[dict[str, np.ndarray]]:
        for step in range(start_step, stop_step):
            yield self.batch(step)
