"""The STFPM trainer's side of a checkpoint: where the teacher comes from, the resume check and
the trained model.

A checkpoint holds the stacked students (parameters, BatchNorm statistics, SGD momentum), the
best epoch's students, a copy of the teacher, and JSON metadata (``"family": "stfpm"``, the
network, image size, score settings, the score normalisation once training is done; the reader
is :func:`ustad.stfpm.checkpoints.model_from_checkpoint`). A resumed run must match the metadata it
finds.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ustad import sharding as shd
from ustad.checkpointing import restore_workdir
from ustad.stfpm import maps as stfpm
from ustad.stfpm.nets import pyramid_from_spec, teacher_variables
from ustad.training_checks import changed_settings

PyTree = Any


@dataclasses.dataclass(frozen=True)
class STFPMModel:
    """A trained STFPM teacher and M students, ready to score.

    Attributes:
        network: the pyramid network (teacher and students share it; parameters differ).
        params: ``{"teacher": vars, "students": {"params", "batch_stats"} stacked [M, ...]}``.
        image_size: ``(H, W)`` the students were trained at.
        score: ``"error"`` or ``"error_variance"`` (:func:`ustad.stfpm.maps.anomaly_map`).
        combination: ``"product"``, ``"sum"`` or ``"mean"`` over the levels.
        normalization: ``[L, 4]`` float32 (e_μ, e_σ, v_μ, v_σ) per level over the validation
            pixels, or None (then only ``score="error"`` is possible).
        channels: C of the images the networks take (3).
    """

    network: nn.Module
    params: PyTree
    image_size: tuple[int, int]
    score: str = "error"
    combination: str = "product"
    normalization: np.ndarray | None = None
    channels: int = 3
    family: ClassVar[str] = stfpm.FAMILY

    @property
    def num_students(self) -> int:
        return int(jax.tree.leaves(self.params["students"])[0].shape[0])

    @property
    def name(self) -> str:
        return "stfpm" if self.num_students == 1 else f"stfpm_m{self.num_students}"

    def describe(self) -> str:
        """One line for people: what was trained."""
        backbone = type(self.network).__name__.removesuffix("Pyramid")
        levels = "/".join(self.network.level_names)
        return (
            f"STFPM: {self.num_students} student(s) of {backbone} {levels} at "
            f"{self.image_size[0]}×{self.image_size[1]}, score {self.score} ({self.combination})"
        )


def model_from_checkpoint(workdir, step: int, state: PyTree, meta: dict) -> STFPMModel:
    """An :class:`STFPMModel` from a restored checkpoint (what ``load_scale`` dispatches to).

    Raises:
        ValueError: another format, or an unfinished run.
        FloatingPointError: non-finite statistics (a diverged run).
    """
    if meta.get("format") != stfpm.FORMAT:
        raise ValueError(f"{workdir} holds a {meta.get('format')!r} model, not {stfpm.FORMAT}")
    if "score_normalization" not in meta:
        raise ValueError(
            f"the STFPM students in {workdir} are not finished (step {step} of "
            f"{meta.get('total_steps')}); resume training first"
        )
    normalization = np.asarray(meta["score_normalization"], np.float32)
    if not np.isfinite(normalization).all():
        raise FloatingPointError(
            f"the STFPM students in {workdir}: the score statistics are not finite (training "
            f"diverged); retrain in a new workdir with a lower --config.learning_rate"
        )
    students = state["students"]
    return STFPMModel(
        network=pyramid_from_spec(meta["network"]),
        params=jax.tree.map(
            np.asarray,
            {
                "teacher": state["teacher"],
                "students": {"params": students["params"], "batch_stats": students["batch_stats"]},
            },
        ),
        image_size=tuple(int(s) for s in meta["image_size"]),
        score=meta.get("score", "error"),
        combination=meta.get("combination", "product"),
        normalization=normalization,
        channels=int(meta.get("channels", 3)),
    )


# What scoring reads of a checkpoint (not the optimizer state nor the best epoch's copy).
SCORING_PARTS = ("teacher", "students/params", "students/batch_stats")


def load_model(workdir: str | os.PathLike) -> STFPMModel:
    """Load the newest finished checkpoint of an STFPM workdir."""
    step, state, meta = restore_workdir(workdir, (stfpm.FORMAT,), parts=SCORING_PARTS)
    return model_from_checkpoint(workdir, step, state, meta)


PyTree = Any


# Config fields that change what a run computes; a resumed (or finished) run must share them.
RESUME_SETTINGS = (
    "backbone",
    "levels",
    "tiny",
    "teacher_weights",
    "num_students",
    "epochs",
    "train_steps",
    "min_train_steps",
    "val_min_images",
    "batch_size",
    "learning_rate",
    "momentum",
    "weight_decay",
    "level_weights",
    "val_fraction",
    "select",
    "seed",
)


def teacher_from_config(config, network, key) -> tuple[PyTree, str]:
    """The teacher's variables and a description of where they came from."""
    if config.teacher_weights == "random":
        # Jitted: one compilation instead of one per initialiser and layer.
        return jax.jit(network.init)(key, jnp.zeros((1, 32, 32, 3), jnp.float32)), "random"
    if config.teacher_weights != "imagenet":
        raise ValueError(
            f"--config.teacher_weights={config.teacher_weights!r}: 'imagenet' (pretrained) or "
            f"'random' (tests and smoke runs only)"
        )
    if config.get("tiny", False):
        raise ValueError(
            "--config.tiny networks have no pretrained weights: teacher_weights=random"
        )
    from ustad.models.pretrained import load_pretrained

    path = config.get("backbone_weights", "") or None
    backbone = load_pretrained(config.backbone, weights_path=path)
    source = f"{config.backbone} ImageNet ({path or 'default weights'})"
    return teacher_variables(network, backbone.variables), source


def check_same_settings(meta: dict, config, workdir) -> None:
    """What can be checked from the config alone: the checkpoint is STFPM's and was trained
    with the same :data:`RESUME_SETTINGS` (the config validation runs it before any set-up)."""
    if meta.get("family") != stfpm.FAMILY:
        raise ValueError(
            f"{workdir} holds a {meta.get('family', 'students')!r} run, not STFPM; use a new "
            f"--workdir"
        )
    changed = changed_settings(meta, config, RESUME_SETTINGS)
    if changed:
        raise ValueError(
            f"{workdir} holds a run trained with {', '.join(changed)}; use a new --workdir, or "
            f"the old settings to resume it"
        )


def check_compatible(meta: dict, config, image_size, workdir, fingerprint) -> None:
    """A resumed run must continue the same problem; say what differs otherwise."""
    check_same_settings(meta, config, workdir)
    if meta.get("image_size") != list(image_size):
        raise ValueError(
            f"{workdir} holds a run at image_size={meta.get('image_size')}, this one is "
            f"{list(image_size)} (--config.image_size); use a new --workdir"
        )
    if meta.get("data_fingerprint", fingerprint) != fingerprint:
        raise ValueError(
            f"{workdir} holds a run trained on other images (data_dir, category or image_size "
            f"changed); use a new --workdir"
        )


def model_from_state(network, state, image_size, config, normalization) -> STFPMModel:
    students = state["students"]
    return STFPMModel(
        network=network,
        params=shd.to_host(
            {
                "teacher": state["teacher"],
                "students": {"params": students["params"], "batch_stats": students["batch_stats"]},
            }
        ),
        image_size=tuple(image_size),
        score=config.score,
        combination=config.combination,
        normalization=np.asarray(normalization, np.float32),
    )
