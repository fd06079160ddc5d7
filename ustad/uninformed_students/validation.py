"""The students' validation loss: their training loss on held-out good images.

Each student's loss on an image is the mean over its pixels of ``||μ^{S_i}(r, c) − (y^T(r, c) −
μ) / σ||²``, the quantity the students minimise (:func:`ustad.uninformed_students.steps.
student_loss`), on images they never train on. The trainer averages it over the held-out images
with :func:`ustad.training.validation_losses` after every epoch and keeps each student's
variables of lowest validation loss (``config.select = "best_val"``, as STFPM).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from ustad.ensemble import map_members
from ustad.uninformed_students.dense import dense_apply
from ustad.uninformed_students.maps import teacher_targets
from ustad.uninformed_students.nets import PatchNet

PyTree = Any


@functools.lru_cache(maxsize=16)
def validation_loss_fn(teacher: PatchNet, student: PatchNet, padding: str, strategy: str):
    """Jitted ``(teacher variables, target stats, students' params, images) -> [M, B]``.

    Args (of the returned function):
      teacher variables: the frozen teacher's.
      target stats: ``{"mean": [D], "std": [D]}`` of the teacher's descriptors.
      students' params: stacked ``[M, ...]``.
      images: ``[B, H, W, C]``.

    Returns:
      ``[M, B]`` float32: each student's loss on each image (mean over pixels of the squared L2
      error to the normalised teacher descriptors), in the students' compute dtype.

    Cached per networks, padding and ``strategy`` (``"vmap"`` or ``"sequential"``, see
    :func:`ustad.ensemble.map_members`).
    """

    def fn(teacher_variables, stats, params, images):
        targets = teacher_targets(
            teacher, teacher_variables, stats["mean"], stats["std"], images, padding=padding
        )

        def one(member_params, x, t):
            predictions = dense_apply(student, member_params, x, padding=padding)
            error = jnp.sum(jnp.square(predictions.astype(jnp.float32) - t), axis=-1)
            return jnp.mean(error, axis=(1, 2))

        return map_members(one, params, images, targets, strategy=strategy)

    return jax.jit(fn)
