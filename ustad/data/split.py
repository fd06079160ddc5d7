"""Holding out anomaly-free validation images (used to normalise the anomaly scores)."""

from __future__ import annotations

import numpy as np


def split_validation(
    num_images: int, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Splits `range(num_images)` into training and validation indices.

    The paper normalises regression error and predictive uncertainty by their mean/std over
    anomaly-free validation images held out from training; this chooses them.

    Args:
        num_images: number of anomaly-free images.
        val_fraction: fraction to hold out, in (0, 1). The count is rounded and then clamped so
            that both parts get at least one image whenever `num_images >= 2`.
        seed: the split depends only on `(num_images, val_fraction, seed)`.

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
    num_val = int(np.clip(round(num_images * val_fraction), 1, num_images - 1))
    order = np.random.default_rng(seed).permutation(num_images)
    return np.sort(order[num_val:]), np.sort(order[:num_val])
