"""Training the M students of one receptive field (paper §4).

Each student has the teacher's architecture, starts from its own random initialisation and
regresses the teacher's normalised dense descriptors::

    L(S_i) = mean_{n, r, c} || μ^{S_i}_n(r, c) − (y^T_n(r, c) − μ) / σ ||²

The jitted pieces (optimizer, initialisation, the step that updates all M students at once) are
in :mod:`ustad.train.student_steps`, the teacher's targets and their host cache in
:mod:`ustad.train.student_targets`; both are importable from here too. This module runs them:
data, resumption, score normalisation, checkpoints and metrics.

Workdir layout (one scale)::

    <workdir>/checkpoints/<step>/   students, optimizer states, teacher copy, target statistics
                                    (arrays) + config, score normalisation (JSON metadata)
    <workdir>/metrics.jsonl          losses, throughput, validation statistics

A multi-scale run (``config.patch_sizes`` with several entries) trains each scale into
``<workdir>/p<p>/``. :class:`ustad.scoring.Detector` loads either.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ustad import sharding as shd
from ustad.checkpointing import Checkpointer
from ustad.dense import PREPADDED
from ustad.metric_writer import MetricWriter, check_finite, progress
from ustad.models.patch_net import PatchNet, layers_to_json
from ustad.score_maps import check_normalization
from ustad.scoring import (
    CHECKPOINT_SUBDIR,
    FORMAT,
    ScaleModel,
    ScoreNormalization,
    compute_normalization,
)
from ustad.stats import descriptor_stats
from ustad.train import student_inputs as inputs
from ustad.train.student_checkpoints import _check_compatible, _scale_model, _score_params
from ustad.train.student_crops import CropBatches, check_crop_size, crop_steps_per_epoch
from ustad.train.student_steps import (
    init_students,
    make_optimizer,
    make_train_step,
    student_loss,
    student_step,
)
from ustad.train.student_targets import (
    CACHE_MODES,
    _describe_fn,
    _teacher_from_config,
    available_memory_bytes,
    build_target_cache,
    choose_target_cache,
    training_targets,
)

__all__ = [
    "CACHE_MODES",
    "available_memory_bytes",
    "build_target_cache",
    "choose_target_cache",
    "init_students",
    "make_optimizer",
    "make_train_step",
    "student_loss",
    "student_step",
    "train_and_evaluate",
    "train_students",
]

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
      val_images: anomaly-free images for the score normalisation; ``None`` holds out
        ``config.val_fraction`` of ``images`` (split by ``config.seed``).
      on_step: called as ``on_step(step, state)`` after every ``on_step_every``-th step before
        the last (``state``: ``"students"`` ``{"params": [M, …], "opt_state": …}``, ``"teacher"``,
        ``"target_stats"``; valid during the call only), e.g. to evaluate the students during
        one run (``benchmarks/convergence.py``).
      on_step_every: how often ``on_step`` is called (0 = never).

    Returns:
      The trained scale, ready for :class:`ustad.scoring.Detector`.
    """
    # Imported here: ustad.data pulls in TensorFlow Datasets, which the pure steps above (and
    # the processes that only run them) do without.
    from ustad.data.pipeline import num_batches
    from ustad.data.split import split_validation

    workdir = Path(workdir)
    images = inputs.check_images(images)
    # threefry (JAX's default) draws the same numbers on any mesh; "rbg" compiles much faster
    # on CPU (seconds less per run, which matters for tests) but may depend on the sharding.
    key = jax.random.key(config.seed, impl=config.get("prng_impl", "threefry2x32"))
    if val_images is None:
        train_idx, val_idx = split_validation(len(images), config.val_fraction, config.seed)
        train_images, val_images = images[train_idx], images[val_idx]
    else:
        train_images = images
    channels, image_size = images.shape[-1], tuple(images.shape[1:3])
    if teacher is None:
        p = patch_size or config.patch_sizes[0]
        module, teacher_vars, teacher_source = _teacher_from_config(
            config, p, channels, jax.random.fold_in(key, 2)
        )
    else:
        (module, teacher_vars), teacher_source = teacher, "in-memory"
    if patch_size is not None and module.patch_size != patch_size:
        raise ValueError(
            f"the teacher {teacher_source} has p={module.patch_size}, expected {patch_size}"
        )
    inputs.check_image_size(image_size, module)

    mesh, shard_members = shd.training_mesh(config, config.num_students)
    batch_size = config.batch_size
    crop_size = int(config.get("crop_size", 0) or 0)
    if crop_size:
        check_crop_size(crop_size, image_size, module)
        steps_per_epoch = crop_steps_per_epoch(len(train_images), image_size, crop_size, batch_size)
    else:
        if batch_size > len(train_images):
            raise ValueError(f"batch_size={batch_size} > {len(train_images)} training images")
        steps_per_epoch = num_batches(len(train_images), batch_size)
    epochs = scale_epochs(config, module.patch_size)
    total_steps = epochs * steps_per_epoch

    compute_dtype = jnp.dtype(config.get("compute_dtype", "float32"))
    # Cloning only when needed keeps the student equal (and hash-equal) to the teacher module,
    # so the cached jitted functions are shared with other callers.
    if jnp.dtype(module.dtype) != compute_dtype:
        student = module.clone(dtype=compute_dtype)
    else:
        student = module
    tx = make_optimizer(
        config.learning_rate,
        config.weight_decay,
        config.get("lr_schedule", "constant"),
        int(config.get("warmup_steps", 0)),
        total_steps,
    )
    members = shd.member_sharding(mesh, shard_members)
    students = init_students(
        student, tx, jax.random.fold_in(key, 0), config.num_students, channels, members
    )
    zeros = np.zeros(module.out_dim, np.float32)
    state = {
        "students": students,
        "teacher": shd.put_replicated(teacher_vars, mesh),
        "target_stats": shd.put_replicated({"mean": zeros, "std": zeros + 1}, mesh),
    }
    checkpointer = Checkpointer(
        workdir / CHECKPOINT_SUBDIR, max_to_keep=config.get("keep_checkpoints", 2)
    )
    writer = MetricWriter(workdir) if jax.process_index() == 0 else None
    fingerprint = inputs.data_fingerprint(images)
    try:
        latest = checkpointer.latest_intact()  # metadata only: checked before arrays are read
        if latest is not None:
            _check_compatible(latest[1], module, config, image_size, channels, workdir, fingerprint)
        restored = checkpointer.restore_latest(state) if latest is not None else None
        if restored is not None:
            start_step, state, meta = restored  # same settings: _check_compatible
            logger.info("resuming %s at step %d of %d", workdir, start_step, total_steps)
        else:
            start_step, meta = 0, {}
            stats = descriptor_stats(
                _describe_fn(module, config.padding),
                state["teacher"],
                train_images,
                batch_size=config.stats_batch_size,
                put=functools.partial(shd.shard_batch, mesh=mesh),
            )
            inputs.check_target_stats(stats, teacher_source)
            state["target_stats"] = shd.put_replicated(stats.as_arrays(), mesh)
            if writer:
                writer.write(0, target_mean_avg=stats.mean.mean(), target_std_avg=stats.std.mean())

        base_meta = {
            "format": FORMAT,
            "patch_size": module.patch_size,
            "out_dim": module.out_dim,
            "layers": layers_to_json(module.layers),
            "channels": int(channels),
            "image_size": list(image_size),
            "num_students": int(config.num_students),
            "padding": config.padding,
            "teacher_source": meta.get("teacher_source", teacher_source),
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
            "data_fingerprint": fingerprint,
            "config": json.loads(config.to_json_best_effort()),
        }
        if meta.get("score_normalization") and start_step == total_steps:
            normalization = ScoreNormalization(**meta["score_normalization"])
            return _scale_model(module, state, normalization, image_size, channels, config)

        if start_step < total_steps:
            state = _train_loop(
                config,
                state,
                module,
                student,
                tx,
                train_images,
                mesh,
                shard_members,
                start_step,
                steps_per_epoch,
                total_steps,
                checkpointer,
                writer,
                base_meta,
                on_step,
                on_step_every,
            )
        # Score normalisation (paper §5): statistics of e and v on held-out good images.
        norm_images = val_images if len(val_images) else train_images
        if not len(val_images):
            logger.warning("no validation images: normalising scores on the training images")
        normalization = compute_normalization(
            module,
            module,
            _score_params(state),
            norm_images,
            batch_size=config.eval_batch_size,
            padding=config.padding,
            put=functools.partial(shd.shard_batch, mesh=mesh),
            member_strategy=config.get("member_strategy", "auto"),
        )
        check_normalization(normalization, module.out_dim, f"the students in {workdir}")
        checkpointer.save(
            total_steps,
            state,
            dict(
                base_meta,
                step=total_steps,
                score_normalization=normalization.as_dict(),
                normalization_images=len(norm_images),
                normalization_source="validation" if len(val_images) else "train",
            ),
        )
        if writer:
            writer.write(total_steps, **{f"val_{k}": v for k, v in normalization.as_dict().items()})
        return _scale_model(module, state, normalization, image_size, channels, config)
    finally:
        checkpointer.close()
        if writer:
            writer.close()


def _train_loop(
    config,
    state,
    module,
    student,
    tx,
    train_images,
    mesh,
    shard_members,
    start_step,
    steps_per_epoch,
    total_steps,
    checkpointer,
    writer,
    base_meta,
    on_step=None,
    on_step_every=0,
):
    """Run steps ``start_step … total_steps − 1``; returns the final state."""
    from ustad.data.pipeline import iterate_batches

    cache_mode, data, teacher_params = training_targets(
        config, module, state, train_images, put=functools.partial(shd.shard_batch, mesh=mesh)
    )
    crop_size = int(config.get("crop_size", 0) or 0)
    crops = (
        CropBatches(data, module, config.padding, crop_size, config.batch_size, config.seed)
        if crop_size
        else None
    )
    step_fn = make_train_step(
        student,
        tx,
        teacher=None if cache_mode != "none" else module,
        # Crops carry their receptive-field margin: their descriptors are the full image's.
        padding=PREPADDED if crops else config.padding,
        mesh=mesh,
        shard_members=shard_members,
        member_strategy=config.get("member_strategy", "auto"),
    )
    if writer:
        writer.write(start_step, target_cache=cache_mode, steps_per_epoch=steps_per_epoch)
    every = config.checkpoint_every_steps or steps_per_epoch
    batch_size = config.batch_size
    bar = (
        progress(
            total_steps * batch_size,
            initial=start_step * batch_size,
            desc=f"students p{module.patch_size}",
            unit="img",
        )
        if writer
        else None
    )
    pending, step = None, start_step
    last_time, last_step = time.perf_counter(), step
    students = state["students"]
    try:
        for epoch in range(start_step // steps_per_epoch, total_steps // steps_per_epoch):
            if crops:
                stop = min((epoch + 1) * steps_per_epoch, total_steps)
                batches = (
                    {k: shd.shard_batch(v, mesh) for k, v in b.items()}
                    for b in crops.iterate(step, stop)
                )
            else:
                batches = iterate_batches(
                    data,
                    batch_size,
                    seed=config.seed,
                    epoch=epoch,
                    sharding=shd.batch_sharding(mesh),
                    start_batch=step - epoch * steps_per_epoch,
                )
            for batch in batches:
                third = batch["target"] if cache_mode != "none" else teacher_params
                students, losses = step_fn(students, batch["image"], third)
                # Check the previous step's losses only now, so the host never stalls the
                # device pipeline waiting for the step it just dispatched.
                if pending is not None:
                    _check_values(shd.to_host(pending[1]), pending[0])
                pending = (step, losses)
                step += 1
                if bar:
                    bar.update(batch_size)
                if step % config.log_every_steps == 0:
                    now = time.perf_counter()
                    values = shd.to_host(losses)  # every process: this may be a collective
                    _check_values(values, step - 1)
                    inputs.check_loss_magnitude(values, step - 1, module.out_dim)
                    if writer:
                        writer.write(
                            step,
                            epoch=epoch,
                            loss=float(np.mean(values)),
                            **{f"loss_{i}": float(v) for i, v in enumerate(values)},
                            img_per_s=(step - last_step) * batch_size / (now - last_time),
                        )
                    last_time, last_step = now, step
                if on_step and on_step_every and step % on_step_every == 0 and step < total_steps:
                    on_step(step, dict(state, students=students))
                if step % every == 0 and step < total_steps:
                    state = dict(state, students=students)
                    checkpointer.save(step, state, dict(base_meta, step=step, epoch=epoch))
        if pending is not None:
            _check_values(shd.to_host(pending[1]), pending[0])
    finally:
        if bar:
            bar.close()
    return dict(state, students=students)


def scale_epochs(config: ml_collections.ConfigDict, patch_size: int) -> int:
    """The epochs of the scale ``patch_size``: ``config.scale_epochs["p<p>"]`` when the config
    sets it (a multi-scale run may give its cheap scales more epochs), else ``config.epochs``."""
    by_scale = config.get("scale_epochs") or {}
    value = by_scale.get(f"p{patch_size}", config.epochs)
    if int(value) != value or value < 1:
        raise ValueError(f"epochs for p={patch_size} must be a positive integer, got {value!r}")
    return int(value)


def _check_values(losses: np.ndarray, step: int) -> None:
    for i, value in enumerate(np.asarray(losses).reshape(-1)):
        check_finite(f"the loss of student {i}", float(value), step)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike):
    """Train the students of every scale in ``config.patch_sizes`` on an MVTec-layout category.

    Loads ``config.data_dir/config.category/train/good`` only (``test/`` and ``ground_truth/``
    are for evaluation and need not exist), resized to ``config.image_size`` (an int or
    ``(H, W)``; with ``config.keep_aspect``, the short side to ``config.image_size`` and both
    sides rounded to the pooling stride), holds out ``config.val_fraction`` of it for the score
    normalisation, and trains each scale into ``workdir`` (one scale) or ``workdir/p<p>``
    (several). Interrupted runs resume.

    Returns:
      The trained :class:`~ustad.scoring.ScaleModel` of each scale.
    """
    from ustad.data.mvtec import load_mvtec_train

    images, _ = load_mvtec_train(
        config.data_dir,
        config.category,
        image_size=config.image_size,
        grayscale=config.get("grayscale", False),
        keep_aspect=config.get("keep_aspect", False),
        multiple=inputs.size_multiple(config.patch_sizes),
    )
    scales = []
    for p in config.patch_sizes:
        scale_dir = Path(workdir) if len(config.patch_sizes) == 1 else Path(workdir) / f"p{p}"
        scales.append(train_students(config, scale_dir, images, patch_size=p))
    return scales
