"""How well a teacher distils P, measured on held-out photographs.

:func:`distill_probe`: on photo patches, the share of P's feature variance that T̂ explains (R²
with the run's own decoder D, and with a least-squares linear read-out fitted on other photos,
which also applies to a random teacher) and the mean |off-diagonal correlation| of T̂'s
descriptor dimensions (:func:`distillation_figures`). The teacher is a
:class:`ustad.uninformed_students.probes.ProbeTeacher`, as for the anomaly-detection probes.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from ustad.uninformed_students.teacher import targets as targets_lib
from ustad.uninformed_students.teacher.patches import ContextSampler, to_gray
from ustad.uninformed_students.teacher.steps import backbone_inputs

__all__ = ["backbone_targets", "distill_probe", "distillation_figures", "photo_patches"]


def photo_patches(photos, size: int, count: int, seed: int) -> np.ndarray:
    """``[count, size, size, 3]`` float32 random crops of ``photos`` (a sequence of images)."""
    batch = 64
    with ContextSampler(photos, size, jax.random.key(seed)) as sampler:
        crops = [sampler.sample(s, batch) for s in range(-(-count // batch))]
    return np.concatenate(crops)[:count]


def backbone_targets(
    backbone,
    crops: np.ndarray,
    window: int,
    channels: int,
    input_size: int | None,
    target: dict | None = None,
) -> np.ndarray:
    """P's features of the part of each crop that T̂ sees: the teacher's target.

    Args:
      backbone: a :class:`ustad.models.pretrained.Backbone`.
      crops: ``[N, p, p, 3]`` RGB in [0, 1].
      window: T̂'s true receptive field R: P sees the top-left ``R×R`` of each crop, exactly
        the pixels that reach T̂'s output (32 of 33, 60 of 65).
      channels: T̂'s input channels (1: P sees the gray image repeated to RGB).
      input_size: P's input side (crops resized), None = native.
      target: the teacher's ``target`` metadata (stages, standardisation statistics); None:
        P's pooled head, the paper's target.

    Returns:
      ``[N, F]`` float32.
    """
    spec = targets_lib.TargetSpec.from_record(target)
    target_fn = targets_lib.target_fn(backbone, spec)
    variables = targets_lib.target_variables(backbone.variables, spec, target or {})
    features = jax.jit(lambda v, x: target_fn(v, backbone_inputs(x, channels, input_size)))
    window_crops = np.asarray(crops)[:, :window, :window]
    return np.concatenate(
        [
            np.asarray(features(variables, jnp.asarray(window_crops[i : i + 64])))
            for i in range(0, len(window_crops), 64)
        ]
    )


def distillation_figures(
    descriptors: np.ndarray,
    targets: np.ndarray,
    *,
    decoder: dict | None = None,
    fit_descriptors: np.ndarray | None = None,
    fit_targets: np.ndarray | None = None,
    ridge: float = 1e-6,
) -> dict:
    """R² of P's features from T̂'s descriptors, and T̂'s decorrelation.

    Args:
      descriptors: ``[N, d]`` T̂ on the evaluation patches.
      targets: ``[N, F]`` P on the same patches.
      decoder: the run's D, ``{"kernel": [d, F], "bias": [F]}``: ``r2_decoder``.
      fit_descriptors, fit_targets: ``[K, d]``, ``[K, F]`` on other patches: a least-squares
        linear read-out (ridge relative to the descriptors' scale) fitted there gives
        ``r2_linear`` here.
      ridge: relative ridge of the read-out.

    Returns:
      ``r2_decoder`` = 1 − ``unexplained`` = 1 − ``distillation`` / ``target_variance``
      (None without a decoder; ``distillation`` is the loss ``||D(T̂(p)) − P(p)||²``,
      ``target_variance`` the mean squared distance of P's features to their mean),
      ``r2_linear`` (None without a fit set), ``mean_abs_offdiag_corr`` over the live
      dimensions and ``dead_dims`` (dimensions with std < 1e-6).
    """
    descriptors = np.asarray(descriptors, np.float64)
    targets = np.asarray(targets, np.float64)
    variance = float(np.mean(np.sum((targets - targets.mean(0)) ** 2, axis=-1)))

    def r2(predicted):
        return round(1 - float(np.mean(np.sum((predicted - targets) ** 2, -1))) / variance, 4)

    out = {"r2_decoder": None, "r2_linear": None, "distillation": None, "unexplained": None}
    if decoder is not None:
        predicted = descriptors @ decoder["kernel"] + decoder["bias"]
        distillation = float(np.mean(np.sum((predicted - targets) ** 2, -1)))
        out.update(
            r2_decoder=r2(predicted),
            distillation=round(distillation, 3),
            unexplained=round(distillation / variance, 4),
        )
    if fit_descriptors is not None and fit_targets is not None:
        x = np.asarray(fit_descriptors, np.float64)
        y = np.asarray(fit_targets, np.float64)
        x_mean, y_mean = x.mean(0), y.mean(0)
        xc = x - x_mean
        gram = xc.T @ xc
        gram += ridge * np.trace(gram) / len(gram) * np.eye(len(gram))
        weights = np.linalg.solve(gram, xc.T @ (y - y_mean))
        out["r2_linear"] = r2((descriptors - x_mean) @ weights + y_mean)
    std = descriptors.std(0)
    live = std > 1e-6
    corr = np.corrcoef(descriptors[:, live], rowvar=False) if live.sum() > 1 else np.eye(1)
    off = corr[~np.eye(len(corr), dtype=bool)]
    out.update(
        target_variance=round(variance, 3),
        mean_abs_offdiag_corr=round(float(np.mean(np.abs(off))), 4) if off.size else None,
        dead_dims=int((~live).sum()),
    )
    return out


def distill_probe(
    teacher,
    backbone,
    photos,
    *,
    patches: int = 2048,
    seed: int = 12345,
    input_size: int | None = None,
) -> dict:
    """Distillation R² and decorrelation on held-out photos.

    The linear read-out is fitted on one stream of crops and, like the run's decoder, evaluated
    on another stream of crops of the same photos (splitting the photos instead shifts the
    feature mean between the halves, which a handful of photos turns into a large bias).

    Args:
      teacher: a :class:`ustad.uninformed_students.probes.ProbeTeacher`.
      backbone: P (:func:`ustad.models.pretrained.load_pretrained`).
      photos: a sequence of ``[H, W, 3]`` images the teacher never trained on.
      patches: evaluation patches (as many again fit the read-out).
      seed: crop stream (not a trainer's).
      input_size: P's input side when the teacher's metadata names none (None = native).

    Returns:
      ``{"figures": distillation_figures(…), "settings": …, "seconds": …}``.
    """
    start = time.perf_counter()
    module, channels = teacher.module, int(teacher.description["channels"])
    size = teacher.description.get("backbone_input_size") or input_size
    apply = jax.jit(module.apply)
    sets = []
    for stream in (seed + 1, seed):  # fit, evaluate
        crops = photo_patches(photos, module.patch_size, patches, stream)
        inputs = np.asarray(to_gray(jnp.asarray(crops))) if channels == 1 else crops
        descriptors = np.concatenate(
            [
                np.asarray(apply(teacher.variables, jnp.asarray(inputs[i : i + 256])))
                for i in range(0, len(inputs), 256)
            ]
        )
        target = getattr(teacher, "target", None)
        targets = backbone_targets(backbone, crops, module.receptive_field, channels, size, target)
        sets.append((descriptors, targets))
    (fit_x, fit_y), (eval_x, eval_y) = sets
    figures = distillation_figures(
        eval_x, eval_y, decoder=teacher.decoder, fit_descriptors=fit_x, fit_targets=fit_y
    )
    return {
        "figures": figures,
        "settings": {
            "patches": patches,
            "photos": len(photos),
            "seed": seed,
            "p_window": module.receptive_field,
            "backbone_input_size": size,
            "target": targets_lib.TargetSpec.from_record(target).name,
        },
        "seconds": {"total": round(time.perf_counter() - start, 2)},
    }
