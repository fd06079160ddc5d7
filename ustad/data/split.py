"""Holding out anomaly-free validation images (used to normalise the anomaly scores)."""

from __future__ import annotations

import numpy as np


def split_validation(
    num_images: int, val_fraction: float, seed: int, min_images: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Splits `range(num_images)` into training and validation indices.

    The paper normalises regression error and predictive uncertainty by their mean/std over
    anomaly-free validation images held out from training; this chooses them.

    Args:
        num_images: number of anomaly-free images.
        val_fraction: fraction to hold out, in (0, 1). The count is rounded and then clamped so
            that both parts get at least one image whenever `num_images >= 2`.
        seed: the split depends only on `(num_images, val_fraction, seed, min_images)`.
        min_images: hold out at least this many (but never more than a quarter of the images):
            a fraction of a small category (10 % of 54 images: 5) gives too few pixels for
            stable score statistics. 0 = the fraction alone.

    Returns:
        `(train_idx, val_idx)`: `[N_train]` and `[N_val]` int64, each sorted ascending,
        disjoint, together `range(num_images)`. With `num_images == 1` the only image trains
        and validation is empty.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if num_images == 1:
        return np.zeros((1,), np.int64), np.zeros((0,), np.int64)
    if min_images < 0:
        raise ValueError(f"min_images must be >= 0, got {min_images}")
    num_val = max(round(num_images * val_fraction), min(min_images, num_images // 4))
    num_val = int(np.clip(num_val, 1, num_images - 1))
    order = np.random.default_rng(seed).permutation(num_images)
    return np.sort(order[num_val:]), np.sort(order[:num_val])
