"""Training the M students of one receptive field (paper §4).

Each student has the teacher's architecture, starts from its own random initialisation and
regresses the teacher's normalised dense descriptors::

    L(S_i) = mean_{n, r, c} || μ^{S_i}_n(r, c) − (y^T_n(r, c) − μ) / σ ||²

A single student's step (:func:`student_step`) knows nothing of the ensemble; the M students are
one stacked pytree (leading axis M) updated inside one jitted function by lifting that step over
the member axis, each with its own Adam state: ``jax.vmap``, or one member after another
inside the same program, which measured faster on CPU (``member_strategy``). The teacher is
frozen: it is not in the optimizer and its descriptors pass through
``stop_gradient``.

Teacher descriptors do not change during training, so by default they are computed once per
image and cached on the host (see :func:`choose_target_cache`); when they do not fit, the
teacher runs inside the train step instead.

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
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ustad import sharding as shd
from ustad.checkpointing import Checkpointer
from ustad.dense import dense_apply
from ustad.ensemble import init_ensemble
from ustad.metric_writer import MetricWriter, check_finite, progress
from ustad.models.patch_net import PatchNet, layers_to_json, patch_net
from ustad.scoring import (
    CHECKPOINT_SUBDIR,
    FORMAT,
    ScaleModel,
    ScoreNormalization,
    compute_normalization,
    map_members,
    resolve_member_strategy,
    teacher_targets,
)
from ustad.stats import descriptor_stats

PyTree = Any
logger = logging.getLogger(__name__)
CACHE_MODES = ("auto", "float32", "float16", "bfloat16", "none")
_CACHE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": jnp.bfloat16}


# ---------------------------------------------------------------------------------------------
# Pure pieces: optimizer, loss, one student's step, the ensemble step.


@functools.lru_cache(maxsize=16)
def make_optimizer(learning_rate: float = 1e-4, weight_decay: float = 1e-5):
    """Adam with L2 weight decay, as PyTorch's ``Adam(lr, weight_decay=wd)``.

    Cached: equal arguments return the same (hashable) object, so the jitted steps built from
    it are compiled once per process.

    PyTorch adds ``wd · θ`` to the gradient *before* the moment estimates (L2 regularisation,
    rescaled by Adam like the rest of the gradient), unlike AdamW's decoupled decay; the paper's
    "Adam, weight decay 1e-5" is read this way. Eps 1e-8 and β = (0.9, 0.999) match PyTorch.
    """
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))


def student_loss(
    student: PatchNet, params: PyTree, images: jax.Array, targets: jax.Array, padding="reflect"
) -> jax.Array:
    """One student's loss: mean over images and pixels of the squared L2 error.

    Args:
      student: the student network.
      params: its variables.
      images: ``[B, H, W, C]``.
      targets: ``[B, H, W, D]`` normalised teacher descriptors (float32).

    Returns:
      Scalar float32.
    """
    predictions = dense_apply(student, params, images, padding=padding).astype(jnp.float32)
    return jnp.mean(jnp.sum(jnp.square(predictions - targets), axis=-1))


def student_step(student, tx, params, opt_state, images, targets, padding="reflect"):
    """One Adam step of one student (ensemble-unaware).

    Returns:
      ``(params, opt_state, loss)``; ``loss`` is the loss before the update.
    """
    loss, grads = jax.value_and_grad(student_loss, argnums=1)(
        student, params, images, targets, padding
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def init_students(
    student: PatchNet,
    tx,
    key: jax.Array,
    num_students: int,
    channels: int,
    sharding: jax.sharding.Sharding | None = None,
):
    """M independently initialised students and their optimizer states.

    Args:
      student: the network.
      tx: the optimizer.
      key: typed PRNG key; student i uses ``jax.random.split(key, M)[i]``.
      num_students: M.
      channels: C of the images.
      sharding: where the stacked result lives (e.g. split over ``"ensemble"``); ``None`` for
        the default device.

    Returns:
      ``{"params": [M, ...], "opt_state": [M, ...]}``.
    """
    return _init_fn(student, tx, num_students, channels, sharding)(key)


@functools.lru_cache(maxsize=16)
def _init_fn(student, tx, num_students, channels, sharding):
    sample = jnp.zeros((1, student.patch_size, student.patch_size, channels), jnp.float32)

    # One compiled program: op by op, Flax's initialisers cost seconds of dispatch.
    def init(key):
        params = init_ensemble(student, key, num_students, sample)
        return {"params": params, "opt_state": jax.vmap(tx.init)(params)}

    return jax.jit(init, out_shardings=sharding)


def make_train_step(
    student: PatchNet,
    tx,
    *,
    teacher: PatchNet | None = None,
    padding: str = "reflect",
    mesh: jax.sharding.Mesh | None = None,
    shard_members: bool = False,
    member_strategy: str = "auto",
):
    """The jitted step that updates all M students at once.

    Cached: equal arguments return the same jitted function (compiled once per process).

    Args:
      student: the student network (its ``dtype`` is the compute dtype).
      tx: the optimizer (:func:`make_optimizer`).
      teacher: ``None`` when the caller passes cached targets; else the teacher network, run
        inside the step on every batch.
      padding: dense-extraction padding.
      mesh: a ``("data", "ensemble")`` mesh: images/targets split over ``"data"``, students
        split over ``"ensemble"`` when ``shard_members``, the teacher replicated. ``None``:
        plain ``jax.jit`` on the default device.
      shard_members: split the stacked students over the ``"ensemble"`` axis.
      member_strategy: ``"vmap"`` (the members batched into one computation), ``"sequential"``
        (one after another inside the same program) or ``"auto"`` (sequential on CPU unless
        the members are sharded, else vmap); see :func:`ustad.scoring.resolve_member_strategy`.

    Returns:
      ``step(state, images, targets_or_teacher) -> (state, losses)`` with ``state`` as from
      :func:`init_students` (donated), ``images`` ``[B, H, W, C]``, the third argument either
      ``[B, H, W, D]`` cached targets (any float dtype) or
      ``{"variables": teacher vars, "mean": [D], "std": [D]}``, and ``losses`` ``[M]``.
    """
    strategy = resolve_member_strategy(member_strategy, sharded=shard_members)
    return _train_step_fn(student, tx, teacher, padding, mesh, shard_members, strategy)


@functools.lru_cache(maxsize=16)
def _train_step_fn(student, tx, teacher, padding, mesh, shard_members, strategy):
    def one_student(member, images, targets):
        params, opt_state = member
        return student_step(student, tx, params, opt_state, images, targets, padding)

    def members_step(params, opt_state, images, targets):
        return map_members(one_student, (params, opt_state), images, targets, strategy=strategy)

    def step(state, images, targets_or_teacher):
        if teacher is None:
            targets = targets_or_teacher.astype(jnp.float32)
        else:
            t = targets_or_teacher
            targets = teacher_targets(
                teacher, t["variables"], t["mean"], t["std"], images, padding=padding
            )
        params, opt_state, losses = members_step(
            state["params"], state["opt_state"], images, targets
        )
        return {"params": params, "opt_state": opt_state}, losses

    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    members = shd.member_sharding(mesh, shard_members)
    third = shd.batch_sharding(mesh) if teacher is None else shd.replicated(mesh)
    return jax.jit(
        step,
        in_shardings=(members, shd.batch_sharding(mesh), third),
        # The M losses are replicated so that every process can read them without a gather.
        out_shardings=(members, shd.replicated(mesh)),
        donate_argnums=0,
    )


# ---------------------------------------------------------------------------------------------
# Target cache.


def available_memory_bytes() -> int:
    """Memory the OS can still give this process (``MemAvailable``), or total RAM."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_target_cache(
    mode: str, num_images: int, image_size: tuple[int, int], dim: int, budget_bytes: float
) -> str:
    """How to hold the normalised teacher targets during training.

    Args:
      mode: ``"float32"``, ``"float16"``, ``"bfloat16"``, ``"none"`` (teacher in every step) or
        ``"auto"``: float32 if ``N·H·W·D·4`` bytes fit in the budget, else float16 if half of
        that fits, else none. float16 before bfloat16: the targets are standardised (|t| of order
        1–10), where float16's 10 mantissa bits (rel. error 5e-4) beat bfloat16's 7 (4e-3).
      num_images: N training images.
      image_size: ``(H, W)``.
      dim: descriptor dimension D.
      budget_bytes: host memory the cache may take.

    Returns:
      One of ``"float32"``, ``"float16"``, ``"bfloat16"``, ``"none"``.
    """
    if mode not in CACHE_MODES:
        raise ValueError(f"target_cache must be one of {CACHE_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    full = num_images * image_size[0] * image_size[1] * dim * 4
    if full <= budget_bytes:
        return "float32"
    if full / 2 <= budget_bytes:
        return "float16"
    return "none"


def build_target_cache(
    teacher: PatchNet,
    teacher_params: PyTree,
    images: np.ndarray,
    *,
    dtype,
    batch_size: int,
    padding: str = "reflect",
    put=None,
) -> np.ndarray:
    """Normalised teacher descriptors of every image, on the host.

    Args:
      teacher: the teacher network.
      teacher_params: ``{"variables": ..., "mean": [D], "std": [D]}``.
      images: ``[N, H, W, C]``.
      dtype: storage dtype (float32, float16 or bfloat16).
      batch_size: images per teacher call.
      padding: dense-extraction padding.
      put: places a host batch on the devices.

    Returns:
      ``[N, H, W, D]`` of ``dtype``.
    """
    put = put or jnp.asarray
    fn = _targets_fn(teacher, padding, np.dtype(dtype))
    cache = np.empty((*images.shape[:3], teacher.out_dim), dtype)
    for start in range(0, len(images), batch_size):
        chunk = fn(teacher_params, put(images[start : start + batch_size]))
        cache[start : start + len(chunk)] = shd.to_host(chunk)
    return cache


@functools.lru_cache(maxsize=16)
def _targets_fn(teacher, padding, dtype):
    def targets(t, images):
        normalized = teacher_targets(
            teacher, t["variables"], t["mean"], t["std"], images, padding=padding
        )
        return normalized.astype(dtype)

    return jax.jit(targets)


@functools.lru_cache(maxsize=16)
def _describe_fn(module, padding):
    """A stable function object, so :func:`descriptor_stats` reuses its compilation."""
    return lambda variables, images: dense_apply(module, variables, images, padding=padding)


# ---------------------------------------------------------------------------------------------
# The trainer.


def _teacher_from_config(config, patch_size: int, channels: int, key: jax.Array):
    source = config.teacher_workdir
    if source == "random":
        # Smoke runs only: an untrained teacher still gives a well-posed regression problem.
        module = patch_net(patch_size, widths=config.get("teacher_widths"), out_dim=config.out_dim)
        sample = jnp.zeros((1, patch_size, patch_size, channels))
        return module, jax.jit(module.init)(key, sample), "random"
    from ustad.train.teacher import load_teacher

    path = source.format(p=patch_size)
    module, variables, _ = load_teacher(path)
    return module, variables, os.path.abspath(path)


def _put(mesh):
    return lambda x: shd.shard_batch(x, mesh)


def train_students(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    images: np.ndarray,
    *,
    patch_size: int | None = None,
    teacher: tuple[PatchNet, PyTree] | None = None,
    val_images: np.ndarray | None = None,
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

    Returns:
      The trained scale, ready for :class:`ustad.scoring.Detector`.
    """
    # Imported here: ustad.data pulls in TensorFlow Datasets, which the pure steps above (and
    # the processes that only run them) do without.
    from ustad.data.pipeline import num_batches
    from ustad.data.split import split_validation

    workdir = Path(workdir)
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
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
        raise ValueError(f"the teacher has p={module.patch_size}, expected {patch_size}")

    num_devices = config.get("num_devices", 0) or jax.device_count()
    mesh = shd.make_mesh(config.ensemble_axis_size, jax.devices()[:num_devices])
    shard_members = config.ensemble_axis_size > 1
    shd.check_members(mesh, config.num_students, shard_members)
    batch_size = config.batch_size
    if batch_size % shd.data_size(mesh):
        raise ValueError(
            f"batch_size={batch_size} does not split over {shd.data_size(mesh)} data-parallel "
            f"devices; use a multiple, set ensemble_axis_size (students across devices) or "
            f"num_devices"
        )
    if batch_size > len(train_images):
        raise ValueError(f"batch_size={batch_size} > {len(train_images)} training images")
    steps_per_epoch = num_batches(len(train_images), batch_size)
    total_steps = config.epochs * steps_per_epoch

    compute_dtype = jnp.dtype(config.get("compute_dtype", "float32"))
    # Cloning only when needed keeps the student equal (and hash-equal) to the teacher module,
    # so the cached jitted functions are shared with other callers.
    if jnp.dtype(module.dtype) != compute_dtype:
        student = module.clone(dtype=compute_dtype)
    else:
        student = module
    tx = make_optimizer(config.learning_rate, config.weight_decay)
    members = shd.member_sharding(mesh, shard_members)
    students = init_students(
        student, tx, jax.random.fold_in(key, 0), config.num_students, channels, members
    )
    dim = module.out_dim
    state = {
        "students": students,
        "teacher": shd.put_replicated(teacher_vars, mesh),
        "target_stats": shd.put_replicated(
            {"mean": np.zeros(dim, np.float32), "std": np.ones(dim, np.float32)}, mesh
        ),
    }
    is_main = jax.process_index() == 0
    checkpointer = Checkpointer(
        workdir / CHECKPOINT_SUBDIR, max_to_keep=config.get("keep_checkpoints", 2)
    )
    writer = MetricWriter(workdir) if is_main else None
    try:
        restored = checkpointer.restore_latest(state)
        if restored is not None:
            start_step, state, meta = restored
            _check_compatible(meta, module, config, image_size, channels, workdir)
            if start_step > total_steps:
                raise ValueError(
                    f"{workdir} holds a run at step {start_step}, beyond this config's "
                    f"{total_steps} steps ({config.epochs} epochs); use a new workdir"
                )
            logger.info("resuming %s at step %d of %d", workdir, start_step, total_steps)
        else:
            start_step, meta = 0, {}
            stats = descriptor_stats(
                _describe_fn(module, config.padding),
                state["teacher"],
                train_images,
                batch_size=config.stats_batch_size,
                put=_put(mesh),
            )
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
            put=_put(mesh),
            member_strategy=config.get("member_strategy", "auto"),
        )
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
):
    """Run steps ``start_step … total_steps − 1``; returns the final state."""
    from ustad.data.pipeline import iterate_batches

    cache_mode = choose_target_cache(
        config.target_cache,
        len(train_images),
        tuple(train_images.shape[1:3]),
        module.out_dim,
        config.target_cache_max_gb * 2**30
        if config.target_cache_max_gb
        else 0.5 * available_memory_bytes(),
    )
    teacher_params = {
        "variables": state["teacher"],
        "mean": state["target_stats"]["mean"],
        "std": state["target_stats"]["std"],
    }
    data = {"image": train_images}
    if cache_mode != "none":
        data["target"] = build_target_cache(
            module,
            teacher_params,
            train_images,
            dtype=_CACHE_DTYPES[cache_mode],
            batch_size=config.stats_batch_size,
            padding=config.padding,
            put=_put(mesh),
        )
    step_fn = make_train_step(
        student,
        tx,
        teacher=None if cache_mode != "none" else module,
        padding=config.padding,
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
                    if writer:
                        writer.write(
                            step,
                            epoch=epoch,
                            loss=float(np.mean(values)),
                            **{f"loss_{i}": float(v) for i, v in enumerate(values)},
                            img_per_s=(step - last_step) * batch_size / (now - last_time),
                        )
                    last_time, last_step = now, step
                if step % every == 0 and step < total_steps:
                    state = dict(state, students=students)
                    checkpointer.save(step, state, dict(base_meta, step=step, epoch=epoch))
        if pending is not None:
            _check_values(shd.to_host(pending[1]), pending[0])
    finally:
        if bar:
            bar.close()
    return dict(state, students=students)


def _check_values(losses: np.ndarray, step: int) -> None:
    for i, value in enumerate(np.asarray(losses).reshape(-1)):
        check_finite(f"the loss of student {i}", float(value), step)


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike):
    """Train the students of every scale in ``config.patch_sizes`` on an MVTec-layout category.

    Loads ``config.data_dir/config.category`` (train/good, resized to ``config.image_size``),
    holds out ``config.val_fraction`` of it for the score normalisation, and trains each scale
    into ``workdir`` (one scale) or ``workdir/p<p>`` (several). Interrupted runs resume.

    Returns:
      The trained :class:`~ustad.scoring.ScaleModel` of each scale.
    """
    from ustad.data.mvtec import load_mvtec_category

    data = load_mvtec_category(
        config.data_dir,
        config.category,
        image_size=config.image_size,
        grayscale=config.get("grayscale", False),
    )
    scales = []
    for p in config.patch_sizes:
        scale_dir = Path(workdir) if len(config.patch_sizes) == 1 else Path(workdir) / f"p{p}"
        scales.append(train_students(config, scale_dir, data.train_images, patch_size=p))
    return scales
