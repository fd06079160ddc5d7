"""Training STFPM students (Wang et al., BMVC 2021) on anomaly-free images.

A frozen ImageNet teacher (:mod:`ustad.stfpm.nets`: EfficientNet-Lite0 offline, ResNet-18 as
the paper) and M randomly initialised students of the same architecture (M = 1 is the paper;
M > 1 adds Uninformed Students' error + variance score, :mod:`ustad.stfpm.maps`), trained with SGD
(lr 0.4, momentum 0.9, weight decay 1e-4, batch 32, 100 epochs by default: the authors' code)
to match the teacher's L2-normalised pyramid. Validation (``config.val_fraction`` of
``train/good``, 20 % as the authors' code) gives each student's loss after every epoch; with
``config.select = "best_val"`` each student keeps its epoch of lowest validation loss (the
authors keep the epoch of the lowest mean validation anomaly map), and the per-level
statistics of e and v on it normalise the ensemble score. ``config.max_minutes`` stops training
early (:class:`ustad.training_budget.Budget`), ``config.min_train_steps`` is a floor of updates.

Workdir layout::

    <workdir>/checkpoints/<step>/   students (params, BatchNorm statistics, SGD momentum), the
                                    best epoch's students, a teacher copy (arrays) + config,
                                    network, score settings and normalisation (JSON metadata)
    <workdir>/metrics.jsonl          losses, throughput, validation losses

The metadata say ``"family": "stfpm"``: :mod:`ustad.families` dispatches on it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from ustad import sharding as shd
from ustad.checkpointing import CHECKPOINT_SUBDIR, Checkpointer
from ustad.host_images import convert_channels
from ustad.selection import end_record, selection_record, validation_hook, validation_losses
from ustad.stfpm import maps as stfpm
from ustad.stfpm.checkpoints import (
    RESUME_SETTINGS,
    STFPMModel,
    check_compatible,
    model_from_state,
    teacher_from_config,
)
from ustad.stfpm.nets import pyramid_net
from ustad.stfpm.run import (
    Books,
    Run,
    checkpoint_metadata,
    initial_state,
    setup_run,
    train_tile_size,
    training_images,
)
from ustad.stfpm.steps import (
    make_train_step,
    score_normalization,
    teacher_cache,
    validation_loss_fn,
)
from ustad.tiling import check_tile_fits_training, image_tiles, random_crops
from ustad.training import (
    Every,
    Hook,
    Log,
    Saves,
    check_member_losses,
    epoch_batches,
    hold_out,
    member_losses,
    process_writer,
    resume,
    run_key,
    run_loop,
)
from ustad.training_budget import finished, run_budget
from ustad.training_checks import check_images, check_not_diverged, data_fingerprint

__all__ = ["RESUME_SETTINGS", "train_and_evaluate", "train_stfpm"]


PyTree = Any
logger = logging.getLogger(__name__)


def train_stfpm(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    images: np.ndarray,
    *,
    val_images: np.ndarray | None = None,
) -> STFPMModel:
    """Train (or resume, or load when finished) STFPM students on in-memory images.

    Args:
        config: see ``configs/stfpm.py``.
        workdir: checkpoints and metrics; a run found there is resumed.
        images: ``[N, H, W, C]`` float32 in [0, 1] (or uint8), anomaly-free; C = 1 is
            repeated to RGB.
        val_images: anomaly-free images for validation and the score normalisation; None
            holds out ``config.val_fraction`` of ``images`` (split by ``config.seed``).

    Returns:
        The trained :class:`~ustad.stfpm.checkpoints.STFPMModel`.
    """
    workdir = Path(workdir)
    images = convert_channels(check_images(images), 3)
    if val_images is not None:
        val_images = convert_channels(check_images(val_images), 3)
    fingerprint = data_fingerprint(images)
    key = run_key(config.seed, config.get("prng_impl", "threefry2x32"))
    train_images, val_images = hold_out(
        images, val_images, config.val_fraction, config.seed, config.get("val_min_images", 0)
    )
    stfpm.check_score(config.score, config.combination)
    if config.select not in ("best_val", "last"):
        raise ValueError(f"--config.select={config.select!r}: 'best_val' or 'last'")
    network = pyramid_net(
        config.backbone, tiny=config.get("tiny", False), levels=config.get("levels", None)
    )
    teacher, teacher_source = teacher_from_config(config, network, jax.random.fold_in(key, 2))
    tile = train_tile_size(config)
    if tile is not None:
        # Validation and the score statistics see the held-out images as scoring by tiles
        # does: every tile of the scoring layout.
        check_tile_fits_training(train_images.shape[1:3], tile)
        val_images = image_tiles(val_images, tile)
    run = setup_run(config, network, train_images, val_images)
    run = dataclasses.replace(run, tile_size=tile)
    state = initial_state(config, run, teacher, key)
    base_meta = checkpoint_metadata(config, run, teacher_source, fingerprint)

    def compatible(meta):  # checked before any array is read
        check_compatible(meta, config, run.image_size, workdir, fingerprint)

    keep = config.get("keep_checkpoints", 2)
    with (
        Checkpointer(workdir / CHECKPOINT_SUBDIR, max_to_keep=keep) as checkpointer,
        process_writer(workdir) as writer,
    ):
        start_step, state, meta = resume(checkpointer, state, compatible)
        if start_step:
            logger.info("resuming %s at step %d of %d", workdir, start_step, run.total_steps)
        if finished(meta, start_step, run.total_steps):
            normalization = meta["score_normalization"]
            return model_from_state(network, state, run.image_size, config, normalization)
        run.val_history[:] = meta.get("val_history", [])
        budget = run_budget(config, meta)
        t0 = time.perf_counter() - float(meta.get("train_seconds", 0.0))
        books = Books(checkpointer, writer, base_meta, t0, budget, workdir)
        state, done = _train_loop(config, run, state, start_step, books)
        return _finish(config, run, state, done, books)


def _train_loop(config, run: Run, state, start_step, books: Books):
    """Epochs ``start_step // steps_per_epoch … run.epochs − 1``: steps, validation after
    each epoch (and the best students kept), a checkpoint at each epoch's end; returns the
    final state and the steps done (fewer than ``run.total_steps`` when the budget ran out)."""
    writer, base_meta, budget = books.writer, books.base_meta, books.budget
    cache = _teacher_cache(config, run, state["teacher"])
    step_fn = make_train_step(
        run.network,
        run.tx,
        level_weights=config.get("level_weights", None),
        cached_targets=cache is not None,
        mesh=run.mesh,
        shard_members=run.shard_members,
        member_strategy=run.strategy,
    )
    if writer:
        writer.write(
            start_step,
            teacher_cache=cache is not None,
            steps_per_epoch=run.steps_per_epoch,
            train_images=len(run.train_images),
        )

    def step(state, batch, _):
        third = state["teacher"] if cache is None else batch["t"]
        students, losses = step_fn(state["students"], batch["image"], third)
        return dict(state, students=students), losses

    data = {"image": run.train_images} if cache is None else {"image": run.train_images, "t": cache}
    batches = epoch_batches(
        data,
        config.batch_size,
        seed=config.seed,
        sharding=shd.batch_sharding(run.mesh) if run.tile_size is None else None,
        start_step=start_step,
        total_steps=run.total_steps,
    )
    if run.tile_size is not None:
        batches = _tile_batches(config, run, batches, start_step)
    spe = run.steps_per_epoch

    def metadata(step):
        seconds = time.perf_counter() - books.t0
        return dict(
            base_meta,
            step=step,
            epoch=step // spe - 1,
            train_seconds=seconds,
            budget_seconds=budget.seconds(),
            val_history=list(run.val_history),
        )

    state = run_loop(
        step,
        state,
        batches,
        start_step=start_step,
        total_steps=run.total_steps,
        steps_per_epoch=spe,
        check=check_member_losses,
        # The mean loss in float64, as this trainer always wrote it.
        log=Log.images(
            writer,
            Every(config.log_every_steps, epochs=1),
            "STFPM",
            config.batch_size,
            values=lambda losses: member_losses(np.asarray(losses, np.float64)),
        ),
        saves=Saves(
            books.checkpointer, Every(epochs=config.get("checkpoint_every_epochs", 1)), metadata
        ),
        hooks=[_validation(config, run, writer)] if len(run.val_images) else [],
        budget=budget,
    )
    return state, run.total_steps if budget.stopped_at is None else budget.stopped_at


def _tile_batches(config, run: Run, host_batches, start_step: int):
    """Training on tiles: each step's batch of native-size images (host arrays) cut to one
    random tile-sized crop per image (:func:`ustad.tiling.random_crops`, drawn from the seed
    and the step, so a resumed run takes the same crops), on the mesh."""
    for step, batch in enumerate(host_batches, start_step):
        yield {"image": run.put(random_crops(batch["image"], run.tile_size, config.seed, step))}


def _teacher_cache(config, run: Run, teacher: PyTree) -> PyTree | None:
    """The teacher's maps of every training image (:func:`teacher_cache`: one
    ``[N, h_l, w_l, C_l]`` float32 host array per level), or None when
    ``config.teacher_cache`` is ``"none"`` or they would not fit (the teacher then runs in
    every step)."""
    if config.get("teacher_cache", "auto") == "none" or run.tile_size is not None:
        return None  # (training on tiles: each step's crops are new)
    return teacher_cache(
        run.network,
        teacher,
        run.train_images,
        batch_size=config.eval_batch_size,
        max_bytes=config.get("teacher_cache_max_gb", 4.0) * 1e9,
        put=run.put,
    )


def _validation(config, run: Run, writer) -> Hook:
    """After every ``config.eval_every_epochs``-th epoch and the last: each student's
    validation loss, written, and (``select_best``) its best epoch kept."""
    weights = config.get("level_weights", None)
    weights = None if weights is None else tuple(weights)
    loss_fn = validation_loss_fn(run.network, weights, run.strategy)

    def losses(state: PyTree) -> np.ndarray:
        fn = functools.partial(loss_fn, state["teacher"], state["students"])
        return validation_losses(fn, run.val_images, batch_size=config.eval_batch_size, put=run.put)

    def kept(state: PyTree) -> dict:
        students = state["students"]
        return {"params": students["params"], "batch_stats": students["batch_stats"]}

    return validation_hook(
        losses=losses,
        members=kept if run.select_best else None,
        history=run.val_history,
        writer=writer,
        steps_per_epoch=run.steps_per_epoch,
        every_epochs=config.eval_every_epochs,
        check=lambda history, epoch: check_not_diverged(history, epoch, "the STFPM students"),
        mark="epoch",
    )


def _finish(config, run: Run, state, done: int, books: Books) -> STFPMModel:
    """The kept students' score normalisation (per-level statistics of e and v on the held-out
    images), saved with them as the run's last checkpoint (at step ``done``)."""
    writer, workdir = books.writer, books.workdir
    final = state["students"]
    if run.select_best:
        best = state["best"]
        final = dict(final, params=best["params"], batch_stats=best["batch_stats"])
    students = {"params": final["params"], "batch_stats": final["batch_stats"]}
    norm_images = run.val_images if len(run.val_images) else run.train_images
    if not len(run.val_images) and run.tile_size is not None:
        norm_images = image_tiles(run.train_images, run.tile_size)
    normalization = score_normalization(
        run.network,
        {"teacher": state["teacher"], "students": students},
        norm_images,
        run.image_size,
        batch_size=config.eval_batch_size,
        put=run.put,
        strategy=run.strategy,
    )
    if not np.isfinite(normalization).all():
        raise FloatingPointError(
            f"the STFPM students in {workdir}: non-finite score statistics {normalization}; "
            f"lower --config.learning_rate and use a new workdir"
        )
    state = dict(state, students=final)
    elapsed = time.perf_counter() - books.t0
    ended = end_record(
        "the STFPM students",
        history=run.val_history,
        budget=books.budget,
        done=done,
        total_steps=run.total_steps,
        floor=run.floor,
    )
    selection = selection_record(state.get("best"), run.steps_per_epoch, done)
    selected = shd.to_host(state["best"]["epoch"]).tolist() if run.select_best else None
    meta = dict(
        books.base_meta,
        step=done,
        train_seconds=elapsed,
        selected_epochs=selected or [(done - 1) // run.steps_per_epoch] * config.num_students,
        score_normalization=normalization.tolist(),
        normalization_images=len(norm_images),
        normalization_source="validation" if len(run.val_images) else "train",
        val_history=list(run.val_history),
        **ended,
        **selection,
    )
    books.checkpointer.save(done, state, meta)
    if writer:
        selected_loss = selection["selected_val_loss"]
        writer.write(
            done,
            train_seconds=elapsed,
            selected_epochs=str(selected),
            selected_steps=str(selection["selected_steps"]),
            selected_val_loss=str(selected_loss),
            stopped_by=ended["stopped_by"],
            val_loss_flattened=str(ended["val_loss_flattened"]),
        )
    return model_from_state(run.network, state, run.image_size, config, normalization)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike):
    """Train STFPM on ``config.data_dir/config.category/train/good`` (MVTec layout; ``test/``
    and ``ground_truth/`` are not read), resized to ``config.image_size``.

    Returns:
        The trained :class:`~ustad.stfpm.checkpoints.STFPMModel`.
    """
    return train_stfpm(config, workdir, training_images(config))


def held_out_images(config: ml_collections.ConfigDict) -> np.ndarray:
    """The good images :func:`train_and_evaluate` held out for validation (the same split):
    ``[V, H, W, C]``, for calibrating the trained detector."""
    images = training_images(config)
    fraction, seed = config.val_fraction, config.seed
    return hold_out(images, None, fraction, seed, config.get("val_min_images", 0))[1]
