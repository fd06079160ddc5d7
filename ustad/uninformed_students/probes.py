"""Probes that measure a teacher for what it is for: finding anomalies.

A teacher T̂ is only useful through the maps its students draw, so it is measured on anomaly
detection data (an MVTec-AD-layout category in memory) and, for context, on how well it distils
P on held-out photographs:

* :func:`descriptor_probe` (cheap, diagnostic): dense descriptors of the anomaly-free training
  images form a subsampled memory bank; a test pixel's score is the Euclidean distance of its
  descriptor to the nearest one in the bank (exact, a chunked matmul:
  :mod:`ustad.uninformed_students.nearest_neighbour`). Discriminative descriptors score high
  here, but so may a random network's: students imitate a random teacher easily everywhere,
  defects included, so this probe alone cannot choose a teacher.
* :func:`grid_descriptor_probe` (the filter, seconds per teacher): the descriptor probe on a
  stride-8 grid of pixels (all of the training images' grid descriptors as the bank, each
  test grid cell's nearest-neighbour distance, the map upsampled bilinearly): 64× fewer
  queries and no bank subsampling, for ranking many teachers or snapshots of one run.
* :func:`student_probe` (decisive): a short, fixed student run on the teacher
  (:func:`ustad.uninformed_students.train.train_students`), scored as the method scores
  (:class:`ustad.uninformed_students.score.Detector`).
* :func:`ustad.uninformed_students.teacher.distillation.distill_probe`: on photo patches, the
  share of P's feature variance that T̂ explains, and the decorrelation of T̂'s descriptors.

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

from ustad.detector import smooth_maps
from ustad.evaluation.metrics import au_pro, image_auroc, pixel_auroc
from ustad.uninformed_students.nearest_neighbour import memory_bank, nearest_neighbour_maps
from ustad.uninformed_students.nets import ARCHITECTURES, Conv, PatchNet, patch_net

__all__ = [
    "RANDOM_PREFIX",
    "ProbeTeacher",
    "descriptor_probe",
    "detection_figures",
    "grid_descriptor_probe",
    "grid_descriptors",
    "load_probe_teacher",
    "parse_random_spec",
    "random_teacher",
    "student_probe",
]


PyTree = Any


RANDOM_PREFIX = "random:"


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
      target: the teacher's ``target`` metadata (stages, standardisation statistics: see
        :mod:`ustad.uninformed_students.teacher.targets`); None = P's pooled head.
    """

    module: PatchNet
    variables: PyTree
    description: dict
    decoder: dict | None = None
    target: dict | None = None


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
        # What T̂ was distilled from (None: P's pooled head, the paper's target); the
        # standardisation statistics stay in the teacher file.
        "target": _target_summary(meta.get("target")),
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
                "learning_rate",
                "init_decoder",
                "backbone_input_scale",
            )
        }
        | {"corpus": meta.get("source"), "backbone_window": meta.get("backbone_window")},
    }


def _target_summary(target: dict | None) -> dict | None:
    if not target:
        return None
    keys = ("name", "stages", "standardize", "dim", "dead_dims", "near_constant_dims")
    return {key: target.get(key) for key in keys} | {
        "total_variance": round(float(target.get("total_variance", 0.0)), 4)
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
    workdir, ``.teacher.npz`` file or installed name
    (:func:`ustad.uninformed_students.teacher.catalog.load_teacher`).

    Args:
      spec: e.g. ``"random:33:0.125:32"``, ``"runs/teacher_p33"``, ``"p33"``.
      seed: initialisation seed of a random teacher.
    """
    spec = str(spec)
    if spec.startswith(RANDOM_PREFIX):
        return random_teacher(*parse_random_spec(spec), seed=seed)
    from ustad.uninformed_students.teacher.catalog import load_decoder, load_teacher

    module, variables, meta = load_teacher(spec, allow_unfinished=True)
    channels = int(meta.get("channels", 3))
    description = _describe(module, spec, channels, meta)
    description["total_steps"] = meta.get("total_steps")
    decoder = load_decoder(spec)
    decoder = None if decoder is None else jax.tree.map(np.asarray, dict(decoder))
    return ProbeTeacher(module, variables, description, decoder, meta.get("target"))


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


@functools.partial(jax.jit, static_argnames=("module", "stride"))
def _grid_descriptors(module: PatchNet, stride: int, variables: PyTree, images: jax.Array):
    from ustad.uninformed_students.dense import dense_apply

    offset = stride // 2
    return dense_apply(module, variables, images)[:, offset::stride, offset::stride]


def grid_descriptors(
    teacher: ProbeTeacher, images: np.ndarray, *, stride: int = 8, batch_size: int = 4
) -> np.ndarray:
    """Dense descriptors of the pixels ``(s/2 + i·s, s/2 + j·s)`` of each image.

    Args:
      teacher: the teacher.
      images: ``[N, H, W, C]``, H and W multiples of ``stride`` and of the teacher's stride.
      stride: s, the grid's step in pixels.
      batch_size: images per jitted call (the last batch padded: nothing recompiles).

    Returns:
      ``[N, H / s, W / s, d]`` float32.
    """
    height, width = images.shape[1:3]
    if height % stride or width % stride:
        raise ValueError(f"images of {height}×{width} px are not multiples of stride {stride}")
    out = []
    for start in range(0, len(images), batch_size):
        chunk = np.asarray(images[start : start + batch_size], np.float32)
        real = len(chunk)
        if real < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - real, axis=0)])
        grid = _grid_descriptors(teacher.module, stride, teacher.variables, jnp.asarray(chunk))
        out.append(np.asarray(grid)[:real])
    return np.concatenate(out)


def grid_descriptor_probe(
    teacher: ProbeTeacher,
    train_images: np.ndarray,
    test_images: np.ndarray,
    test_masks: np.ndarray,
    test_labels: np.ndarray,
    *,
    stride: int = 8,
    sigma: float = 4.0,
    batch_size: int = 4,
) -> dict:
    """The descriptor probe on a stride-``s`` grid: cheap enough to rank many teachers.

    Every grid descriptor of the anomaly-free training images is in the bank (no subsample, so
    no bank seed); each test grid cell scores its exact nearest-neighbour distance
    (:func:`ustad.knn.nearest_neighbour_distances`), and the ``[H / s, W / s]`` map is resized
    bilinearly to ``[H, W]`` before the figures (:func:`detection_figures`, raw and smoothed).

    Args:
      teacher: the teacher.
      train_images: ``[N, H, W, C]`` anomaly-free images.
      test_images: ``[M, H, W, C]``.
      test_masks: ``[M, H, W]`` bool.
      test_labels: ``[M]``.
      stride: s.
      sigma: Gaussian smoothing of the full-size maps (pixels; 0 = none).
      batch_size: images per call.

    Returns:
      ``{"figures": {"raw": …, "smoothed_sigma<σ>": …}, "settings": …, "seconds": …}``.
    """
    from ustad.knn import nearest_neighbour_distances

    start = time.perf_counter()
    bank = grid_descriptors(teacher, train_images, stride=stride, batch_size=batch_size)
    bank = bank.reshape(-1, bank.shape[-1])
    bank_s = time.perf_counter() - start
    queries = grid_descriptors(teacher, test_images, stride=stride, batch_size=batch_size)
    count, rows, cols, dim = queries.shape
    distances = nearest_neighbour_distances(queries.reshape(-1, dim), bank, chunk=512)
    grid = jnp.asarray(distances.reshape(count, rows, cols), jnp.float32)
    height, width = test_images.shape[1:3]
    maps = np.asarray(jax.image.resize(grid, (count, height, width), method="linear"))
    maps_s = time.perf_counter() - start - bank_s
    return {
        "figures": _figures(maps, test_masks, test_labels, sigma),
        "settings": {"stride": stride, "bank_size": len(bank), "sigma": sigma, "distance": "l2"},
        "seconds": {
            "bank": round(bank_s, 2),
            "maps": round(maps_s, 2),
            "total": round(time.perf_counter() - start, 2),
        },
    }


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
    from ustad.uninformed_students.checkpoints import load_scale
    from ustad.uninformed_students.schedule import scale_schedule
    from ustad.uninformed_students.score import Detector
    from ustad.uninformed_students.train import train_students

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
    steps, _ = scale_schedule(
        config,
        teacher.module.patch_size,
        num_batches(len(train_idx), config.batch_size),
    )
    return {
        "figures": _figures(maps, test_masks, test_labels, sigma),
        "settings": {
            "num_students": config.num_students,
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "steps": steps,
            "image_size": config.image_size,
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
