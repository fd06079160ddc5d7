"""The one module that knows both method families: workdir → detector, config → trainer.

A workdir records its family in its checkpoint metadata (``"family": "stfpm"``; Uninformed
Students workdirs, older than the field, have none, and multi-scale runs keep their scales in
``p<p>/`` sub-folders); a config names it in ``config.family`` (absent = Uninformed Students).
Everything that must work for either family (``ustad train-students``, ``score``, ``evaluate``)
comes through here, so the families never import each other.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

UNINFORMED_STUDENTS = "uninformed_students"
STFPM = "stfpm"
FAMILIES = (UNINFORMED_STUDENTS, STFPM)
# How each family's checkpoints name it ("students" is the Uninformed Students' own word).
_METADATA_NAMES = {"students": UNINFORMED_STUDENTS, STFPM: STFPM}


def family_of(workdir: str | os.PathLike) -> str:
    """The family of a trained workdir (``"uninformed_students"`` or ``"stfpm"``).

    Raises:
      FileNotFoundError: no checkpoint in ``workdir`` nor in its ``p*/`` sub-folders.
      ValueError: a family this version does not know.
    """
    from ustad.checkpointing import workdir_metadata

    workdir = Path(workdir)
    candidates = [workdir, *sorted(workdir.glob("p*"))] if workdir.is_dir() else [workdir]
    for directory in candidates:
        meta = workdir_metadata(directory)
        if meta is None:
            continue
        name = meta.get("family", "students")
        if name not in _METADATA_NAMES:
            raise ValueError(f"{directory} holds a model of unknown family {name!r}")
        return _METADATA_NAMES[name]
    raise FileNotFoundError(
        f"no trained model in {workdir}: expected {workdir / 'checkpoints'} or p17/, p33/, p65/ "
        f"sub-folders holding one (train with `ustad train-students`)"
    )


def load_models(workdirs: str | os.PathLike | Sequence[str | os.PathLike]):
    """``(family, models)``: the trained models of one family's workdirs (every scale of an
    Uninformed Students multi-scale run).

    Raises:
      ValueError: the workdirs hold models of both families (they cannot be averaged).
    """
    if isinstance(workdirs, str | os.PathLike):
        workdirs = [workdirs]
    if not workdirs:
        raise ValueError("no workdirs given")
    families = {str(w): family_of(w) for w in workdirs}
    if len(set(families.values())) > 1:
        listing = ", ".join(f"{w} ({f})" for w, f in families.items())
        raise ValueError(
            f"cannot average models of different families: {listing}; score each family's "
            f"workdirs separately"
        )
    family = next(iter(families.values()))
    if family == STFPM:
        from ustad.stfpm.checkpoints import load_model

        return family, [load_model(w) for w in workdirs]
    from ustad.uninformed_students.checkpoints import find_scale_dirs, load_scale

    return family, [load_scale(d) for w in workdirs for d in find_scale_dirs(w)]


def detector_for(family: str, models: Sequence, **kwargs):
    """The family's detector over ``models`` (see :func:`load_models`)."""
    if family == STFPM:
        from ustad.stfpm.score import STFPMDetector

        return STFPMDetector(models, **kwargs)
    from ustad.uninformed_students.score import Detector

    return Detector(models, **kwargs)


def load_detector(workdirs: str | os.PathLike | Sequence[str | os.PathLike], **kwargs):
    """A detector for trained workdirs of either family.

    Args:
      workdirs: one workdir or a list (all of one family); an Uninformed Students multi-scale
        workdir contributes each of its scales.
      **kwargs: the detector's options (``reduction``, ``top_k``, ``smooth_sigma``,
        ``batch_size``, ``mesh``, ``member_strategy``, ``compute_dtype``).

    Returns:
      :class:`ustad.uninformed_students.score.Detector` or
      :class:`ustad.stfpm.score.STFPMDetector`; both have ``score(images) -> (maps, scores)``.
    """
    family, models = load_models(workdirs)
    return detector_for(family, models, **kwargs)


def score_sets(family: str, models: Sequence, images, **kwargs):
    """Each model's maps and scores and their average (what ``ustad evaluate`` reports), for
    either family (``family, models`` from :func:`load_models`): ``({name: [N, H, W]},
    {name: [N]})``."""
    if family == STFPM:
        from ustad.stfpm.score import score_sets as family_score_sets
    else:
        from ustad.uninformed_students.score import score_sets as family_score_sets
    return family_score_sets(models, images, **kwargs)


def config_family(config) -> str:
    """The family a training config is for (``config.family``; absent = Uninformed Students)."""
    family = config.get("family", UNINFORMED_STUDENTS)
    family = _METADATA_NAMES.get(family, family)
    if family not in FAMILIES:
        raise ValueError(f"--config.family={family!r}: choose one of {', '.join(FAMILIES)}")
    return family


def train(config, workdir: str | os.PathLike):
    """Train (or resume) the family's models on ``config``'s category into ``workdir``.

    Returns:
      The trained models: a list of scales (Uninformed Students) or one STFPM model.

    Raises:
      ustad.workdir_lock.WorkdirLockedError: another live process trains into ``workdir``.
    """
    import contextlib

    import jax

    from ustad.workdir_lock import workdir_lock

    family = config_family(config)
    if family == STFPM:
        from ustad.stfpm import train as trainer
    else:
        from ustad.uninformed_students import train as trainer
    # One training per workdir (the lock nests within a process; on several hosts process 0
    # holds it for all).
    lock = workdir_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        trained = trainer.train_and_evaluate(config, workdir)
        if jax.process_index() == 0:
            models = list(trained) if isinstance(trained, list | tuple) else [trained]
            # A run trained on tiles is calibrated as it will score: by tiles.
            tile = bool(config.get("train_tiles", False))
            calibrate_after_training(
                workdir, detector_for(family, models, tile=tile), trainer.held_out_images(config)
            )
    return trained


def calibrate_after_training(workdir, detector, images) -> None:
    """File a calibration in ``workdir`` from its held-out good ``images`` (the default
    false-reject rate, or the smallest the images allow); too few images for any quantile
    leave the workdir uncalibrated with a warning (``ustad calibrate --good`` adds one)."""
    import logging

    from ustad.calibration import DEFAULT_MAX_FPR, TooFewGoodImages
    from ustad.calibration_files import calibrate_workdir

    try:
        calibrate_workdir(workdir, detector, images, max_fpr=DEFAULT_MAX_FPR)
    except TooFewGoodImages as error:
        logging.getLogger(__name__).warning(
            "%s is not calibrated (%s); run `ustad calibrate --workdirs=%s --good=<folder of "
            "good images>`",
            workdir,
            error,
            workdir,
        )
