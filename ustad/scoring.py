"""Scoring images with trained students (paper §5): trained scales and the detector.

A :class:`ScaleModel` is one receptive field's teacher, M students and score statistics, as
:func:`load_scale` reads them from a students workdir (see :mod:`ustad.train.students`).
:class:`Detector` scores images with one or several scales: the normalised score ``ẽ + ṽ`` of
each scale at its training size, resized back and averaged over the scales, optionally smoothed
by a Gaussian (not in the paper; off by default), and an image score reduced from the map.

The per-pixel maths (e, v, their normalisation, the image-score reductions) lives in
:mod:`ustad.score_maps` and is importable from here too; scoring needs nothing from training.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ustad import sharding as shd
from ustad.host_images import as_unit_float, convert_channels
from ustad.models.patch_net import PatchNet, layers_from_json
from ustad.score_maps import (
    MEMBER_STRATEGIES,
    REDUCTIONS,
    ScoreNormalization,
    check_normalization,
    check_scoring_options,
    combine_scales,
    compute_normalization,
    error_and_variance,
    map_members,
    mixture_mean,
    normalization_from_moments,
    normalized_score,
    predictive_variance,
    reduce_maps,
    regression_error,
    resolve_member_strategy,
    scoring_settings,
    smooth_maps,
    teacher_targets,
)

__all__ = [
    "CHECKPOINT_SUBDIR",
    "FORMAT",
    "MEMBER_STRATEGIES",
    "REDUCTIONS",
    "Detector",
    "ScaleModel",
    "ScoreNormalization",
    "as_unit_float",
    "check_normalization",
    "compute_normalization",
    "convert_channels",
    "error_and_variance",
    "find_scale_dirs",
    "load_scale",
    "map_members",
    "mixture_mean",
    "normalization_from_moments",
    "normalized_score",
    "predictive_variance",
    "reduce_maps",
    "regression_error",
    "resolve_member_strategy",
    "smooth_maps",
    "teacher_targets",
]

PyTree = Any

CHECKPOINT_SUBDIR = "checkpoints"
FORMAT = "ustad.students/1"
logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ScaleModel:
    """One receptive field's teacher, students and statistics, ready to score.

    Attributes:
      network: the patch network (teacher and students share it; parameters differ).
      params: ``{"teacher": vars, "students": vars stacked [M, ...], "mean": [D], "std": [D]}``.
      normalization: e/v statistics over the validation images.
      image_size: ``(H, W)`` the students were trained at.
      channels: C of the training images.
      padding: dense-extraction padding used in training.
    """

    network: PatchNet
    params: PyTree
    normalization: ScoreNormalization
    image_size: tuple[int, int]
    channels: int
    padding: str = "reflect"

    @property
    def patch_size(self) -> int:
        return self.network.patch_size

    @property
    def num_students(self) -> int:
        return int(jax.tree.leaves(self.params["students"])[0].shape[0])


def find_scale_dirs(workdir: str | os.PathLike) -> list[Path]:
    """The trained scales under ``workdir``: itself if it holds checkpoints, else its ``p*``
    sub-folders that do (the layout of a multi-scale training run)."""
    workdir = Path(workdir)
    if (workdir / CHECKPOINT_SUBDIR).is_dir():
        return [workdir]
    found = sorted(
        (d for d in workdir.glob("p*") if (d / CHECKPOINT_SUBDIR).is_dir()),
        key=lambda d: int(d.name[1:]) if d.name[1:].isdigit() else 0,
    )
    if not found:
        raise FileNotFoundError(
            f"no trained students in {workdir}: expected {workdir / CHECKPOINT_SUBDIR} or "
            f"p17/, p33/, p65/ sub-folders holding one (train with scripts/train_students.py)"
        )
    return found


def load_scale(workdir: str | os.PathLike) -> ScaleModel:
    """Load the newest complete checkpoint of one scale's students workdir."""
    from ustad.checkpointing import Checkpointer

    directory = Path(workdir) / CHECKPOINT_SUBDIR
    with Checkpointer(directory) as checkpointer:
        restored = checkpointer.restore_latest()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    step, state, meta = restored
    if meta.get("family", "students") != "students":
        # Another model family in the same workdir layout (STFPM): its own loader.
        from ustad.stfpm_scoring import model_from_checkpoint

        return model_from_checkpoint(workdir, step, state, meta)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory} holds a {meta.get('format')!r} checkpoint, not {FORMAT}")
    if not meta.get("score_normalization"):
        raise ValueError(
            f"the students in {workdir} are not finished (step {step} of "
            f"{meta.get('total_steps')}, no score normalisation yet); resume training first"
        )
    network = PatchNet(
        layers=layers_from_json(meta["layers"]),
        patch_size=int(meta["patch_size"]),
        out_dim=int(meta["out_dim"]),
    )
    params = {
        "teacher": state["teacher"],
        "students": state["students"]["params"],
        "mean": state["target_stats"]["mean"],
        "std": state["target_stats"]["std"],
    }
    # A diverged run must not score: with e_σ = inf every map would be silently all zeros.
    normalization = ScoreNormalization(**meta["score_normalization"])
    check_normalization(normalization, network.out_dim, f"the students in {workdir}")
    for name in ("mean", "std"):
        if not np.isfinite(params[name]).all():
            raise FloatingPointError(
                f"the students in {workdir}: the target statistic {name!r} is not finite; "
                f"retrain them in a new workdir"
            )
    return ScaleModel(
        network=network,
        params=jax.tree.map(np.asarray, params),
        normalization=normalization,
        image_size=tuple(int(s) for s in meta["image_size"]),
        channels=int(meta["channels"]),
        padding=meta.get("padding", "reflect"),
    )


def _resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if images.shape[1:3] == size:
        return images
    # The training images went through PIL's antialiased bilinear resize: use the same.
    from ustad.data.images import resize_image

    return np.stack([resize_image(image, size) for image in images])


class Detector:
    """Scores images with one or several trained scales (averaged, paper §5).

    Args:
      scales: trained scales (e.g. from :meth:`load`).
      reduction: image score from the map, ``"max"`` (default), ``"mean"`` or ``"topk"`` (the
        mean of the ``top_k`` highest pixels). The paper defines none.
      top_k: pixels averaged by ``"topk"`` (≥ 1).
      smooth_sigma: σ in pixels of a Gaussian applied to each final map (after the scales are
        averaged, at the input images' size) before the image score; 0 (default, the paper) =
        none. An exported model (``ustad export``) scores as ``smooth_sigma=0``.
      compute_dtype: ``jnp.bfloat16`` runs both networks in bfloat16 (parameters and the e/v
        arithmetic stay float32); ``None`` keeps float32.
      batch_size: images per jitted call; the last chunk is padded so nothing recompiles.
      mesh: a :func:`ustad.sharding.make_mesh` mesh to split batches over ``"data"`` (parameters
        replicated); ``None`` runs on the default device.
      member_strategy: how the students are run, see :func:`resolve_member_strategy`.
    """

    def __init__(
        self,
        scales: Sequence[ScaleModel],
        *,
        reduction: str = "max",
        top_k: int = 100,
        smooth_sigma: float = 0.0,
        compute_dtype=None,
        batch_size: int = 8,
        mesh: jax.sharding.Mesh | None = None,
        member_strategy: str = "auto",
    ):
        if not scales:
            raise ValueError("Detector needs at least one trained scale")
        check_scoring_options(reduction, top_k, smooth_sigma)
        self.scales = tuple(scales)
        self.reduction, self.top_k, self.smooth_sigma = reduction, top_k, float(smooth_sigma)
        strategy = resolve_member_strategy(member_strategy)
        self.mesh = mesh
        self.batch_size = batch_size
        if mesh is not None:
            ways = shd.data_size(mesh)
            self.batch_size = -(-batch_size // ways) * ways
        # Scales trained at the same size and channels share one jitted call.
        groups: dict[tuple, list[int]] = {}
        for i, scale in enumerate(self.scales):
            groups.setdefault((scale.image_size, scale.channels), []).append(i)
        self._groups = [(key, tuple(members)) for key, members in groups.items()]
        self._fns = {}
        self._params = {}
        self._warned: set[tuple] = set()  # (input size, training size) pairs warned about
        for key, members in self._groups:
            networks = tuple(self.scales[i].network for i in members)
            if compute_dtype is not None:
                networks = tuple(n.clone(dtype=compute_dtype) for n in networks)
            paddings = tuple(self.scales[i].padding for i in members)
            params = tuple(
                dict(
                    self.scales[i].params, norm=np.asarray(self.scales[i].normalization, np.float32)
                )
                for i in members
            )
            self._fns[key] = _score_fn(networks, paddings, mesh, strategy)
            if mesh is None:
                self._params[key] = jax.device_put(params)
            else:
                self._params[key] = shd.put_replicated(params, mesh)

    @classmethod
    def load(cls, workdirs: str | os.PathLike | Sequence[str | os.PathLike], **kwargs) -> Detector:
        """Load trained students.

        Args:
          workdirs: a students workdir (one scale, or a multi-scale run with ``p*/``
            sub-folders) or a list of them; every scale found is averaged.
          **kwargs: see the class arguments.
        """
        if isinstance(workdirs, str | os.PathLike):
            workdirs = [workdirs]
        dirs = [d for w in workdirs for d in find_scale_dirs(w)]
        scales = [load_scale(d) for d in dirs]
        if any(getattr(scale, "family", "students") != "students" for scale in scales):
            from ustad.stfpm_scoring import STFPMDetector

            return STFPMDetector(scales, **kwargs)  # refuses a mix of families
        return cls(scales, **kwargs)

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Anomaly maps and image scores.

        Args:
          images: ``[N, H, W, C]`` float in [0, 1] (or uint8 / uint16, scaled to [0, 1]; other
            ranges raise, see :func:`as_unit_float`), any size (resized to each scale's training
            size and the maps resized back; a warning when that changes the aspect ratio by more
            than 1.5×) and 1 or 3 channels.

        Returns:
          ``(maps [N, H, W] float32, image_scores [N] float32)``; with ``smooth_sigma`` the maps
          are the smoothed ones and the scores are reduced from them.
        """

        def scorer(size, channels, members):
            def score(images):
                self._warn_if_squashed(images.shape[1:3], size, members)
                inputs = _resize_images(convert_channels(images, channels), size)
                return self._score_group((size, channels), inputs)

            return score

        scorers = [scorer(*key, members) for key, members in self._groups]
        return combine_scales(
            images, scorers, len(self.scales), smooth_sigma=self.smooth_sigma,
            reduction=self.reduction, top_k=self.top_k,
        )  # fmt: skip

    @property
    def settings(self) -> dict:
        """The scoring options, JSON-ready (recorded next to what ``ustad score`` writes)."""
        return scoring_settings(self.reduction, self.top_k, self.smooth_sigma)

    def _warn_if_squashed(self, image_hw, size, members) -> None:
        """Once per input size: a warning when scoring at ``size`` squashes the images."""
        if (image_hw, size) in self._warned:
            return
        self._warned.add((image_hw, size))
        from ustad.data.images import SQUASH_WARNING_RATIO, aspect_change, fit_size

        change = aspect_change(image_hw, size)
        if change > SQUASH_WARNING_RATIO:
            stride = math.lcm(*(self.scales[i].network.stride for i in members))
            keep = fit_size(image_hw, min(size), keep_aspect=True, multiple=stride)
            logger.warning(
                "images of %d×%d (H×W) are scored at the students' training size %d×%d, which "
                "changes their aspect ratio by %.2f× and distorts small defects; to keep it, "
                "train the students with --config.keep_aspect=True (the short side becomes "
                "--config.image_size) or --config.image_size='(%d, %d)'",
                *image_hw,
                *size,
                change,
                *keep,
            )

    def _score_group(self, key, images: np.ndarray) -> np.ndarray:
        fn, params = self._fns[key], self._params[key]
        outputs = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            real = len(chunk)
            if real < self.batch_size:
                pad = np.repeat(chunk[-1:], self.batch_size - real, axis=0)
                chunk = np.concatenate([chunk, pad])
            chunk = jnp.asarray(chunk) if self.mesh is None else shd.shard_batch(chunk, self.mesh)
            outputs.append(shd.to_host(fn(params, chunk))[:real])
        return np.concatenate(outputs)


@functools.lru_cache(maxsize=16)
def _score_fn(networks, paddings, mesh, strategy):
    """The jitted multi-scale score, cached so equal detectors share one compilation."""
    fn = functools.partial(_score_sum, networks, paddings, strategy)
    if mesh is None:
        return jax.jit(fn)
    return jax.jit(
        fn,
        in_shardings=(shd.replicated(mesh), shd.batch_sharding(mesh)),
        out_shardings=shd.batch_sharding(mesh),
    )


def _score_sum(networks, paddings, strategy, params, images):
    """Σ over scales of the normalised score maps, ``[N, H, W]`` float32."""
    total = 0.0
    for network, padding, p in zip(networks, paddings, params, strict=True):
        error, variance = error_and_variance(network, network, p, images, padding, strategy)
        total = total + normalized_score(error, variance, p["norm"])
    return total
