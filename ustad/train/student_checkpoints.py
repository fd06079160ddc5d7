"""The students trainer's side of a checkpoint: the resume check and the trained scale.

A students checkpoint holds the stacked students and their optimizer states, a copy of the
teacher and the target statistics, with JSON metadata (architecture, image size, channels, the
score normalisation once training is done; format and reader in :mod:`ustad.scoring`). A resumed
run must match the metadata it finds; a finished run becomes a :class:`ustad.scoring.ScaleModel`.
"""

from __future__ import annotations

from typing import Any

from ustad import sharding as shd
from ustad.scoring import ScaleModel

PyTree = Any


def _check_compatible(meta, module, config, image_size, channels, workdir) -> None:
    """A resumed run must continue the same problem; say what differs otherwise."""
    expected = {
        "patch_size": module.patch_size,
        "num_students": int(config.num_students),
        "image_size": list(image_size),
        "channels": int(channels),
    }
    for name, value in expected.items():
        if name in meta and meta[name] != value:
            raise ValueError(
                f"{workdir} holds a run with {name}={meta[name]}, but this run has {value}; "
                f"use a new workdir"
            )


def _score_params(state) -> PyTree:
    """The training state's parts that scoring needs, as :class:`ScaleModel` holds them."""
    return {
        "teacher": state["teacher"],
        "students": state["students"]["params"],
        "mean": state["target_stats"]["mean"],
        "std": state["target_stats"]["std"],
    }


def _scale_model(module, state, normalization, image_size, channels, config) -> ScaleModel:
    return ScaleModel(
        network=module,
        params=shd.to_host(_score_params(state)),
        normalization=normalization,
        image_size=tuple(image_size),
        channels=int(channels),
        padding=config.padding,
    )
