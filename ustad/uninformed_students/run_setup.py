"""What one scale's students run is, fixed before its first step: the teacher, the mesh, the
student network, optimizer and schedule (:class:`ScaleRun`), the initial state, the teacher's
target statistics and the checkpoints' metadata (used by :mod:`ustad.uninformed_students.train`)."""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ustad import sharding as shd
from ustad.selection import initial_best
from ustad.stats import descriptor_stats
from ustad.tiling import random_crops
from ustad.uninformed_students import inputs
from ustad.uninformed_students.checkpoints import FORMAT
from ustad.uninformed_students.crops import check_crop_size, crop_steps_per_epoch
from ustad.uninformed_students.nets import PatchNet, layers_to_json
from ustad.uninformed_students.schedule import scale_schedule
from ustad.uninformed_students.steps import init_students, make_optimizer
from ustad.uninformed_students.targets import describe_fn, teacher_from_config

__all__ = [
    "ScaleRun",
    "checkpoint_meta",
    "initial_state",
    "scale_teacher",
    "setup_run",
    "target_stats",
]

PyTree = Any


@dataclasses.dataclass(frozen=True, eq=False)
class ScaleRun:
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


def scale_teacher(config, teacher, patch_size, images, key) -> tuple[PatchNet, PyTree, str]:
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


def setup_run(config, module: PatchNet, train_images, val_images, tile=None) -> ScaleRun:
    """The run's mesh, student network, optimizer and steps, checked against the images
    (``tile``: the ``(H, W)`` of training on tiles, see
    :func:`ustad.uninformed_students.train.train_tile_size`)."""
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
    return ScaleRun(
        train_images, val_images, module, student, tx, *fixed, floor, select_best,
        tiles=tile is not None,
    )  # fmt: skip


def initial_state(config, run: ScaleRun, teacher_vars: PyTree, key: jax.Array) -> PyTree:
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


def target_stats(config, run: ScaleRun, state: PyTree, teacher_source: str, writer) -> PyTree:
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


def checkpoint_meta(config, run: ScaleRun, teacher_source: str, fingerprint: str) -> dict:
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
