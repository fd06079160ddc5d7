"""Host-side image conversions shared by training,
:class:`ustad.uninformed_students.score.Detector` and the
exported-model runner (:mod:`ustad.deploy.runtime`).

NumPy and PIL only, so that scoring an exported file imports no Flax, SciPy or dataset readers
(tests/test_deploy.py checks the imports).
"""

from __future__ import annotations

import numpy as np


def as_unit_float(images) -> np.ndarray:
    """Images as float32 in [0, 1]: uint8 divided by 255, uint16 by 65535, floats checked.

    Args:
      images: ``[..., C]`` uint8, uint16 or float in [0, 1].

    Raises:
      ValueError: other integer types, or floats outside [0, 1] (e.g. 0–255 values, or images
        normalised by a mean and std), which would score every image alike.
    """
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255)
    if images.dtype == np.uint16:
        return images.astype(np.float32) / np.float32(65535)
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be float in [0, 1], uint8 or uint16, got {images.dtype}")
    images = images.astype(np.float32)
    finite = images[np.isfinite(images)]  # NaN and inf are reported by the callers
    if finite.size:
        low, high = float(finite.min()), float(finite.max())
        if low < -1e-3 or high > 1 + 1e-3:
            raise ValueError(
                f"images must be float in [0, 1]; these range over [{low:.4g}, {high:.4g}]: "
                f"divide 0–255 values by 255 (or pass uint8), and do not mean/std-normalise"
            )
    return images


# ITU-R BT.601 luma, as PIL's "L" mode: every RGB → gray conversion in ustad uses these.
LUMA = (0.299, 0.587, 0.114)


def luma(images: np.ndarray) -> np.ndarray:
    """``[..., 3]`` RGB → ``[..., 1]`` float32 gray (:data:`LUMA` weights)."""
    return (np.asarray(images, np.float32) @ np.array(LUMA, np.float32))[..., None]


def convert_channels(images: np.ndarray, channels: int, *, expected_by="the students"):
    """``[..., C]`` images as ``channels`` channels: gray repeated to RGB, or RGB to luma."""
    if images.shape[-1] == channels:
        return images
    if images.shape[-1] == 1 and channels == 3:
        return np.repeat(images, 3, axis=-1)
    if images.shape[-1] == 3 and channels == 1:
        return luma(images)
    raise ValueError(f"images have {images.shape[-1]} channels; {expected_by} expect {channels}")


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PIL's antialiased bilinear resize per channel: ``[H, W, C]`` float32 → ``[*size, C]``
    float32 clipped to [0, 1] (the filter widens when downsampling)."""
    from PIL import Image

    height, width = size
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(image[..., c], np.float32)).resize(
                (width, height), Image.Resampling.BILINEAR
            )
        )
        for c in range(image.shape[-1])
    ]
    return np.clip(np.stack(channels, axis=-1), 0.0, 1.0).astype(np.float32)
