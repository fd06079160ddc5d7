"""Training STFPM students (Wang et al., BMVC 2021) on anomaly-free images.

A frozen ImageNet teacher (:mod:`ustad.stfpm_nets`: EfficientNet-Lite0 offline, ResNet-18 as
the paper) and M randomly initialised students of the same architecture (M = 1 is the paper;
M > 1 adds Uninformed Students' error + variance score, :mod:`ustad.stfpm`), trained with SGD
(lr 0.4, momentum 0.9, weight decay 1e-4, batch 32, 100 epochs by default: the authors' code)
to match the teacher's L2-normalised pyramid. Validation (``config.val_fraction`` of
``train/good``, 20 % as the authors' code) gives each student's loss after every epoch; with
``config.select = "best_val"`` each student keeps its epoch of lowest validation loss (the
authors keep the epoch of the lowest mean validation anomaly map), and the per-level
statistics of e and v on it normalise the ensemble score.

Workdir layout::

    <workdir>/checkpoints/<step>/   students (params, BatchNorm statistics, SGD momentum), the
                                    best epoch's students, a teacher copy (arrays) + config,
                                    network, score settings and normalisation (JSON metadata)
    <workdir>/metrics.jsonl          losses, throughput, validation losses

The metadata say ``"family": "stfpm"``: :func:`ustad.scoring.load_scale` and
:meth:`ustad.scoring.Detector.load` dispatch on it (:mod:`ustad.stfpm_scoring`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ustad import sharding as shd
from ustad import stfpm
from ustad.checkpointing import Checkpointer
from ustad.metric_writer import MetricWriter, check_finite, progress
from ustad.score_maps import resolve_member_strategy
from ustad.stfpm_nets import pyramid_net, pyramid_spec
from ustad.stfpm_scoring import CHECKPOINT_SUBDIR, STFPMModel
from ustad.train.stfpm_checkpoints import (
    RESUME_SETTINGS,
    check_compatible,
    model_from_state,
    teacher_from_config,
)
from ustad.train.stfpm_steps import (
    init_students,
    keep_best_fn,
    make_optimizer,
    make_train_step,
    score_normalization,
    teacher_cache,
    validation_loss_fn,
    validation_losses,
)

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
        The trained :class:`~ustad.stfpm_scoring.STFPMModel`.
    """
    from ustad.data.pipeline import num_batches
    from ustad.data.split import split_validation
    from ustad.scoring import convert_channels
    from ustad.train.student_inputs import check_images, data_fingerprint

    workdir = Path(workdir)
    images = convert_channels(check_images(images), 3)
    fingerprint = data_fingerprint(images)
    key = jax.random.key(config.seed, impl=config.get("prng_impl", "threefry2x32"))
    if val_images is None:
        train_idx, val_idx = split_validation(len(images), config.val_fraction, config.seed)
        train_images, val_images = images[train_idx], images[val_idx]
    else:
        train_images, val_images = images, convert_channels(check_images(val_images), 3)
    image_size = tuple(int(s) for s in images.shape[1:3])
    stfpm.check_score(config.score, config.combination)
    if config.select not in ("best_val", "last"):
        raise ValueError(f"--config.select={config.select!r}: 'best_val' or 'last'")
    network = pyramid_net(
        config.backbone, tiny=config.get("tiny", False), levels=config.get("levels", None)
    )
    teacher, teacher_source = teacher_from_config(config, network, jax.random.fold_in(key, 2))

    mesh, shard_members = shd.training_mesh(config, config.num_students)
    batch_size = config.batch_size
    if batch_size > len(train_images):
        raise ValueError(f"batch_size={batch_size} > {len(train_images)} training images")
    steps_per_epoch = num_batches(len(train_images), batch_size)
    total_steps = config.epochs * steps_per_epoch
    strategy = resolve_member_strategy(config.member_strategy, sharded=shard_members)
    put = functools.partial(shd.shard_batch, mesh=mesh)

    tx = make_optimizer(config.learning_rate, config.momentum, config.weight_decay)
    members = shd.member_sharding(mesh, shard_members)
    students = init_students(network, tx, jax.random.fold_in(key, 0), config.num_students, members)
    state = {"students": students, "teacher": shd.put_replicated(teacher, mesh)}
    select_best = config.select == "best_val" and len(val_images) > 0
    if select_best:
        m = config.num_students
        state["best"] = {
            # Copies: the step donates the students' buffers.
            "params": jax.tree.map(jnp.copy, students["params"]),
            "batch_stats": jax.tree.map(jnp.copy, students["batch_stats"]),
            "val_loss": shd.put_replicated(np.full(m, np.inf, np.float32), mesh),
            "epoch": shd.put_replicated(np.full(m, -1, np.int32), mesh),
        }
    base_meta = {
        "format": stfpm.FORMAT,
        "family": stfpm.FAMILY,
        "network": pyramid_spec(network),
        "levels": list(network.level_names),
        "image_size": list(image_size),
        "channels": 3,
        "num_students": int(config.num_students),
        "score": config.score,
        "combination": config.combination,
        "teacher_source": teacher_source,
        "train_images": len(train_images),
        "val_images": len(val_images),
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "data_fingerprint": fingerprint,
        "config": json.loads(config.to_json_best_effort()),
    }
    checkpointer = Checkpointer(
        workdir / CHECKPOINT_SUBDIR, max_to_keep=config.get("keep_checkpoints", 2)
    )
    writer = MetricWriter(workdir) if jax.process_index() == 0 else None
    try:
        latest = checkpointer.latest_intact()  # metadata only: checked before arrays are read
        start_step, meta = 0, {}
        if latest is not None:
            check_compatible(latest[1], config, image_size, workdir, fingerprint)
            start_step, state, meta = checkpointer.restore_latest(state)
            logger.info("resuming %s at step %d of %d", workdir, start_step, total_steps)
        if "score_normalization" in meta and start_step == total_steps:
            return model_from_state(network, state, image_size, config, meta["score_normalization"])
        t0 = time.perf_counter() - float(meta.get("train_seconds", 0.0))
        cache = None
        if config.get("teacher_cache", "auto") != "none":
            cache = teacher_cache(
                network,
                state["teacher"],
                train_images,
                batch_size=config.eval_batch_size,
                max_bytes=config.get("teacher_cache_max_gb", 4.0) * 1e9,
                put=put,
            )
        step_fn = make_train_step(
            network,
            tx,
            level_weights=config.get("level_weights", None),
            cached_targets=cache is not None,
            mesh=mesh,
            shard_members=shard_members,
            member_strategy=strategy,
        )
        if writer:
            writer.write(
                start_step,
                teacher_cache=cache is not None,
                steps_per_epoch=steps_per_epoch,
                train_images=len(train_images),
            )
        loop = dict(mesh=mesh, put=put, strategy=strategy, select_best=select_best, t0=t0)
        state = _train_loop(
            config,
            network,
            state,
            step_fn,
            train_images,
            val_images,
            cache,
            start_step,
            steps_per_epoch,
            checkpointer,
            writer,
            base_meta,
            **loop,
        )
        final = state["students"]
        if select_best:
            best = state["best"]
            final = dict(final, params=best["params"], batch_stats=best["batch_stats"])
        params = {
            "teacher": state["teacher"],
            "students": {"params": final["params"], "batch_stats": final["batch_stats"]},
        }
        norm_images = val_images if len(val_images) else train_images
        normalization = score_normalization(
            network,
            params,
            norm_images,
            image_size,
            batch_size=config.eval_batch_size,
            put=put,
            strategy=strategy,
        )
        if not np.isfinite(normalization).all():
            raise FloatingPointError(
                f"the STFPM students in {workdir}: non-finite score statistics {normalization}; "
                f"lower --config.learning_rate and use a new workdir"
            )
        state = dict(state, students=final)
        elapsed = time.perf_counter() - t0
        selected = shd.to_host(state["best"]["epoch"]).tolist() if select_best else None
        checkpointer.save(
            total_steps,
            state,
            dict(
                base_meta,
                step=total_steps,
                train_seconds=elapsed,
                selected_epochs=selected or [config.epochs - 1] * config.num_students,
                score_normalization=normalization.tolist(),
                normalization_images=len(norm_images),
                normalization_source="validation" if len(val_images) else "train",
            ),
        )
        if writer:
            writer.write(total_steps, train_seconds=elapsed, selected_epochs=str(selected))
        return model_from_state(network, state, image_size, config, normalization)
    finally:
        checkpointer.close()
        if writer:
            writer.close()


def _train_loop(
    config,
    network,
    state,
    step_fn,
    train_images,
    val_images,
    cache,
    start_step,
    steps_per_epoch,
    checkpointer,
    writer,
    base_meta,
    *,
    mesh,
    put,
    strategy,
    select_best,
    t0,
):
    """Epochs ``start_step // steps_per_epoch … config.epochs − 1``: steps, validation after
    each epoch (and the best students kept), a checkpoint at each epoch's end; returns the
    final state."""
    from ustad.data.pipeline import iterate_batches

    batch_size, total_steps = config.batch_size, config.epochs * steps_per_epoch
    data = {"image": train_images} if cache is None else {"image": train_images, "t": cache}
    weights = config.get("level_weights", None)
    val_fn = validation_loss_fn(network, None if weights is None else tuple(weights), strategy)
    keep_best = keep_best_fn()
    students, step = state["students"], start_step
    bar = progress(total_steps * batch_size, initial=step * batch_size, desc="STFPM", unit="img")
    last_time, last_step = time.perf_counter(), step
    try:
        for epoch in range(start_step // steps_per_epoch, config.epochs):
            batches = iterate_batches(
                data,
                batch_size,
                seed=config.seed,
                epoch=epoch,
                sharding=shd.batch_sharding(mesh),
                start_batch=step - epoch * steps_per_epoch,
            )
            for batch in batches:
                third = state["teacher"] if cache is None else batch["t"]
                students, losses = step_fn(students, batch["image"], third)
                step += 1
                bar.update(batch_size)
                if step % config.log_every_steps and step % steps_per_epoch:
                    continue
                values = np.asarray(shd.to_host(losses), np.float64)
                for i, value in enumerate(values):
                    check_finite(f"the loss of student {i}", float(value), step - 1)
                now = time.perf_counter()
                if writer:
                    writer.write(
                        step,
                        epoch=epoch,
                        loss=float(values.mean()),
                        **{f"loss_{i}": float(v) for i, v in enumerate(values)},
                        img_per_s=(step - last_step) * batch_size / max(now - last_time, 1e-9),
                    )
                last_time, last_step = now, step
            state = dict(state, students=students)
            last_epoch = epoch + 1 == config.epochs
            if len(val_images) and ((epoch + 1) % config.eval_every_epochs == 0 or last_epoch):
                val = validation_losses(
                    val_fn,
                    state["teacher"],
                    students,
                    val_images,
                    batch_size=config.eval_batch_size,
                    put=put,
                )
                if select_best:
                    val_loss = jnp.asarray(val, jnp.float32)
                    state["best"] = keep_best(state["best"], students, val_loss, epoch)
                if writer:
                    writer.write(
                        step,
                        epoch=epoch,
                        val_loss=float(val.mean()),
                        **{f"val_loss_{i}": float(v) for i, v in enumerate(val)},
                    )
            every = config.get("checkpoint_every_epochs", 1)
            if step < total_steps and every and (epoch + 1) % every == 0:
                meta = dict(
                    base_meta, step=step, epoch=epoch, train_seconds=time.perf_counter() - t0
                )
                checkpointer.save(step, state, meta)
    finally:
        bar.close()
    return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike):
    """Train STFPM on ``config.data_dir/config.category/train/good`` (MVTec layout; ``test/``
    and ``ground_truth/`` are not read), resized to ``config.image_size``.

    Returns:
        The trained :class:`~ustad.stfpm_scoring.STFPMModel`.
    """
    from ustad.data.mvtec import load_mvtec_train

    images, _ = load_mvtec_train(config.data_dir, config.category, image_size=config.image_size)
    return train_stfpm(config, workdir, images)
