"""What an STFPM run is, fixed before its first step (and the same when it resumes).

The training images at the configured size (or native, for training on tiles), the tile size,
the schedule (whole epochs, raised to a floor of updates), the mesh, optimizer and member
strategy (:class:`Run`), where the run writes (:class:`Books`), the fresh students and the
checkpoints' JSON metadata. :mod:`ustad.stfpm.train` runs it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from ustad import sharding as shd
from ustad.checkpointing import Checkpointer
from ustad.ensemble import resolve_member_strategy
from ustad.selection import initial_best
from ustad.stfpm import maps as stfpm
from ustad.stfpm.nets import pyramid_net, pyramid_spec
from ustad.stfpm.steps import init_students, make_optimizer
from ustad.training_budget import Budget, scheduled_steps

PyTree = Any


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """What a run is, fixed before its first step (and the same when it resumes)."""

    train_images: np.ndarray  # [N, H, W, 3]
    val_images: np.ndarray  # [V, H, W, 3] for validation and the score normalisation; may be empty
    network: Any  # the pyramid network (teacher and students), :func:`pyramid_net`
    tx: Any  # the students' optimizer
    mesh: jax.sharding.Mesh
    shard_members: bool
    strategy: str  # how the M students run in a step (resolve_member_strategy)
    steps_per_epoch: int
    total_steps: int
    select_best: bool  # each student keeps its epoch of lowest validation loss
    floor: int  # the fewest updates the schedule gives (config.min_train_steps / train_steps)
    # The mean validation loss after each validation (restored from the checkpoint on resume).
    val_history: list = dataclasses.field(default_factory=list)
    # Training on tiles (config.train_tiles): the (H, W) of the random crops each step takes
    # of the native-size training images, which is the model's input size; None: whole images.
    tile_size: tuple[int, int] | None = None

    @property
    def epochs(self) -> int:
        return self.total_steps // self.steps_per_epoch

    @property
    def image_size(self) -> tuple[int, int]:
        if self.tile_size is not None:
            return self.tile_size
        return tuple(int(s) for s in self.train_images.shape[1:3])

    @property
    def put(self):
        return functools.partial(shd.shard_batch, mesh=self.mesh)


@dataclasses.dataclass(frozen=True)
class Books:
    """Where a run writes: its checkpoints, metrics and metadata, and its clocks."""

    checkpointer: Checkpointer
    writer: Any  # the metrics file, or None on processes that write none
    base_meta: dict
    t0: float  # time.perf_counter() at the start of the training time, resumes included
    budget: Budget
    workdir: Path


def setup_run(config, network, train_images, val_images) -> Run:
    """The run's mesh, optimizer and steps, checked against the images."""
    mesh, shard_members = shd.training_mesh(config, config.num_students)
    batch_size = config.batch_size
    if batch_size > len(train_images):
        raise ValueError(f"batch_size={batch_size} > {len(train_images)} training images")
    steps_per_epoch = len(train_images) // batch_size  # full batches only
    total_steps, floor = schedule(config, steps_per_epoch)
    return Run(
        train_images,
        val_images,
        network,
        make_optimizer(config.learning_rate, config.momentum, config.weight_decay),
        mesh,
        shard_members,
        resolve_member_strategy(config.member_strategy, sharded=shard_members, network="pyramid"),
        steps_per_epoch,
        total_steps,
        select_best=config.select == "best_val" and len(val_images) > 0,
        floor=floor,
    )


def schedule(config, steps_per_epoch: int) -> tuple[int, int]:
    """``(total_steps, floor)``: the updates a run of ``steps_per_epoch`` updates an epoch
    trains (whole epochs: :func:`scheduled_epochs`, raised to the floor), and the floor, the
    fewest updates it gets whatever the category's size: ``config.min_train_steps`` or
    ``config.train_steps``, whichever is more."""
    floor = max(int(config.get("min_train_steps", 0) or 0), int(config.get("train_steps", 0) or 0))
    return scheduled_steps(scheduled_epochs(config, steps_per_epoch), steps_per_epoch, floor), floor


def scheduled_epochs(config, steps_per_epoch: int) -> int:
    """Whole epochs to train: the fewest that reach ``config.train_steps`` updates when it is set
    (> 0: a count of updates holds for a category of 40 images and of 800), else
    ``config.epochs`` (the paper's count); :func:`ustad.training_budget.scheduled_steps` then raises
    it to the floor ``config.min_train_steps``."""
    updates = config.get("train_steps", 0) or 0
    if int(updates) != updates or updates < 0:
        raise ValueError(f"--config.train_steps must be an integer ≥ 0, got {updates!r}")
    if updates:
        return -(-int(updates) // steps_per_epoch)
    if int(config.epochs) != config.epochs or config.epochs < 1:
        raise ValueError(f"--config.epochs must be a positive integer, got {config.epochs!r}")
    return int(config.epochs)


def initial_state(config, run: Run, teacher: PyTree, key: jax.Array) -> PyTree:
    """Fresh students, the teacher and (with ``select_best``) the best students so far."""
    members = shd.member_sharding(run.mesh, run.shard_members)
    key = jax.random.fold_in(key, 0)
    students = init_students(run.network, run.tx, key, config.num_students, members)
    state = {"students": students, "teacher": shd.put_replicated(teacher, run.mesh)}
    if run.select_best:
        kept = {"params": students["params"], "batch_stats": students["batch_stats"]}
        state["best"] = initial_best(kept, config.num_students, run.mesh, "epoch")
    return state


def checkpoint_metadata(config, run: Run, teacher_source: str, fingerprint: str) -> dict:
    """The JSON metadata of every checkpoint of the run."""
    return {
        "format": stfpm.FORMAT,
        "family": stfpm.FAMILY,
        "network": pyramid_spec(run.network),
        "levels": list(run.network.level_names),
        "image_size": list(run.image_size),
        "channels": 3,
        "num_students": int(config.num_students),
        "score": config.score,
        "combination": config.combination,
        "teacher_source": teacher_source,
        "train_images": len(run.train_images),
        "val_images": len(run.val_images),
        "steps_per_epoch": run.steps_per_epoch,
        "total_steps": run.total_steps,
        "data_fingerprint": fingerprint,
        "config": json.loads(config.to_json_best_effort()),
    }


def training_images(config: ml_collections.ConfigDict) -> np.ndarray:
    """``config.data_dir/config.category/train/good`` at ``config.image_size``: ``[N, H, W,
    C]`` float32 in [0, 1].

    With ``config.keep_aspect`` (``"auto"``: when the images are not square, see
    :func:`ustad.data.mvtec.resolve_keep_aspect`) the short side becomes ``config.image_size``
    and both sides are rounded to the network's largest stride (16), so every level of the
    pyramid tiles the image exactly; the checkpoint records the size used (``image_size``), and
    scoring and calibration resize to it.

    With ``config.train_tiles`` the images keep their native size (the most common one) and
    ``config.image_size`` is the size of the tiles training crops from them and scoring cuts.
    """
    from ustad.data.mvtec import load_mvtec_train

    if config.get("train_tiles", False):
        return load_mvtec_train(config.data_dir, config.category, image_size=None)[0]
    network = pyramid_net(
        config.backbone, tiny=config.get("tiny", False), levels=config.get("levels", None)
    )
    return load_mvtec_train(
        config.data_dir,
        config.category,
        image_size=config.image_size,
        keep_aspect=config.get("keep_aspect", False),
        multiple=max(network.strides),
    )[0]


def train_tile_size(config: ml_collections.ConfigDict) -> tuple[int, int] | None:
    """The ``(H, W)`` of the training tiles (``config.image_size``) with ``config.train_tiles``,
    else None."""
    if not config.get("train_tiles", False):
        return None
    from ustad.data.images import as_size

    size = as_size(config.image_size)
    network = pyramid_net(
        config.backbone, tiny=config.get("tiny", False), levels=config.get("levels", None)
    )
    multiple = max(network.strides)
    if size[0] % multiple or size[1] % multiple:
        raise ValueError(
            f"--config.train_tiles: the tile --config.image_size={config.image_size!r} must be "
            f"a multiple of {multiple} (the pyramid's largest stride) on each side"
        )
    return size
