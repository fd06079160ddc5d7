"""Every way to combine one STFPM model's per-level maps, to compare them on one trained model.

One scoring pass gives, per pyramid level, the error e and (for M > 1 students) the variance v,
upsampled to the training size (:func:`level_maps`); :func:`combination_maps` derives from them
the paper's product over levels, the sum (the mean ranks identically), for M > 1 the normalised
error + variance averaged over the levels, and each student alone (its own product). The same
numbers as :class:`ustad.stfpm.score.STFPMDetector` with the matching ``score`` and
``combination``, at the training size, combined on the host.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ustad.stfpm.checkpoints import STFPMModel
from ustad.stfpm.maps import level_scores, upsample

__all__ = ["combination_maps", "level_maps"]


def level_maps(
    model: STFPMModel, images: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per level, e and v upsampled to the training size.

    Args:
      model: the trained model.
      images: ``[N, H, W, C]`` at the model's image size.
      batch_size: images per jitted call.

    Returns:
      ``(errors, variances)``, each ``[L, N, H, W]`` float32 (variances 0 for M = 1).
    """

    @jax.jit
    def fn(params, x):
        errors, variances = level_scores(model.network, params, x, "vmap")
        size = model.image_size
        return (
            jnp.stack([upsample(e, size) for e in errors]),
            jnp.stack([upsample(v, size) for v in variances]),
        )

    errors, variances = [], []
    for start in range(0, len(images), batch_size):
        e, v = fn(model.params, jnp.asarray(images[start : start + batch_size]))
        errors.append(np.asarray(e))
        variances.append(np.asarray(v))
    return np.concatenate(errors, axis=1), np.concatenate(variances, axis=1)


def combination_maps(model: STFPMModel, images: np.ndarray, batch_size: int) -> dict:
    """The anomaly maps of every combination.

    Args:
      model: the trained model (``normalization`` needed for M > 1).
      images: ``[N, H, W, C]``.
      batch_size: images per jitted call.

    Returns:
      ``{"product", "sum"}`` and for M > 1 also ``"error_variance_mean"`` and
      ``"student<i>_product"``: ``[N, H, W]`` maps each.
    """
    errors, variances = level_maps(model, images, batch_size)
    sets = {"product": np.prod(errors, axis=0), "sum": np.sum(errors, axis=0)}
    if model.num_students > 1:
        norm = model.normalization
        z = (errors - norm[:, 0, None, None, None]) / norm[:, 1, None, None, None]
        z += (variances - norm[:, 2, None, None, None]) / norm[:, 3, None, None, None]
        sets["error_variance_mean"] = z.mean(axis=0)
        for i in range(model.num_students):
            single = jax.tree.map(lambda x, i=i: x[i : i + 1], model.params["students"])
            alone = dataclasses.replace(model, params=dict(model.params, students=single))
            sets[f"student{i}_product"] = np.prod(level_maps(alone, images, batch_size)[0], 0)
    return sets
