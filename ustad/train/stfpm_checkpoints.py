"""The STFPM trainer's side of a checkpoint: where the teacher comes from, the resume check and
the trained model.

A checkpoint holds the stacked students (parameters, BatchNorm statistics, SGD momentum), the
best epoch's students, a copy of the teacher, and JSON metadata (``"family": "stfpm"``, the
network, image size, score settings, the score normalisation once training is done; the reader
is :func:`ustad.stfpm_scoring.model_from_checkpoint`). A resumed run must match the metadata it
finds.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from ustad import sharding as shd
from ustad import stfpm
from ustad.stfpm_nets import teacher_variables
from ustad.stfpm_scoring import STFPMModel
from ustad.train.student_checkpoints import changed_settings

PyTree = Any

# Config fields that change what a run computes; a resumed (or finished) run must share them.
RESUME_SETTINGS = (
    "backbone",
    "levels",
    "tiny",
    "teacher_weights",
    "num_students",
    "epochs",
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
        return network.init(key, jnp.zeros((1, 32, 32, 3), jnp.float32)), "random"
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


def check_compatible(meta: dict, config, image_size, workdir, fingerprint) -> None:
    """A resumed run must continue the same problem; say what differs otherwise."""
    if meta.get("family") != stfpm.FAMILY:
        raise ValueError(
            f"{workdir} holds a {meta.get('family', 'students')!r} run, not STFPM; use a new "
            f"--workdir"
        )
    if meta.get("image_size") != list(image_size):
        raise ValueError(
            f"{workdir} holds a run at image_size={meta.get('image_size')}, this one is "
            f"{list(image_size)} (--config.image_size); use a new --workdir"
        )
    changed = changed_settings(meta, config, RESUME_SETTINGS)
    if changed:
        raise ValueError(
            f"{workdir} holds a run trained with {', '.join(changed)}; use a new --workdir, or "
            f"the old settings to resume it"
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
