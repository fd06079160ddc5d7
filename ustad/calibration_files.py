"""Where calibrations are filed: ``<workdir>/calibration.json`` (:data:`CALIBRATION_FILE`), one
entry per scored combination (the workdirs' names and the scoring options), written atomically;
and the calibration a trainer files at its end (:func:`calibrate_workdir`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ustad.calibration import DEFAULT_MAX_FPR, Calibration, calibrate_detector
from ustad.io import atomic_write

CALIBRATION_FILE = "calibration.json"
FORMAT = "ustad.calibration/1"


def model_names(workdirs) -> tuple[str, ...]:
    """The names a calibration is filed under: the workdirs' folder names, sorted."""
    if isinstance(workdirs, str | os.PathLike):
        workdirs = [workdirs]
    return tuple(sorted(Path(w).resolve().name for w in workdirs))


def _entries(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT or not isinstance(data.get("entries"), list):
            raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
    except (ValueError, AttributeError, OSError) as error:
        raise ValueError(f"{path}: unreadable calibration ({error}); delete it or run "
                         f"`ustad calibrate` again") from None  # fmt: skip
    return data["entries"]


def _matches(entry: dict, models, settings) -> bool:
    return tuple(sorted(entry.get("models", ()))) == tuple(sorted(models)) and (
        entry.get("settings") == dict(settings)
    )


def write_calibration(workdir, calibration: Calibration) -> Path:
    """File ``calibration`` in ``<workdir>/calibration.json`` (replacing the entry for the same
    models and settings, keeping the others), atomically."""
    path = Path(workdir) / CALIBRATION_FILE
    entries = [
        entry
        for entry in _entries(path)
        if not _matches(entry, calibration.models, calibration.settings)
    ]
    entries.append(calibration.record())
    text = json.dumps({"format": FORMAT, "entries": entries}, indent=1) + "\n"
    return atomic_write(path, text.encode())


def find_calibration(workdirs, settings: dict) -> tuple[Calibration | None, str]:
    """The calibration of ``workdirs`` scored with ``settings`` (looked up in the first
    workdir's ``calibration.json``), and, when there is none, a sentence saying why."""
    if isinstance(workdirs, str | os.PathLike):
        workdirs = [workdirs]
    models = model_names(workdirs)
    path = Path(workdirs[0]) / CALIBRATION_FILE
    entries = _entries(path)
    for entry in entries:
        if _matches(entry, models, settings):
            return Calibration.from_record(entry, str(path)), ""
    if not entries:
        return None, f"{path} does not exist (run `ustad calibrate --good <folder>`)"
    # Made with the same options but other tiling: say so (its thresholds do not carry over).
    untiled = {k: v for k, v in settings.items() if k != "tile"}
    for entry in entries:
        held = dict(entry.get("settings") or {})
        same = {k: v for k, v in held.items() if k != "tile"}
        if _matches({**entry, "settings": same}, models, untiled):
            return None, _tiling_mismatch(path, settings, held)
    held = "; ".join(f"{e.get('models')} {e.get('settings')}" for e in entries)
    return None, (
        f"{path} holds no calibration for {list(models)} scored with {settings} (it has: "
        f"{held}); run `ustad calibrate` with these workdirs and options"
    )


def _tiling_mismatch(path: Path, wanted: dict, held: dict) -> str:
    """Why a calibration made with other tiling does not decide: tiled maps (images at their
    own resolution) and resized ones have different score distributions, so its thresholds
    would reject or pass the wrong share of good images."""

    def what(settings):
        tile = settings.get("tile")
        return f"by tiles (overlap {tile['overlap']:g})" if tile else "resized to the model's size"

    flags = f" --tile --tile_overlap={wanted['tile']['overlap']:g}" if "tile" in wanted else ""
    hint = ""
    if held.get("tile"):  # e.g. a workdir trained on tiles (--config.train_tiles)
        hint = f", or score with --tile --tile_overlap={held['tile']['overlap']:g}"
    return (
        f"{path} was calibrated on images scored {what(held)}, these are scored {what(wanted)}: "
        f"its thresholds do not hold for them; run `ustad calibrate --good <folder>{flags}`"
        f"{hint}"
    )


def calibrate_workdir(workdir, detector, images, *, max_fpr=DEFAULT_MAX_FPR, source=None):
    """What a trainer calls at its end: calibrate ``detector`` (the workdir's own models) on its
    held-out good ``images`` and file the result in ``<workdir>/calibration.json``.

    Too few held-out images for ``max_fpr`` calibrate at the smallest rate they allow, with a
    warning (``ustad calibrate --good`` recalibrates on more); fewer than
    :data:`MIN_GOOD_IMAGES` raise :class:`TooFewGoodImages`.

    Args:
      workdir: the trained workdir.
      detector: its detector (e.g. ``families.load_detector(workdir)``).
      images: ``[N, H, W, C]`` float32 in [0, 1] held-out good images, or batches of them.
      max_fpr: the target false-reject rate.
      source: what the images are (default "held-out validation images").

    Returns:
      The :class:`Calibration` written.
    """
    calibration = calibrate_detector(
        detector,
        images,
        max_fpr=max_fpr,
        coarsen=True,
        models=model_names([workdir]),
        source=source or "held-out validation images",
    )
    write_calibration(workdir, calibration)
    return calibration
