"""The students' jitted pieces (paper §4): optimizer, loss, one student's step, the ensemble step.

A single student's step (:func:`student_step`) knows nothing of the ensemble; the M students are
one stacked pytree (leading axis M) updated inside one jitted function by lifting that step over
the member axis, each with its own Adam state: ``jax.vmap``, or one member after another
inside the same program, which measured faster on CPU (``member_strategy``). The teacher is
frozen: it is not in the optimizer and its descriptors pass through
``stop_gradient``.

Pure functions of networks and arrays; the trainer (data, checkpoints, metrics) is
:mod:`ustad.uninformed_students.train`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ustad import sharding as shd
from ustad.ensemble import init_ensemble, map_members, resolve_member_strategy
from ustad.uninformed_students.dense import dense_apply
from ustad.uninformed_students.maps import teacher_targets
from ustad.uninformed_students.nets import PatchNet

PyTree = Any


LR_SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(
    learning_rate: float, schedule: str = "constant", warmup_steps: int = 0, total_steps: int = 0
):
    """The learning rate by step: a float for the paper's constant rate, else an optax schedule.

    * ``"constant"``: ``learning_rate`` throughout (the paper), after a linear warm-up from 0
      over ``warmup_steps`` if that is > 0.
    * ``"cosine"``: linear warm-up over ``warmup_steps``, then cosine decay to 0 at
      ``total_steps``.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if schedule == "cosine":
        if total_steps <= warmup_steps:
            raise ValueError(
                f"a cosine schedule needs total_steps ({total_steps}) > warmup_steps "
                f"({warmup_steps})"
            )
        return optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, max(warmup_steps, 1), total_steps, end_value=0.0
        )
    if warmup_steps:
        return optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, warmup_steps),
             optax.constant_schedule(learning_rate)],
            [warmup_steps],
        )  # fmt: skip
    return learning_rate


@functools.lru_cache(maxsize=16)
def make_optimizer(
    learning_rate: float = 1e-4,
    weight_decay: float = 1e-5,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int = 0,
):
    """Adam with L2 weight decay, as PyTorch's ``Adam(lr, weight_decay=wd)``.

    Cached: equal arguments return the same (hashable) object, so the jitted steps built from
    it are compiled once per process.

    PyTorch adds ``wd · θ`` to the gradient *before* the moment estimates (L2 regularisation,
    rescaled by Adam like the rest of the gradient), unlike AdamW's decoupled decay; the paper's
    "Adam, weight decay 1e-5" is read this way. Eps 1e-8 and β = (0.9, 0.999) match PyTorch.
    ``schedule``, ``warmup_steps``, ``total_steps``: see :func:`learning_rate_schedule` (the
    defaults are the paper's constant rate).
    """
    rate = learning_rate_schedule(learning_rate, schedule, warmup_steps, total_steps)
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(rate))


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
        the members are sharded, else vmap); see :func:`ustad.ensemble.resolve_member_strategy`.

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
