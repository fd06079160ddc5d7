"""Training the M students of one receptive field (paper §4).

Each student has the teacher's architecture, starts from its own random initialisation and
regresses the teacher's normalised dense descriptors::

    L(S_i) = mean_{n, r, c} || μ^{S_i}_n(r, c) − (y^T_n(r, c) − μ) / σ ||²

The jitted pieces (optimizer, initialisation, the step that updates all M students at once) are
in :mod:`ustad.uninformed_students.steps`, the teacher's targets and their host cache in
:mod:`ustad.uninformed_students.targets`. This module runs them through
:func:`ustad.training.run_loop`: data, resumption, score normalisation, checkpoints and metrics.
After every epoch the students' loss on the held-out good images is their validation loss
(:mod:`ustad.uninformed_students.validation`); with ``config.select = "best_val"`` each keeps its
params of lowest validation loss (:mod:`ustad.selection`, as STFPM). ``config.max_minutes`` stops
a scale early (:class:`ustad.training.Budget`), ``config.min_train_steps`` is a floor of updates.

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
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ustad import sharding as shd
from ustad.checkpointing import CHECKPOINT_SUBDIR, Checkpointer
from ustad.ensemble import check_normalization, resolve_member_strategy
from ustad.metric_writer import progress
from ustad.selection import (
    end_record,
    initial_best,
    selection_record,
    validation_hook,
    validation_losses,
)
from ustad.stats import descriptor_stats
from ustad.tiling import check_tile_fits_training, image_tiles, random_crops
from ustad.training import (
    Budget,
    Every,
    Hook,
    Log,
    Saves,
    check_images,
    check_member_losses,
    data_fingerprint,
    epoch_batches,
    finished,
    hold_out,
    process_writer,
    resume,
    run_budget,
    run_key,
    run_loop,
    scheduled_steps,
)
from ustad.uninformed_students import inputs
from ustad.uninformed_students.checkpoints import (
    FORMAT,
    ScaleModel,
    check_compatible,
    normalization_from_meta,
    scale_model,
    score_params,
)
from ustad.uninformed_students.crops import CropBatches, check_crop_size, crop_steps_per_epoch
from ustad.uninformed_students.dense import PREPADDED
from ustad.uninformed_students.maps import compute_score_statistics, pseudo_anomaly_auroc
from ustad.uninformed_students.nets import PatchNet, layers_to_json
from ustad.uninformed_students.steps import init_students, make_optimizer, make_train_step
from ustad.uninformed_students.targets import describe_fn, teacher_from_config, training_targets
from ustad.uninformed_students.validation import validation_loss_fn

__all__ = ["scale_epochs", "scale_schedule", "train_and_evaluate", "train_students"]


PyTree = Any
logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class _Run:
    """What one scale's run is, fixed before its first step (and the same when it resumes)."""

    train_images: np.ndarray  # [N, H, W, C]
    val_images: np.ndarray  # [V, H, W, C] for the score normalisation; may be empty
    module: PatchNet  # the teacher's network
    student: PatchNet  # the same in config.compute_dtype
    tx: Any  # the students' optimizer
    mesh: jax.sharding.Mesh
    shard_members: bool
    steps_per_epoch: int
    total_steps: int
    image_size: tuple[int, int]  # (H, W)
    channels: int  # C
    floor: int = 0  # the fewest updates the schedule gives (min_train_steps, train_steps)
    select_best: bool = False  # each student keeps its variables of lowest validation loss
    # The mean validation loss after each validation (restored from the checkpoint on resume).
    val_history: list = dataclasses.field(default_factory=list)
    # Training on tiles (config.train_tiles): train_images keep their native size and each step
    # takes image_size crops of them (with their receptive-field context, as crop_size does).
    tiles: bool = False


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
    module, teacher_vars, teacher_source = _teacher(config, teacher, patch_size, shaped, key)
    run = _setup(config, module, train_images, val_images, tile)
    state = _initial_state(config, run, teacher_vars, key)
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
            state = _target_stats(config, run, state, teacher_source, writer)
        base_meta = _base_meta(config, run, meta.get("teacher_source", teacher_source), fingerprint)
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
                hooks.append(_validation(config, run, writer))
            state = _train_loop(
                config, run, state, start_step, checkpointer, writer, base_meta, hooks, budget
            )
        # A budget's last step is the run's: the final checkpoint is saved there.
        done = run.total_steps if budget.stopped_at is None else budget.stopped_at
        state, record = _kept(config, run, state, budget, done, writer)
        run = dataclasses.replace(run, total_steps=done)
        base_meta = dict(base_meta, **record)
        return _finish(config, run, state, checkpointer, writer, base_meta, workdir)


def _teacher(config, teacher, patch_size, images, key) -> tuple[PatchNet, PyTree, str]:
    """``(module, variables, source)``: the teacher given in memory, else the config's."""
    if teacher is None:
        p = patch_size or config.patch_sizes[0]
        module, variables, source = teacher_from_config(
            config, p, images.shape[-1], jax.random.fold_in(key, 2)
        )
    else:
        (module, variables), source = teacher, "in-memory"
    if patch_size is not None and module.patch_size != patch_size:
        raise ValueError(f"the teacher {source} has p={module.patch_size}, expected {patch_size}")
    inputs.check_image_size(tuple(images.shape[1:3]), module)
    return module, variables, source


def _setup(config, module: PatchNet, train_images, val_images, tile=None) -> _Run:
    """The run's mesh, student network, optimizer and steps, checked against the images
    (``tile``: the ``(H, W)`` of training on tiles, see :func:`train_tile_size`)."""
    mesh, shard_members = shd.training_mesh(config, config.num_students)
    batch_size, image_size = config.batch_size, tuple(train_images.shape[1:3])
    crop_size = int(config.get("crop_size", 0) or 0)
    if tile is not None:
        # An epoch is N // B steps of B tiles, as of B whole images: the same updates as
        # training on the images resized to the tile size.
        check_crop_size(tile[0], image_size, module)
        image_size, steps_per_epoch = tile, max(1, len(train_images) // batch_size)
    elif crop_size:
        check_crop_size(crop_size, image_size, module)
        steps_per_epoch = crop_steps_per_epoch(len(train_images), image_size, crop_size, batch_size)
    else:
        if batch_size > len(train_images):
            raise ValueError(f"batch_size={batch_size} > {len(train_images)} training images")
        steps_per_epoch = len(train_images) // batch_size  # full batches only
    total_steps, floor = scale_schedule(config, module.patch_size, steps_per_epoch)
    compute_dtype = jnp.dtype(config.get("compute_dtype", "float32"))
    # Cloning only when needed keeps the student equal (and hash-equal) to the teacher module,
    # so the cached jitted functions are shared with other callers.
    student = module
    if jnp.dtype(module.dtype) != compute_dtype:
        student = module.clone(dtype=compute_dtype)
    schedule = config.get("lr_schedule", "constant"), int(config.get("warmup_steps", 0))
    tx = make_optimizer(config.learning_rate, config.weight_decay, *schedule, total_steps)
    fixed = (mesh, shard_members, steps_per_epoch, total_steps, image_size, train_images.shape[-1])
    select_best = config.get("select", "last") == "best_val" and len(val_images) > 0
    return _Run(
        train_images, val_images, module, student, tx, *fixed, floor, select_best,
        tiles=tile is not None,
    )  # fmt: skip


def _initial_state(config, run: _Run, teacher_vars: PyTree, key: jax.Array) -> PyTree:
    """Fresh students, the teacher and (placeholder) target statistics on the mesh."""
    members = shd.member_sharding(run.mesh, run.shard_members)
    key = jax.random.fold_in(key, 0)
    students = init_students(run.student, run.tx, key, config.num_students, run.channels, members)
    zeros = np.zeros(run.module.out_dim, np.float32)
    state = {
        "students": students,
        "teacher": shd.put_replicated(teacher_vars, run.mesh),
        "target_stats": shd.put_replicated({"mean": zeros, "std": zeros + 1}, run.mesh),
    }
    if run.select_best:
        kept = {"params": students["params"]}
        state["best"] = initial_best(kept, config.num_students, run.mesh, "step")
    return state


def _target_stats(config, run: _Run, state: PyTree, teacher_source: str, writer) -> PyTree:
    """``state`` with the teacher's descriptor statistics on the training images (a fresh run;
    a resumed one restores them)."""
    images = run.train_images
    if run.tiles:  # one random tile of each native-size image: what the steps will see
        images = random_crops(images, run.image_size, config.seed, 0)
    stats = descriptor_stats(
        describe_fn(run.module, config.padding),
        state["teacher"],
        images,
        batch_size=config.stats_batch_size,
        put=functools.partial(shd.shard_batch, mesh=run.mesh),
    )
    inputs.check_target_stats(stats, teacher_source)
    if writer:
        writer.write(0, target_mean_avg=stats.mean.mean(), target_std_avg=stats.std.mean())
    return dict(state, target_stats=shd.put_replicated(stats.as_arrays(), run.mesh))


def _base_meta(config, run: _Run, teacher_source: str, fingerprint: str) -> dict:
    """The JSON metadata of every checkpoint of the run."""
    return {
        "format": FORMAT,
        "patch_size": run.module.patch_size,
        "out_dim": run.module.out_dim,
        "layers": layers_to_json(run.module.layers),
        "channels": run.channels,
        "image_size": list(run.image_size),
        "num_students": int(config.num_students),
        "padding": config.padding,
        "teacher_source": teacher_source,
        "steps_per_epoch": run.steps_per_epoch,
        "total_steps": run.total_steps,
        "data_fingerprint": fingerprint,
        "config": json.loads(config.to_json_best_effort()),
    }


def _train_loop(
    config, run: _Run, state, start_step, checkpointer, writer, base_meta, hooks, budget: Budget
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


def _validation(config, run: _Run, writer) -> Hook:
    """After every ``config.eval_every_epochs``-th epoch and the last step: each student's loss
    on the held-out images (:mod:`ustad.uninformed_students.validation`), written, and with
    ``config.select = "best_val"`` each student's variables of lowest loss kept."""
    strategy = resolve_member_strategy(
        config.get("member_strategy", "auto"), sharded=run.shard_members
    )
    loss_fn = validation_loss_fn(run.module, run.student, config.padding, strategy)
    put = functools.partial(shd.shard_batch, mesh=run.mesh)

    def losses(state: PyTree) -> np.ndarray:
        students = state["students"]["params"]
        fn = functools.partial(loss_fn, state["teacher"], state["target_stats"], students)
        return validation_losses(fn, run.val_images, batch_size=config.eval_batch_size, put=put)

    def check(history: list, epoch: int) -> None:
        if not np.isfinite(history[-1]):
            raise FloatingPointError(
                f"the students p{run.module.patch_size}: validation loss {history[-1]} after "
                f"epoch {epoch}; lower --config.learning_rate and use a new workdir"
            )

    return validation_hook(
        losses=losses,
        members=(lambda state: {"params": state["students"]["params"]})
        if run.select_best
        else None,
        history=run.val_history,
        writer=writer,
        steps_per_epoch=run.steps_per_epoch,
        every_epochs=config.get("eval_every_epochs", 1),
        check=check,
        mark="step",
    )


def _kept(config, run: _Run, state, budget: Budget, done: int, writer) -> tuple[PyTree, dict]:
    """The state to save and score (with ``select_best`` the students' params of lowest
    validation loss in place of the last ones) and the record of how training ended and what
    was kept, for the final checkpoint's metadata and the metrics."""
    record = end_record(
        f"the students p{run.module.patch_size}",
        history=run.val_history,
        budget=budget,
        done=done,
        total_steps=run.total_steps,
        floor=run.floor,
    )
    best = state.get("best") if run.select_best else None
    record.update(selection_record(best, run.steps_per_epoch, done))
    record["val_history"] = list(run.val_history)
    if best is not None:
        state = dict(state, students=dict(state["students"], params=best["params"]))
    if writer:
        writer.write(
            done,
            stopped_by=record["stopped_by"],
            val_loss_flattened=str(record["val_loss_flattened"]),
            selected_steps=str(record["selected_steps"]),
            selected_val_loss=str(record["selected_val_loss"]),
        )
    return state, record


def _batches(config, run: _Run, data: dict, start_step: int):
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


def _finish(config, run: _Run, state, checkpointer, writer, base_meta, workdir) -> ScaleModel:
    """Score normalisation (paper §5; by default the robust kind, see
    :func:`compute_score_statistics`) on held-out good images and the pseudo-anomaly check of
    the scale (:func:`pseudo_anomaly_auroc`), saved with the trained students as the run's last
    checkpoint."""
    module, total_steps, val_images = run.module, run.total_steps, run.val_images
    norm_images = val_images if len(val_images) else run.train_images
    if not len(val_images) and run.tiles:
        norm_images = image_tiles(run.train_images, run.image_size)
    if not len(val_images):
        logger.warning("no validation images: normalising scores on the training images")
    common = dict(
        batch_size=config.eval_batch_size,
        padding=config.padding,
        put=functools.partial(shd.shard_batch, mesh=run.mesh),
        member_strategy=config.get("member_strategy", "auto"),
    )
    with progress(len(norm_images), desc="score normalisation", unit="img") as bar:
        statistics = compute_score_statistics(
            module, module, score_params(state), norm_images,
            kind=config.get("score_normalization", "quantile"), seed=config.seed,
            progress=bar.update, **common,
        )  # fmt: skip
    normalization = statistics.normalization
    check_normalization(normalization, module.out_dim, f"the students in {workdir}")
    check = pseudo_anomaly_auroc(
        module, module, score_params(state), normalization, norm_images, seed=config.seed, **common
    )
    logger.info(
        "students p%d: pseudo-defect image AUROC %.3f on %d held-out good images and the same "
        "with planted defects%s", module.patch_size, check["image_auroc"], check["good_images"],
        " (worse than chance: a multi-scale detector leaves this scale out)"
        if check["image_auroc"] < 0.5 else "",
    )  # fmt: skip
    meta = dict(
        base_meta,
        step=total_steps,
        score_normalization=normalization.as_dict(),
        score_statistics=statistics.record(),
        pseudo_anomaly=check,
        normalization_images=len(norm_images),
        normalization_source="validation" if len(val_images) else "train",
    )
    checkpointer.save(total_steps, state, meta)
    if writer:
        values = {f"val_{k}": v for k, v in statistics.moments.as_dict().items()}
        if statistics.kind == "quantile":
            values.update({f"val_robust_{k}": v for k, v in normalization.as_dict().items()})
        writer.write(total_steps, pseudo_auroc=check["image_auroc"], **values)
    return scale_model(module, state, normalization, run.image_size, run.channels, config, meta)


def scale_schedule(
    config: ml_collections.ConfigDict, patch_size: int, steps_per_epoch: int
) -> tuple[int, int]:
    """``(total_steps, floor)`` of the scale ``patch_size``: its whole epochs
    (:func:`scale_epochs`) of ``steps_per_epoch`` updates, raised to the floor, the fewest
    updates it gets whatever the category's size (``config.min_train_steps`` or the scale's
    :func:`scale_updates`, whichever is more)."""
    floor = max(int(config.get("min_train_steps", 0) or 0), scale_updates(config, patch_size))
    epochs = scale_epochs(config, patch_size, steps_per_epoch)
    total_steps = scheduled_steps(epochs, steps_per_epoch, floor)
    if total_steps > epochs * steps_per_epoch:
        logger.info(
            "p=%d: %d epochs of %d updates are below the floor of %d updates "
            "(--config.min_train_steps): training %d updates",
            patch_size, epochs, steps_per_epoch, floor, total_steps,
        )  # fmt: skip
    return total_steps, floor


def scale_updates(config: ml_collections.ConfigDict, patch_size: int) -> int:
    """The updates the scale ``patch_size`` trains for at least, or 0 when the config counts
    epochs: ``config.scale_train_steps["p<p>"]``, else ``config.train_steps`` (0 = epochs).

    A count of updates does not depend on the category's size: 15 epochs of a 54-image
    category are 4× fewer updates than of a 200-image one, and too few to learn."""
    by_scale = config.get("scale_train_steps") or {}
    value = by_scale.get(f"p{patch_size}", config.get("train_steps", 0) or 0)
    if int(value) != value or value < 0:
        raise ValueError(
            f"train_steps for p={patch_size} must be an integer ≥ 0 (0 = count epochs), got "
            f"{value!r}"
        )
    return int(value)


def scale_epochs(
    config: ml_collections.ConfigDict, patch_size: int, steps_per_epoch: int = 0
) -> int:
    """The epochs of the scale ``patch_size``.

    With updates configured (:func:`scale_updates`), the fewest whole epochs of
    ``steps_per_epoch`` steps that reach them; else ``config.scale_epochs["p<p>"]`` when the
    config sets it (a multi-scale run may give its cheap scales more epochs), else
    ``config.epochs``.
    """
    updates = scale_updates(config, patch_size)
    if updates:
        if steps_per_epoch < 1:
            raise ValueError("steps_per_epoch is needed to turn train_steps into epochs")
        return -(-updates // steps_per_epoch)
    by_scale = config.get("scale_epochs") or {}
    value = by_scale.get(f"p{patch_size}", config.epochs)
    if int(value) != value or value < 1:
        raise ValueError(f"epochs for p={patch_size} must be a positive integer, got {value!r}")
    return int(value)


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
