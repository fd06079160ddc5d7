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
)


def _check_compatible(meta, module, config, image_size, channels, workdir, fingerprint=None):
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
    for name, value in expected.items():
        if name in meta and meta[name] != value:
            raise ValueError(
                f"{workdir} holds a run with {name}={meta[name]}, but this run has {value} "
                f"(--config.{name}); use a new --workdir, or the old setting to resume it"
            )
    changed = changed_settings(meta, config, RESUME_SETTINGS)
    if changed:
        state = "finished" if meta.get("score_normalization") else "unfinished"
        raise ValueError(
            f"{workdir} holds a {state} run trained with {', '.join(changed)}; resuming it would "
            f"{'return the old model' if state == 'finished' else 'mix two settings'}: use a new "
            f"--workdir, or the old settings"
        )
    if fingerprint and meta.get("data_fingerprint", fingerprint) != fingerprint:
        raise ValueError(
            f"{workdir} holds a run trained on other images (data_dir, category, image_size or "
            f"the images themselves changed); use a new --workdir"
        )


def changed_settings(meta: dict, config, names) -> list[str]:
    """``"name=saved (now current)"`` for each of ``names`` whose value in the checkpoint's
    saved config (``meta["config"]``) differs from ``config``'s; settings missing on either
    side are not compared."""
    saved = meta.get("config", {})
    return [
        f"{name}={saved[name]!r} (now {config[name]!r})"
        for name in names
        if name in saved and name in config and saved[name] != _json_value(config[name])
    ]


def _json_value(value):
    if hasattr(value, "to_dict"):  # a ConfigDict field (scale_epochs) is saved as a dict
        return value.to_dict()
    return list(value) if isinstance(value, tuple) else value


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
