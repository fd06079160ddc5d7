"""Training the M students of one receptive field (paper §4).

Each student has the teacher's architecture, starts from its own random initialisation and
regresses the teacher's normalised dense descriptors::

    L(S_i) = mean_{n, r, c} || μ^{S_i}_n(r, c) − (y^T_n(r, c) − μ) / σ ||²

The jitted pieces (optimizer, initialisation, the step that updates all M students at once) are
in :mod:`ustad.uninformed_students.steps`, the teacher's targets and their host cache in
:mod:`ustad.uninformed_students.targets`, the run's setup in
:mod:`ustad.uninformed_students.run_setup`, its schedule in
:mod:`ustad.uninformed_students.schedule` and its end (validation, the students kept, score
normalisation) in :mod:`ustad.uninformed_students.run_end`. This module runs them through
:func:`ustad.training.run_loop`: data, resumption, checkpoints and metrics.
After every epoch the students' loss on the held-out good images is their validation loss
(:mod:`ustad.uninformed_students.validation`); with ``config.select = "best_val"`` each keeps its
params of lowest validation loss (:mod:`ustad.selection`, as STFPM). ``config.max_minutes`` stops
a scale early (:class:`ustad.training_budget.Budget`), ``config.min_train_steps`` is a floor of
updates.

Workdir layout (one scale)::

    <workdir>/checkpoints/<step>/   students, optimizer states, teacher copy, target statistics
                                    (arrays) + config, score normalisation (JSON metadata)
    <workdir>/metrics.jsonl          losses, throughput, validation statistics

A multi-scale run (``config.patch_sizes`` with several entries) trains each scale into
``<workdir>/p<p>/``. :class:`ustad.uninformed_students.score.Detector` loads either.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from ustad import sharding as shd
from ustad.checkpointing import CHECKPOINT_SUBDIR, Checkpointer
from ustad.tiling import check_tile_fits_training, image_tiles
from ustad.training import (
    Every,
    Hook,
    Log,
    Saves,
    check_member_losses,
    epoch_batches,
    hold_out,
    process_writer,
    resume,
    run_key,
    run_loop,
)
from ustad.training_budget import Budget, finished, run_budget
from ustad.training_checks import check_images, data_fingerprint
from ustad.uninformed_students import inputs
from ustad.uninformed_students.checkpoints import (
    ScaleModel,
    check_compatible,
    normalization_from_meta,
    scale_model,
)
from ustad.uninformed_students.crops import CropBatches
from ustad.uninformed_students.dense import PREPADDED
from ustad.uninformed_students.nets import PatchNet
from ustad.uninformed_students.run_end import finish_scale, kept_state, students_validation
from ustad.uninformed_students.run_setup import (
    ScaleRun,
    checkpoint_meta,
    initial_state,
    scale_teacher,
    setup_run,
    target_stats,
)
from ustad.uninformed_students.steps import make_train_step
from ustad.uninformed_students.targets import training_targets

__all__ = ["train_and_evaluate", "train_students"]


PyTree = Any
logger = logging.getLogger(__name__)


def train_students(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    images: np.ndarray,
    *,
    patch_size: int | None = None,
    teacher: tuple[PatchNet, PyTree] | None = None,
    val_images: np.ndarray | None = None,
    on_step: Callable[[int, PyTree], None] | None = None,
    on_step_every: int = 0,
) -> ScaleModel:
    """Train (or resume) the students of one scale on in-memory images.

    Args:
      config: see ``configs/students.py``.
      workdir: this scale's folder (checkpoints, metrics); a run found there is resumed.
      images: ``[N, H, W, C]`` float32 in [0, 1], anomaly-free; H, W multiples of the network's
        stride.
      patch_size: p; default the teacher's, else ``config.patch_sizes[0]``.
      teacher: ``(module, variables)`` in memory; ``None`` loads ``config.teacher_workdir``.
      val_images: anomaly-free images for validation (the students' loss on them after every
        ``config.eval_every_epochs`` epochs; ``config.select = "best_val"`` keeps each student's
        params of lowest loss) and the score normalisation; ``None`` holds out
        ``config.val_fraction`` of ``images`` (split by ``config.seed``).
      on_step: called as ``on_step(step, state)`` after every ``on_step_every``-th step before
        the last (``state``: ``"students"`` ``{"params": [M, …], "opt_state": …}``, ``"teacher"``,
        ``"target_stats"`` and, with ``config.select = "best_val"``, ``"best"`` (each student's
        params of lowest validation loss so far); valid during the call only), e.g. to evaluate
        the students during one run (``benchmarks/convergence.py``).
      on_step_every: how often ``on_step`` is called (0 = never).

    Returns:
      The trained scale, ready for :class:`ustad.uninformed_students.score.Detector`.
    """
    workdir = Path(workdir)
    images = check_images(images)
    key = run_key(config.seed, config.get("prng_impl", "threefry2x32"))
    train_images, val_images = hold_out(
        images, val_images, config.val_fraction, config.seed, config.get("val_min_images", 0)
    )
    tile = train_tile_size(config)
    if tile is not None:
        # Validation and the score statistics see the held-out images as scoring by tiles
        # does: every tile of the scoring layout.
        check_tile_fits_training(train_images.shape[1:3], tile)
        val_images = image_tiles(val_images, tile)
    shaped = images if tile is None else val_images  # what the networks see
    module, teacher_vars, teacher_source = scale_teacher(config, teacher, patch_size, shaped, key)
    run = setup_run(config, module, train_images, val_images, tile)
    state = initial_state(config, run, teacher_vars, key)
    fingerprint = data_fingerprint(images)

    def compatible(meta):  # checked before any array is read
        check_compatible(meta, module, config, run.image_size, run.channels, workdir, fingerprint)

    keep = config.get("keep_checkpoints", 2)
    with (
        Checkpointer(workdir / CHECKPOINT_SUBDIR, max_to_keep=keep) as checkpointer,
        process_writer(workdir) as writer,
    ):
        start_step, state, meta = resume(checkpointer, state, compatible)
        if start_step:
            logger.info("resuming %s at step %d of %d", workdir, start_step, run.total_steps)
        else:
            state = target_stats(config, run, state, teacher_source, writer)
        base_meta = checkpoint_meta(
            config, run, meta.get("teacher_source", teacher_source), fingerprint
        )
        if finished(meta, start_step, run.total_steps):
            normalization = normalization_from_meta(meta, workdir)
            return scale_model(
                module, state, normalization, run.image_size, run.channels, config, meta
            )
        run.val_history[:] = meta.get("val_history", [])
        budget = run_budget(config, meta)
        if start_step < run.total_steps:
            hooks = [Hook.observer(Every(on_step_every, final=False), on_step)] if on_step else []
            if len(run.val_images):
                hooks.append(students_validation(config, run, writer))
            state = _train_loop(
                config, run, state, start_step, checkpointer, writer, base_meta, hooks, budget
            )
        # A budget's last step is the run's: the final checkpoint is saved there.
        done = run.total_steps if budget.stopped_at is None else budget.stopped_at
        state, record = kept_state(config, run, state, budget, done, writer)
        run = dataclasses.replace(run, total_steps=done)
        base_meta = dict(base_meta, **record)
        return finish_scale(config, run, state, checkpointer, writer, base_meta, workdir)


def _train_loop(
    config, run: ScaleRun, state, start_step, checkpointer, writer, base_meta, hooks, budget: Budget
):
    """Run steps ``start_step … total_steps − 1`` (fewer when ``budget`` runs out: it says
    where it stopped); returns the final state."""
    module, mesh, batch_size = run.module, run.mesh, config.batch_size
    put = functools.partial(shd.shard_batch, mesh=mesh)
    targets_config = config
    if run.tiles:  # each step's tiles are new crops: the teacher runs inside the step
        targets_config = config.copy_and_resolve_references()
        targets_config.target_cache = "none"
    cache_mode, data, teacher_params = training_targets(
        targets_config, module, state, run.train_images, put=put
    )
    crop_size = run.image_size[0] if run.tiles else int(config.get("crop_size", 0) or 0)
    step_fn = make_train_step(
        run.student,
        run.tx,
        teacher=None if cache_mode != "none" else module,
        # Crops carry their receptive-field margin: their descriptors are the full image's.
        padding=PREPADDED if crop_size else config.padding,
        mesh=mesh,
        shard_members=run.shard_members,
        member_strategy=config.get("member_strategy", "auto"),
    )
    if writer:
        writer.write(start_step, target_cache=cache_mode, steps_per_epoch=run.steps_per_epoch)

    def step(state, batch, _):
        third = batch["target"] if cache_mode != "none" else teacher_params
        students, losses = step_fn(state["students"], batch["image"], third)
        return dict(state, students=students), losses

    def check(step, losses):
        _check_values(losses, step)  # looked up at each call: tests replace it
        inputs.check_loss_magnitude(losses, step, module.out_dim)

    spe = run.steps_per_epoch
    return run_loop(
        step,
        state,
        _batches(config, run, data, start_step),
        start_step=start_step,
        total_steps=run.total_steps,
        steps_per_epoch=spe,
        check=check,
        log=Log.images(
            writer, Every(config.log_every_steps), f"students p{module.patch_size}", batch_size
        ),
        saves=Saves(
            checkpointer,
            Every(config.checkpoint_every_steps or spe),
            lambda step: dict(
                base_meta,
                step=step,
                epoch=(step - 1) // spe,
                budget_seconds=budget.seconds(),
                val_history=list(run.val_history),
            ),
        ),
        hooks=hooks,
        budget=budget,
    )


def _batches(config, run: ScaleRun, data: dict, start_step: int):
    """The batches of steps ``start_step …``: crops when ``config.crop_size`` is set, else
    whole images (with their cached targets, if any), shuffled each epoch."""
    crop_size = run.image_size[0] if run.tiles else int(config.get("crop_size", 0) or 0)
    if not crop_size:
        return epoch_batches(
            data,
            config.batch_size,
            seed=config.seed,
            sharding=shd.batch_sharding(run.mesh),
            start_step=start_step,
            total_steps=run.total_steps,
        )
    crops = CropBatches(data, run.module, config.padding, crop_size, config.batch_size, config.seed)
    return (
        {k: shd.shard_batch(v, run.mesh) for k, v in batch.items()}
        for batch in crops.iterate(start_step, run.total_steps)
    )


def _check_values(losses: np.ndarray, step: int) -> None:
    """The M students' losses ``[M]`` of ``step``: NaN or inf raise, naming the student."""
    check_member_losses(step, losses)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike):
    """Train the students of every scale in ``config.patch_sizes`` on an MVTec-layout category.

    Loads ``config.data_dir/config.category/train/good`` only (``test/`` and ``ground_truth/``
    are for evaluation and need not exist), resized to ``config.image_size`` (an int or
    ``(H, W)``; with ``config.keep_aspect``, the short side to ``config.image_size`` and both
    sides rounded to the pooling stride), holds out ``config.val_fraction`` of it for the score
    normalisation, and trains each scale into ``workdir`` (one scale) or ``workdir/p<p>``
    (several). Interrupted runs resume.

    Returns:
      The trained :class:`~ustad.uninformed_students.checkpoints.ScaleModel` of each scale.
    """
    images = training_images(config)
    scales = []
    for p in config.patch_sizes:
        scale_dir = Path(workdir) if len(config.patch_sizes) == 1 else Path(workdir) / f"p{p}"
        scales.append(train_students(config, scale_dir, images, patch_size=p))
    return scales


def training_images(config: ml_collections.ConfigDict) -> np.ndarray:
    """``config.data_dir/config.category/train/good`` as the students train on it:
    ``[N, H, W, C]`` float32 in [0, 1] (see :func:`train_and_evaluate`)."""
    from ustad.data.mvtec import load_mvtec_train

    tiles = config.get("train_tiles", False)  # native size; image_size is the tile's
    images, _ = load_mvtec_train(
        config.data_dir,
        config.category,
        image_size=None if tiles else config.image_size,
        grayscale=config.get("grayscale", False),
        keep_aspect=config.get("keep_aspect", False),
        multiple=inputs.size_multiple(config.patch_sizes),
    )
    return images


def train_tile_size(config: ml_collections.ConfigDict) -> tuple[int, int] | None:
    """The ``(c, c)`` of the training tiles with ``config.train_tiles`` (``config.image_size``,
    one int: the tiles are exact-context crops, :mod:`ustad.uninformed_students.crops`), else
    None."""
    if not config.get("train_tiles", False):
        return None
    size = config.image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(
            f"--config.train_tiles: --config.image_size={size!r} must be one int, the side of "
            f"the square training tiles"
        )
    return (size, size)


def held_out_images(config: ml_collections.ConfigDict) -> np.ndarray:
    """The good images :func:`train_and_evaluate` held out of training (the same split):
    ``[V, H, W, C]``, for calibrating the trained detector."""
    images = training_images(config)
    fraction, seed = config.val_fraction, config.seed
    return hold_out(images, None, fraction, seed, config.get("val_min_images", 0))[1]
