"""Probes that measure a teacher for what it is for: finding anomalies.

A teacher T̂ is only useful through the maps its students draw, so it is measured on anomaly
detection data (an MVTec-AD-layout category in memory) and, for context, on how well it distils
P on held-out photographs:

* :func:`descriptor_probe` (cheap, diagnostic): dense descriptors of the anomaly-free training
  images form a subsampled memory bank; a test pixel's score is the Euclidean distance of its
  descriptor to the nearest one in the bank (exact, a chunked matmul). Discriminative
  descriptors score high here, but so may a random network's: students imitate a random
  teacher easily everywhere, defects included, so this probe alone cannot choose a teacher.
* :func:`student_probe` (decisive): a short, fixed student run on the teacher
  (:func:`ustad.train.students.train_students`), scored as the method scores
  (:class:`ustad.scoring.Detector`).
* :func:`distill_probe`: on photo patches, the share of P's feature variance that T̂ explains
  (R² with the run's own decoder D, and with a least-squares linear read-out fitted on other
  photos, which also applies to a random teacher) and the mean |off-diagonal correlation| of
  T̂'s descriptor dimensions.

Every figure of a map is AU-PRO@0.3, pixel AUROC and image AUROC (image score: the map's
maximum), see :func:`detection_figures`. A randomly initialised teacher of the same
architecture (:func:`random_teacher`, spec ``random:<p>:<widths>:<d>``) is the control.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ustad.dense import dense_apply
from ustad.metrics import au_pro, image_auroc, pixel_auroc
from ustad.models.patch_net import ARCHITECTURES, Conv, PatchNet, patch_net
from ustad.score_maps import smooth_maps

__all__ = [
    "RANDOM_PREFIX",
    "ProbeTeacher",
    "backbone_targets",
    "descriptor_probe",
    "detection_figures",
    "distill_probe",
    "distillation_figures",
    "load_probe_teacher",
    "memory_bank",
    "nearest_neighbour_distances",
    "nearest_neighbour_maps",
    "parse_random_spec",
    "photo_patches",
    "random_teacher",
    "smooth_maps",
    "student_probe",
]

PyTree = Any
RANDOM_PREFIX = "random:"


# ---------------------------------------------------------------------------------------------
# Teachers.


@dataclasses.dataclass(frozen=True)
class ProbeTeacher:
    """A teacher to probe.

    Attributes:
      module: the patch network (``module.apply(variables, [N, p, p, C]) -> [N, d]``).
      variables: its variables.
      description: JSON-ready ``source, p, receptive_field, d, widths, width_fraction,
        channels, steps, backbone, backbone_input_size``.
      decoder: the run's distillation decoder ``{"kernel": [d, F], "bias": [F]}``, or None
        (random teachers; files without one).
    """

    module: PatchNet
    variables: PyTree
    description: dict
    decoder: dict | None = None


def _widths(module: PatchNet) -> tuple[list[int], float]:
    """Hidden conv widths and their ratio to the paper's (first conv)."""
    hidden = [layer.features for layer in module.layers if isinstance(layer, Conv)][:-1]
    paper = ARCHITECTURES.get(module.patch_size)
    fraction = hidden[0] / paper[0].features if paper and hidden else float("nan")
    return hidden, round(fraction, 4)


def _describe(module: PatchNet, source: str, channels: int, meta: dict) -> dict:
    hidden, fraction = _widths(module)
    return {
        "source": source,
        "p": module.patch_size,
        "receptive_field": module.receptive_field,
        "d": module.out_dim,
        "widths": hidden,
        "width_fraction": fraction,
        "channels": channels,
        "steps": meta.get("step"),
        "backbone": meta.get("backbone"),
        "backbone_input_size": int(meta.get("backbone_input_size") or 0) or None,
        # The training choices the probes compare (absent for a random teacher).
        "training": {
            key: meta.get("config", {}).get(key)
            for key in (
                "compactness_mode",
                "lambda_k",
                "lambda_c",
                "lambda_m",
                "batch_size",
                "crop_levels",
                "flip",
                "color_jitter",
            )
        }
        | {"corpus": meta.get("source"), "backbone_window": meta.get("backbone_window")},
    }


def random_teacher(
    patch_size: int,
    widths: float | None,
    out_dim: int,
    *,
    channels: int = 3,
    seed: int = 0,
    key: jax.Array | None = None,
) -> ProbeTeacher:
    """A randomly initialised teacher (Flax's default initialisers), the probes' control.

    Args:
      patch_size: p ∈ {17, 33, 65}.
      widths: hidden widths as a fraction of the paper's (None = the paper's).
      out_dim: d.
      channels: input channels C.
      seed: ``jax.random.key(seed)`` initialises it.
      key: a typed key to use instead (e.g. an ``rbg`` key, much faster to compile on CPU).
    """
    module = patch_net(patch_size, out_dim=out_dim, widths=widths)
    sample = jnp.zeros((1, patch_size, patch_size, channels), jnp.float32)
    # One jitted program: Flax's initialisers op by op cost seconds of dispatch.
    variables = jax.tree.map(
        np.asarray, jax.jit(module.init)(jax.random.key(seed) if key is None else key, sample)
    )
    source = f"{RANDOM_PREFIX}{patch_size}:{widths}:{out_dim}" + (f" seed {seed}" if seed else "")
    return ProbeTeacher(module, variables, _describe(module, source, channels, {"step": 0}))


def parse_random_spec(spec: str) -> tuple[int, float | None, int]:
    """``"random:<p>:<widths>:<d>"`` -> ``(p, widths, d)``; widths ``paper`` -> None."""
    fields = spec[len(RANDOM_PREFIX) :].split(":") if spec.startswith(RANDOM_PREFIX) else []
    if len(fields) != 3:
        raise ValueError(f"a random teacher is random:<p>:<widths>:<d>, got {spec!r}")
    p, widths, dim = fields
    return int(p), None if widths in ("paper", "none", "") else float(widths), int(dim)


def load_probe_teacher(spec: str | os.PathLike, *, seed: int = 0) -> ProbeTeacher:
    """A teacher by spec: ``random:<p>:<widths>:<d>`` (widths a fraction, or ``paper``), or a
    workdir, ``.teacher.npz`` file or installed name (:func:`ustad.train.teacher.load_teacher`).

    Args:
      spec: e.g. ``"random:33:0.125:32"``, ``"runs/teacher_p33"``, ``"p33"``.
      seed: initialisation seed of a random teacher.
    """
    spec = str(spec)
    if spec.startswith(RANDOM_PREFIX):
        return random_teacher(*parse_random_spec(spec), seed=seed)
    from ustad.train.teacher import load_teacher
    from ustad.train.teacher_files import load_decoder

    module, variables, meta = load_teacher(spec, allow_unfinished=True)
    channels = int(meta.get("channels", 3))
    description = _describe(module, spec, channels, meta)
    description["total_steps"] = meta.get("total_steps")
    decoder = load_decoder(spec)
    decoder = None if decoder is None else jax.tree.map(np.asarray, dict(decoder))
    return ProbeTeacher(module, variables, description, decoder)


# ---------------------------------------------------------------------------------------------
# Maps and their figures.


def detection_figures(maps: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> dict:
    """AU-PRO@0.3, pixel AUROC and image AUROC (image score: the map's maximum).

    Args:
      maps: ``[N, H, W]`` anomaly scores.
      masks: ``[N, H, W]`` bool ground truth.
      labels: ``[N]`` 1 = defective.
    """
    maps = np.asarray(maps, np.float32)
    return {
        "au_pro": round(float(au_pro(maps, masks, 0.3)), 4),
        "pixel_auroc": round(float(pixel_auroc(maps, masks)), 4),
        "image_auroc": round(float(image_auroc(maps.reshape(len(maps), -1).max(1), labels)), 4),
    }


def _figures(maps, masks, labels, sigma) -> dict:
    out = {"raw": detection_figures(maps, masks, labels)}
    if sigma:
        out[f"smoothed_sigma{sigma:g}"] = detection_figures(smooth_maps(maps, sigma), masks, labels)
    return out


# ---------------------------------------------------------------------------------------------
# Descriptor probe.


def _batches(images: np.ndarray, batch_size: int):
    """Fixed-size batches (the last padded by repeating), so nothing recompiles."""
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        real = len(chunk)
        if real < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - real, axis=0)])
        yield start, real, jnp.asarray(chunk, jnp.float32)


def memory_bank(
    module: PatchNet,
    variables: PyTree,
    images: np.ndarray,
    size: int,
    *,
    seed: int = 0,
    batch_size: int = 8,
    padding: str = "reflect",
) -> np.ndarray:
    """Dense descriptors of a fixed random subset of the pixels of ``images``.

    Args:
      module, variables: the teacher.
      images: ``[N, H, W, C]`` anomaly-free images.
      size: descriptors kept (all ``N·H·W`` if fewer), drawn without replacement.
      seed: NumPy seed of the subset.
      batch_size: images per dense call.
      padding: dense extraction padding.

    Returns:
      ``[min(size, N·H·W), d]`` float32.
    """
    count, height, width = images.shape[:3]
    pixels = height * width
    chosen = np.random.default_rng(seed).choice(count * pixels, min(size, count * pixels), False)
    chosen.sort()
    parts = []
    for start, real, chunk in _batches(images, batch_size):
        descriptors = dense_apply(module, variables, chunk, padding=padding)
        flat = np.asarray(descriptors[:real]).reshape(real * pixels, -1)
        lo, hi = np.searchsorted(chosen, [start * pixels, (start + real) * pixels])
        parts.append(flat[chosen[lo:hi] - start * pixels])
    return np.concatenate(parts)


def _min_squared_distances(queries: jax.Array, bank: jax.Array, chunk: int) -> jax.Array:
    """``[Q, d]``, ``[B, d]`` -> ``[Q]``: squared distance to the nearest bank row."""
    bank_sq = jnp.sum(bank * bank, axis=-1)
    count = queries.shape[0]
    padded = -(-count // chunk) * chunk
    queries = jnp.pad(queries, ((0, padded - count), (0, 0)))

    def one(block):
        # ||q − b||² = ||q||² − 2 q·b + ||b||²: one matmul per chunk, never a [Q, B, d] array.
        cross = jnp.dot(block, bank.T, precision=jax.lax.Precision.HIGHEST)
        return jnp.sum(block * block, axis=-1) + jnp.min(bank_sq[None] - 2 * cross, axis=-1)

    out = jax.lax.map(one, queries.reshape(-1, chunk, queries.shape[-1]))
    return jnp.maximum(out.reshape(-1)[:count], 0.0)


def nearest_neighbour_distances(
    queries: np.ndarray, bank: np.ndarray, *, chunk: int = 2048
) -> np.ndarray:
    """Exact Euclidean distance from each query to its nearest neighbour in the bank.

    Both sets are centred on the bank's mean first (distances are unchanged, float32
    cancellation in ``||q||² − 2 q·b + ||b||²`` much smaller).

    Args:
      queries: ``[Q, d]``.
      bank: ``[B, d]``.
      chunk: queries per matmul (memory ``chunk·B`` floats).

    Returns:
      ``[Q]`` float32.
    """
    bank = jnp.asarray(bank, jnp.float32)
    centre = jnp.mean(bank, axis=0)
    squared = jax.jit(_min_squared_distances, static_argnames="chunk")(
        jnp.asarray(queries, jnp.float32) - centre, bank - centre, chunk=chunk
    )
    return np.sqrt(np.asarray(squared))


@functools.partial(jax.jit, static_argnames=("module", "padding", "chunk"))
def _nn_map_batch(module, padding, chunk, variables, images, bank, centre):
    descriptors = dense_apply(module, variables, images, padding=padding)
    batch, height, width, dim = descriptors.shape
    flat = descriptors.reshape(-1, dim) - centre
    squared = _min_squared_distances(flat, bank - centre, chunk)
    return jnp.sqrt(squared).reshape(batch, height, width)


def nearest_neighbour_maps(
    module: PatchNet,
    variables: PyTree,
    images: np.ndarray,
    bank: np.ndarray,
    *,
    batch_size: int = 4,
    chunk: int = 2048,
    padding: str = "reflect",
) -> np.ndarray:
    """Each pixel's descriptor distance to its nearest neighbour in ``bank``.

    Args:
      module, variables: the teacher.
      images: ``[N, H, W, C]``.
      bank: ``[B, d]`` (:func:`memory_bank`).
      batch_size: images per jitted call.
      chunk: queries per matmul.
      padding: dense extraction padding.

    Returns:
      ``[N, H, W]`` float32.
    """
    bank = jnp.asarray(bank, jnp.float32)
    centre = jnp.mean(bank, axis=0)
    maps = np.empty(images.shape[:3], np.float32)
    for start, real, chunk_images in _batches(images, batch_size):
        out = _nn_map_batch(module, padding, chunk, variables, chunk_images, bank, centre)
        maps[start : start + real] = np.asarray(out)[:real]
    return maps


def descriptor_probe(
    teacher: ProbeTeacher,
    train_images: np.ndarray,
    test_images: np.ndarray,
    test_masks: np.ndarray,
    test_labels: np.ndarray,
    *,
    bank_size: int = 25_000,
    sigma: float = 4.0,
    seed: int = 0,
    batch_size: int = 4,
) -> dict:
    """Nearest-neighbour descriptor distances as anomaly maps.

    Args:
      teacher: the teacher.
      train_images: ``[N, H, W, C]`` anomaly-free images (the bank's source).
      test_images: ``[M, H, W, C]``.
      test_masks: ``[M, H, W]`` bool.
      test_labels: ``[M]``.
      bank_size: descriptors in the memory bank.
      sigma: Gaussian smoothing of the maps (pixels; 0 = none); raw figures are reported too.
      seed: seed of the bank's subset.
      batch_size: images per call.

    Returns:
      ``{"figures": {"raw": …, "smoothed_sigma<σ>": …}, "settings": …, "seconds": …}``.
    """
    start = time.perf_counter()
    bank = memory_bank(
        teacher.module, teacher.variables, train_images, bank_size, seed=seed, batch_size=batch_size
    )
    bank_s = time.perf_counter() - start
    maps = nearest_neighbour_maps(
        teacher.module, teacher.variables, test_images, bank, batch_size=batch_size
    )
    maps_s = time.perf_counter() - start - bank_s
    figures = _figures(maps, test_masks, test_labels, sigma)
    return {
        "figures": figures,
        "settings": {"bank_size": len(bank), "bank_seed": seed, "sigma": sigma, "distance": "l2"},
        "seconds": {
            "bank": round(bank_s, 2),
            "maps": round(maps_s, 2),
            "total": round(time.perf_counter() - start, 2),
        },
    }


# ---------------------------------------------------------------------------------------------
# Student probe.


def student_probe(
    teacher: ProbeTeacher,
    config,
    train_images: np.ndarray,
    test_images: np.ndarray,
    test_masks: np.ndarray,
    test_labels: np.ndarray,
    *,
    workdir: str | os.PathLike | None = None,
    sigma: float = 4.0,
) -> dict:
    """A short fixed student run on the teacher, scored as the method scores.

    Args:
      teacher: the teacher.
      config: a students config (``configs/students.py``) holding the fixed schedule
        (``num_students``, ``epochs``, ``batch_size``, ``learning_rate``, …); the same for every
        teacher compared.
      train_images: ``[N, H, W, C]`` anomaly-free images (``config.val_fraction`` held out for
        the score normalisation).
      test_images, test_masks, test_labels: the test set, ``[M, H, W, C]``, ``[M, H, W]``,
        ``[M]``.
      workdir: where the students go (resumed if there); None = a temporary folder.
      sigma: also report the figures of maps smoothed by this Gaussian (0 = not).

    Returns:
      ``{"figures": {"raw": …, …}, "settings": …, "seconds": …}``.
    """
    from ustad.data.pipeline import num_batches
    from ustad.data.split import split_validation
    from ustad.scoring import Detector, load_scale
    from ustad.train.students import train_students

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ustad_probe_") as scratch:
        scale_dir = Path(workdir) if workdir is not None else Path(scratch) / "students"
        train_students(
            config,
            scale_dir,
            train_images,
            patch_size=teacher.module.patch_size,
            teacher=(teacher.module, teacher.variables),
        )
        train_s = time.perf_counter() - start
        scale = load_scale(scale_dir)
        maps, _ = Detector([scale]).score(test_images)
    score_s = time.perf_counter() - start - train_s
    train_idx, _ = split_validation(len(train_images), config.val_fraction, config.seed)
    return {
        "figures": _figures(maps, test_masks, test_labels, sigma),
        "settings": {
            "num_students": config.num_students,
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "steps": config.epochs * num_batches(len(train_idx), config.batch_size),
            "train_images": len(train_idx),
            "learning_rate": config.learning_rate,
            "weight_decay": config.weight_decay,
            "val_fraction": config.val_fraction,
            "seed": config.seed,
            "padding": config.padding,
        },
        "seconds": {
            "train": round(train_s, 2),
            "score": round(score_s, 2),
            "total": round(time.perf_counter() - start, 2),
        },
    }


# ---------------------------------------------------------------------------------------------
# Distillation probe.


def photo_patches(photos, size: int, count: int, seed: int) -> np.ndarray:
    """``[count, size, size, 3]`` float32 random crops of ``photos`` (a sequence of images)."""
    from ustad.train.patches import ContextSampler

    batch = 64
    with ContextSampler(photos, size, jax.random.key(seed)) as sampler:
        crops = [sampler.sample(s, batch) for s in range(-(-count // batch))]
    return np.concatenate(crops)[:count]


def backbone_targets(
    backbone, crops: np.ndarray, window: int, channels: int, input_size: int | None
) -> np.ndarray:
    """P's features of the part of each crop that T̂ sees.

    Args:
      backbone: a :class:`ustad.models.pretrained.Backbone`.
      crops: ``[N, p, p, 3]`` RGB in [0, 1].
      window: T̂'s true receptive field R: P sees the top-left ``R×R`` of each crop, exactly
        the pixels that reach T̂'s output (32 of 33, 60 of 65).
      channels: T̂'s input channels (1: P sees the gray image repeated to RGB).
      input_size: P's input side (crops resized), None = native.

    Returns:
      ``[N, F]`` float32.
    """
    from ustad.train.teacher_steps import _backbone_inputs

    features = jax.jit(
        lambda v, x: backbone.features_fn(v, _backbone_inputs(x, channels, input_size))
    )
    window_crops = np.asarray(crops)[:, :window, :window]
    return np.concatenate(
        [
            np.asarray(features(backbone.variables, jnp.asarray(window_crops[i : i + 64])))
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
    teacher: ProbeTeacher,
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
      teacher: the teacher.
      backbone: P (:func:`ustad.models.pretrained.load_pretrained`).
      photos: a sequence of ``[H, W, 3]`` images the teacher never trained on.
      patches: evaluation patches (as many again fit the read-out).
      seed: crop stream (not a trainer's).
      input_size: P's input side when the teacher's metadata names none (None = native).

    Returns:
      ``{"figures": distillation_figures(…), "settings": …, "seconds": …}``.
    """
    from ustad.train.patches import to_gray

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
        targets = backbone_targets(backbone, crops, module.receptive_field, channels, size)
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
        },
        "seconds": {"total": round(time.perf_counter() - start, 2)},
    }
