"""The students' quality along their training: figures of a training state on a test set.

A convergence curve (``benchmarks/convergence.py``) pauses training every few steps and scores
the test set with the students as they are: :func:`state_figures` normalises the scores on the
held-out images with the current students (as the trainer does once at the end), builds the
scale a finished run would become and reports :func:`scale_figures`: AU-PRO@0.3, pixel and image
AUROC (image score: the map's maximum) of the raw maps and of the maps smoothed by a Gaussian.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ustad import sharding as shd
from ustad.data.pipeline import num_batches
from ustad.detector import smooth_maps
from ustad.evaluation.reports import category_metrics
from ustad.uninformed_students.checkpoints import ScaleModel
from ustad.uninformed_students.crops import crop_steps_per_epoch
from ustad.uninformed_students.maps import compute_normalization
from ustad.uninformed_students.nets import PatchNet
from ustad.uninformed_students.score import Detector

__all__ = ["map_figures", "state_figures", "steps_per_epoch", "scale_figures"]


PyTree = Any


def map_figures(maps: np.ndarray, masks: np.ndarray, labels: np.ndarray, sigma: float) -> dict:
    """AU-PRO@0.3, pixel and image AUROC of the maps, raw and smoothed.

    Args:
      maps: ``[N, H, W]`` anomaly maps at the masks' resolution.
      masks: ``[N, H, W]`` bool ground truth.
      labels: ``[N]`` 1 = defective.
      sigma: σ in pixels of the smoothed maps' Gaussian; 0 = raw figures only.

    Returns:
      ``{"raw": {au_pro, pixel_auroc, image_auroc}, "smoothed_sigma<σ>": …}``, rounded to 4
      places.
    """
    out = {"raw": category_metrics(maps, masks, labels)}
    if sigma:
        out[f"smoothed_sigma{sigma:g}"] = category_metrics(smooth_maps(maps, sigma), masks, labels)
    return {k: {m: round(float(v), 4) for m, v in f.items()} for k, f in out.items()}


def scale_figures(
    scale: ScaleModel, images: np.ndarray, masks: np.ndarray, labels: np.ndarray, sigma: float
) -> dict:
    """:func:`map_figures` of one scale's maps of ``images`` (``[N, H, W, C]``)."""
    maps, _ = Detector([scale]).score(images)
    return map_figures(maps, masks, labels, sigma)


def state_figures(
    module: PatchNet,
    score_params: PyTree,
    val_images: np.ndarray,
    test_images: np.ndarray,
    test_masks: np.ndarray,
    test_labels: np.ndarray,
    *,
    padding: str,
    batch_size: int,
    member_strategy: str = "auto",
    sigma: float = 0.0,
) -> dict:
    """:func:`scale_figures` of the students in the middle of their training.

    Args:
      module: the patch network (teacher and students share it).
      score_params: ``{"teacher", "students" (stacked [M, ...]), "mean", "std"}`` of the training
        state, as :class:`ustad.uninformed_students.checkpoints.ScaleModel` holds them.
      val_images: ``[V, H, W, C]`` held-out anomaly-free images (the score normalisation).
      test_images, test_masks, test_labels: ``[N, H, W, C]``, ``[N, H, W]`` bool, ``[N]``.
      padding: dense-extraction padding of the training.
      batch_size: images per normalisation call.
      member_strategy: how the members run (:func:`ustad.ensemble.resolve_member_strategy`).
      sigma: as :func:`map_figures`.
    """
    normalization = compute_normalization(
        module,
        module,
        score_params,
        val_images,
        batch_size=batch_size,
        padding=padding,
        member_strategy=member_strategy,
    )
    scale = ScaleModel(
        network=module,
        params=shd.to_host(score_params),
        normalization=normalization,
        image_size=tuple(test_images.shape[1:3]),
        channels=int(test_images.shape[-1]),
        padding=padding,
    )
    return scale_figures(scale, test_images, test_masks, test_labels, sigma)


def steps_per_epoch(
    num_train: int, image_size: tuple[int, int], crop_size: int, batch_size: int
) -> int:
    """Steps of one epoch of the students trainer: batches of whole images, or with
    ``crop_size`` the crop steps that see as many output pixels as one pass over the images."""
    if crop_size:
        return crop_steps_per_epoch(num_train, tuple(image_size), crop_size, batch_size)
    return num_batches(num_train, batch_size)
