"""What the students trainer checks about its inputs before it computes anything.

Each check fails with a message that names the setting to change (``--config.image_size``) or
the file at fault, instead of an error from deep inside compilation or a model that silently
scores nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ustad.ensemble import ABSURD_PER_DIMENSION
from ustad.metric_writer import check_magnitude
from ustad.stats import TargetStats
from ustad.uninformed_students.nets import ARCHITECTURES, PatchNet, total_stride


def size_multiple(patch_sizes: Sequence[int]) -> int:
    """What every training image side must be a multiple of: the least common multiple of the
    pooling strides of the paper's networks for ``patch_sizes`` (1, 4, 8 for p = 17, 33, 65).

    A teacher with another layer table is still checked by :func:`check_image_size`.
    """
    strides = [total_stride(ARCHITECTURES[p]) for p in patch_sizes if p in ARCHITECTURES]
    return math.lcm(*strides) if strides else 1


def check_image_size(image_size: tuple[int, int], module: PatchNet) -> None:
    """Raise ``ValueError`` naming ``--config.image_size`` unless both sides are multiples of
    the network's pooling stride (dense extraction needs it)."""
    stride = module.stride
    if image_size[0] % stride or image_size[1] % stride:
        fit = [-(-side // stride) * stride for side in image_size]
        suggestion = fit[0] if fit[0] == fit[1] else f"'({fit[0]}, {fit[1]})'"
        raise ValueError(
            f"--config.image_size: images of {image_size[0]}×{image_size[1]} are not a multiple "
            f"of {stride}, the pooling stride of p={module.patch_size}; use e.g. "
            f"--config.image_size={suggestion}"
        )


def check_target_stats(stats: TargetStats, teacher_source: str) -> None:
    """Raise ``FloatingPointError`` if the teacher's descriptor statistics are not finite."""
    if not (np.isfinite(stats.mean).all() and np.isfinite(stats.std).all()):
        raise FloatingPointError(
            f"the teacher's descriptors ({teacher_source}) on these images are not finite; "
            f"check the teacher file and the images for NaNs"
        )


def check_loss_magnitude(losses: np.ndarray, step: int, out_dim: int) -> None:
    """Raise ``FloatingPointError`` when a student's loss is finite but absurd (> 1e4 · d): a
    diverging run (lr = 10 reached 1e21) stops at once instead of training on to an inf
    normalisation."""
    check_magnitude(
        "the loss",
        float(np.max(losses)),
        ABSURD_PER_DIMENSION * out_dim,
        step,
        " (the targets have unit variance per dimension, so a loss is O(d))",
    )
