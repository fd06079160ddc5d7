"""The students trainer's side of a checkpoint: the resume check and the trained scale.

A students checkpoint holds the stacked students and their optimizer states, a copy of the
teacher and the target statistics, with JSON metadata (architecture, image size, channels, the
score normalisation once training is done). A resumed run must match the metadata it finds;
:func:`load_scale` reads a finished run as a :class:`ScaleModel`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ustad import sharding as shd
from ustad.checkpointing import CHECKPOINT_SUBDIR, restore_workdir
from ustad.ensemble import (
    ScoreNormalization,
    check_normalization,
)
from ustad.training_checks import changed_settings
from ustad.uninformed_students.nets import PatchNet, patch_net_from_record

PyTree = Any


TRAIN_HINT = "train students with `ustad train-students`"


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
      teacher_source: where the teacher came from (a name, file or workdir), as recorded.
      normalization_kind: ``"quantile"`` (median and robust spread: new workdirs) or
        ``"moments"`` (mean and σ: the paper's, and every workdir written before).
      pseudo_auroc: the image AUROC of this scale alone on held-out good images against the
        same images with planted defects
        (:func:`ustad.uninformed_students.maps.pseudo_anomaly_auroc`); ``None`` when not
        measured (older workdirs). Below 0.5 the detector leaves the scale out of a
        multi-scale mean.
    """

    network: PatchNet
    params: PyTree
    normalization: ScoreNormalization
    image_size: tuple[int, int]
    channels: int
    padding: str = "reflect"
    teacher_source: str | None = None
    normalization_kind: str = "moments"
    pseudo_auroc: float | None = None

    @property
    def patch_size(self) -> int:
        return self.network.patch_size

    @property
    def num_students(self) -> int:
        return int(jax.tree.leaves(self.params["students"])[0].shape[0])

    def describe(self) -> str:
        """One line for people: what was trained and its score statistics."""
        n = self.normalization
        kind = "median ± robust σ" if self.normalization_kind == "quantile" else "mean ± σ"
        check = (
            "" if self.pseudo_auroc is None else f"; pseudo-defect AUROC {self.pseudo_auroc:.3f}"
        )
        return (
            f"p={self.patch_size}: {self.num_students} students at {self.image_size[0]}×"
            f"{self.image_size[1]}; on held-out good images ({kind}) e = {n.error_mean:.4g} ± "
            f"{n.error_std:.4g}, v = {n.variance_mean:.4g} ± {n.variance_std:.4g}{check}"
        )


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
            f"p17/, p33/, p65/ sub-folders holding one (train with `ustad train-students`)"
        )
    return found


# What scoring reads of a checkpoint (not the students' optimizer state).
SCORING_PARTS = ("teacher", "students/params", "target_stats")


def load_scale(workdir: str | os.PathLike) -> ScaleModel:
    """Load the newest complete checkpoint of one scale's students workdir."""
    step, state, meta = restore_workdir(workdir, (FORMAT,), hint=TRAIN_HINT, parts=SCORING_PARTS)
    if not meta.get("score_normalization"):
        raise ValueError(
            f"the students in {workdir} are not finished (step {step} of "
            f"{meta.get('total_steps')}, no score normalisation yet); resume training first"
        )
    network = patch_net_from_record(meta)
    params = {
        "teacher": state["teacher"],
        "students": state["students"]["params"],
        "mean": state["target_stats"]["mean"],
        "std": state["target_stats"]["std"],
    }
    # A diverged run must not score: with e_σ = inf every map would be silently all zeros.
    normalization = normalization_from_meta(meta, workdir)
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
        teacher_source=meta.get("teacher_source"),
        **score_checks_from_meta(meta),
    )


def normalization_from_meta(meta: dict, workdir="the workdir") -> ScoreNormalization:
    """The four numbers that normalise a finished scale's scores, from its metadata.

    ``"score_normalization"`` holds them under the paper's names (``error_mean``, ``error_std``,
    ``variance_mean``, ``variance_std``) whatever their kind: the mean and σ in workdirs
    written before issue 21 (which have no ``"score_statistics"``), the median and robust
    spread in newer ones. Either loads and scores the same way.
    """
    record = meta["score_normalization"]
    missing = [name for name in ScoreNormalization._fields if name not in record]
    if missing:
        raise ValueError(
            f"{workdir}: the checkpoint metadata's score_normalization lacks {', '.join(missing)}"
        )
    return ScoreNormalization(**{name: record[name] for name in ScoreNormalization._fields})


def score_checks_from_meta(meta: dict) -> dict:
    """``{"normalization_kind", "pseudo_auroc"}`` of a finished scale (:class:`ScaleModel`);
    workdirs written before issue 21 give ``"moments"`` and ``None``."""
    auroc = (meta.get("pseudo_anomaly") or {}).get("image_auroc")
    return {
        "normalization_kind": (meta.get("score_statistics") or {}).get("kind", "moments"),
        "pseudo_auroc": None if auroc is None else float(auroc),
    }


PyTree = Any


# Config fields that change what a run computes; a resumed (or finished) run must share them.
# Logging, checkpoint cadence, devices, caches and batch sizes of statistics do not.
RESUME_SETTINGS = (
    "learning_rate",
    "weight_decay",
    "batch_size",
    "epochs",
    "seed",
    "val_fraction",
    "padding",
    "compute_dtype",
    "crop_size",
    "lr_schedule",
    "warmup_steps",
    "scale_epochs",
    "train_steps",
    "val_min_images",
    "scale_train_steps",
    "min_train_steps",
    "select",
)


def check_same_settings(meta, config, workdir, expected: dict) -> None:
    """What can be checked without the images: the checkpoint is a students one, ``expected``
    ``{name: value}`` match its metadata, and it was trained with the same
    :data:`RESUME_SETTINGS` (the config validation runs it before any set-up)."""
    if meta.get("format", FORMAT) != FORMAT:
        raise ValueError(
            f"{workdir} holds a {meta.get('family', meta.get('format'))!r} run, not Uninformed "
            f"Students; use a new --workdir"
        )
    for name, value in expected.items():
        if name in meta and meta[name] != value:
            flag = "patch_sizes" if name == "patch_size" else name
            raise ValueError(
                f"{workdir} holds a run with {name}={meta[name]}, but this run has {value} "
                f"(--config.{flag}); use a new --workdir, or the old setting to resume it"
            )
    changed = changed_settings(meta, config, RESUME_SETTINGS)
    if changed:
        state = "finished" if meta.get("score_normalization") else "unfinished"
        raise ValueError(
            f"{workdir} holds a {state} run trained with {', '.join(changed)}; resuming it would "
            f"{'return the old model' if state == 'finished' else 'mix two settings'}: use a new "
            f"--workdir, or the old settings"
        )


def check_compatible(meta, module, config, image_size, channels, workdir, fingerprint=None):
    """A resumed run must continue the same problem; say what differs otherwise.

    Checked on the checkpoint's metadata before any array is restored, so a different
    ``num_students`` gets this message rather than Orbax's shape error.
    """
    expected = {
        "patch_size": module.patch_size,
        "num_students": int(config.num_students),
        "image_size": list(image_size),
        "channels": int(channels),
    }
    check_same_settings(meta, config, workdir, expected)
    if fingerprint and meta.get("data_fingerprint", fingerprint) != fingerprint:
        raise ValueError(
            f"{workdir} holds a run trained on other images (data_dir, category, image_size or "
            f"the images themselves changed); use a new --workdir"
        )


def score_params(state) -> PyTree:
    """The training state's parts that scoring needs, as :class:`ScaleModel` holds them."""
    return {
        "teacher": state["teacher"],
        "students": state["students"]["params"],
        "mean": state["target_stats"]["mean"],
        "std": state["target_stats"]["std"],
    }


def scale_model(
    module, state, normalization, image_size, channels, config, meta=None
) -> ScaleModel:
    """The trained scale of a training ``state``; ``meta``: the finished run's metadata (its
    normalisation kind and pseudo-anomaly check)."""
    return ScaleModel(
        network=module,
        params=shd.to_host(score_params(state)),
        normalization=normalization,
        image_size=tuple(image_size),
        channels=int(channels),
        padding=config.padding,
        **score_checks_from_meta(meta or {}),
    )
