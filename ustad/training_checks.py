"""Checks on a training run's inputs and settings (refused in one line naming the setting), what a
resumed run compares with its checkpoint, and the checks on its validation history (divergence,
flattening): shared by the three trainers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

from ustad.host_images import as_unit_float

# Settings added after workdirs were written, with the value those workdirs ran with: a run
# resumed from one compares against it (a missing setting is otherwise not compared).
SETTING_DEFAULTS = {"val_min_images": 0, "train_steps": 0, "min_train_steps": 0, "select": "last"}


def changed_settings(meta: dict, config, names) -> list[str]:
    """``"name=saved (now current)"`` for each of ``names`` whose value in the checkpoint's
    saved config (``meta["config"]``) differs from ``config``'s; settings missing on either
    side are not compared, except those in :data:`SETTING_DEFAULTS`, which an older
    checkpoint ran with at their default."""
    saved = dict(meta.get("config", {}))
    for name, default in SETTING_DEFAULTS.items():
        saved.setdefault(name, default)
    return [
        f"{name}={saved[name]!r} (now {config[name]!r})"
        for name in names
        if name in saved and name in config and saved[name] != json_value(config[name])
    ]


def check_images(images) -> np.ndarray:
    """Training images as ``[N, H, W, C]`` float32 in [0, 1], or a ``ValueError``.

    uint8/uint16 are scaled (see :func:`ustad.host_images.as_unit_float`); floats outside
    [0, 1], NaN or inf (named by image index) and other shapes raise.
    """
    images = as_unit_float(images)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
    bad = np.flatnonzero(~np.isfinite(images.reshape(len(images), -1)).all(axis=1))
    if bad.size:
        raise ValueError(f"training images {bad[:10].tolist()} hold NaN or inf values")
    return images


def data_fingerprint(images: np.ndarray) -> str:
    """SHA-256 of the images' shape and float32 bytes: a resumed run checks it sees the same
    training data.

    Args:
      images: ``[N, H, W, C]``.
    """
    images = np.ascontiguousarray(images, np.float32)
    digest = hashlib.sha256(repr(images.shape).encode())
    digest.update(memoryview(images).cast("B"))
    return digest.hexdigest()


def json_value(value):
    """``value`` as a run's JSON metadata stores it (tuples as lists, ConfigDicts as dicts)."""
    if hasattr(value, "to_dict"):  # a ConfigDict field (scale_epochs) is saved as a dict
        return value.to_dict()
    return list(value) if isinstance(value, tuple) else value


# A mean validation loss this far above the first one means the students got worse than after
# their first epoch. STFPM's loss is bounded (normalised features), so a too-high learning rate
# does not overflow, it degrades the students (lr 1000 on its smoke data: 1.72 → 2.21).
DIVERGENCE_RATIO = 1.2


# The best validation loss must improve by less than this over the last quarter of the
# validations for the run to count as flattened.
FLAT_IMPROVEMENT = 0.01


def check_not_diverged(history: list[float], epoch: int, what: str = "the students") -> None:
    """Raise ``FloatingPointError`` when the newest mean validation loss is non-finite or
    :data:`DIVERGENCE_RATIO` × above the first one (a bounded loss does not overflow when the
    learning rate is too high: it degrades)."""
    if not np.isfinite(history[-1]):
        raise FloatingPointError(f"{what}: validation loss {history[-1]} after epoch {epoch}")
    if len(history) > 1 and history[-1] > DIVERGENCE_RATIO * history[0]:
        raise FloatingPointError(
            f"{what} diverged: validation loss {history[-1]:.4g} after epoch "
            f"{epoch}, above {history[0]:.4g} after the first epoch; lower "
            f"--config.learning_rate and use a new workdir"
        )


def flattened(history: list[float]) -> bool | None:
    """Whether the validation loss had flattened by the end: its best over the last quarter of
    the validations improved on the best before it by less than :data:`FLAT_IMPROVEMENT`
    (relative); None with fewer than 4 validations (too few to say)."""
    if len(history) < 4:
        return None
    cut = len(history) - max(1, len(history) // 4)
    before, last = min(history[:cut]), min(history[cut:])
    return bool(last >= before * (1 - FLAT_IMPROVEMENT))


def check_settings(
    config,
    *,
    positive_ints: Sequence[str] = (),
    non_negative_ints: Sequence[str] = (),
    choices: Mapping[str, Sequence] | None = None,
) -> None:
    """Refuse, in one line naming the ``--config.<field>``, integers out of range, a value not
    among its choices, and the optimisation settings every trainer shares out of range
    (``learning_rate`` > 0 and finite, ``weight_decay`` ≥ 0, ``val_fraction`` in [0, 1)).

    Fields absent from ``config`` are not checked (nor are choices of absent fields)."""
    for names, low in ((positive_ints, 1), (non_negative_ints, 0)):
        for name in names:
            value = config.get(name, low)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--config.{name}={value!r}: must be an integer ≥ {low}")
    for name, allowed in (choices or {}).items():
        if name in config and config[name] not in allowed:
            raise ValueError(f"--config.{name}={config[name]!r}: choose one of {tuple(allowed)}")
    if not 0 < float(config.learning_rate) < float("inf"):
        raise ValueError(f"--config.learning_rate={config.learning_rate!r}: must be > 0")
    if not float(config.weight_decay) >= 0:
        raise ValueError(f"--config.weight_decay={config.weight_decay!r}: must be ≥ 0")
    if not 0 <= float(config.val_fraction) < 1:
        raise ValueError(f"--config.val_fraction={config.val_fraction!r}: must be in [0, 1)")
