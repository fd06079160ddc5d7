"""How long the students of one scale train: epochs, updates and the floor of updates
(``config.epochs``, ``config.scale_epochs``, ``config.train_steps``,
``config.scale_train_steps``, ``config.min_train_steps``)."""

from __future__ import annotations

import logging

import ml_collections

from ustad.training_budget import scheduled_steps

__all__ = ["scale_epochs", "scale_schedule", "scale_updates"]

logger = logging.getLogger(__name__)


def scale_schedule(
    config: ml_collections.ConfigDict, patch_size: int, steps_per_epoch: int
) -> tuple[int, int]:
    """``(total_steps, floor)`` of the scale ``patch_size``: its whole epochs
    (:func:`scale_epochs`) of ``steps_per_epoch`` updates, raised to the floor, the fewest
    updates it gets whatever the category's size (``config.min_train_steps`` or the scale's
    :func:`scale_updates`, whichever is more)."""
    floor = max(int(config.get("min_train_steps", 0) or 0), scale_updates(config, patch_size))
    epochs = scale_epochs(config, patch_size, steps_per_epoch)
    total_steps = scheduled_steps(epochs, steps_per_epoch, floor)
    if total_steps > epochs * steps_per_epoch:
        logger.info(
            "p=%d: %d epochs of %d updates are below the floor of %d updates "
            "(--config.min_train_steps): training %d updates",
            patch_size, epochs, steps_per_epoch, floor, total_steps,
        )  # fmt: skip
    return total_steps, floor


def scale_updates(config: ml_collections.ConfigDict, patch_size: int) -> int:
    """The updates the scale ``patch_size`` trains for at least, or 0 when the config counts
    epochs: ``config.scale_train_steps["p<p>"]``, else ``config.train_steps`` (0 = epochs).

    A count of updates does not depend on the category's size: 15 epochs of a 54-image
    category are 4× fewer updates than of a 200-image one, and too few to learn."""
    by_scale = config.get("scale_train_steps") or {}
    value = by_scale.get(f"p{patch_size}", config.get("train_steps", 0) or 0)
    if int(value) != value or value < 0:
        raise ValueError(
            f"train_steps for p={patch_size} must be an integer ≥ 0 (0 = count epochs), got "
            f"{value!r}"
        )
    return int(value)


def scale_epochs(
    config: ml_collections.ConfigDict, patch_size: int, steps_per_epoch: int = 0
) -> int:
    """The epochs of the scale ``patch_size``.

    With updates configured (:func:`scale_updates`), the fewest whole epochs of
    ``steps_per_epoch`` steps that reach them; else ``config.scale_epochs["p<p>"]`` when the
    config sets it (a multi-scale run may give its cheap scales more epochs), else
    ``config.epochs``.
    """
    updates = scale_updates(config, patch_size)
    if updates:
        if steps_per_epoch < 1:
            raise ValueError("steps_per_epoch is needed to turn train_steps into epochs")
        return -(-updates // steps_per_epoch)
    by_scale = config.get("scale_epochs") or {}
    value = by_scale.get(f"p{patch_size}", config.epochs)
    if int(value) != value or value < 1:
        raise ValueError(f"epochs for p={patch_size} must be a positive integer, got {value!r}")
    return int(value)
