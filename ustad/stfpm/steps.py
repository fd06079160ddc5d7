"""STFPM's jitted pieces: optimizer, one student's step, the M-student step, evaluation.

One student's step (:func:`student_step`) knows nothing of the ensemble; the M students are one
stacked pytree (leading axis M), updated inside one jitted function by lifting that step over
the member axis (``jax.vmap``, or one member after another inside the same program on CPU:
:func:`ustad.ensemble.map_members`), each with its own BatchNorm statistics and SGD momentum.
The teacher is frozen: its variables are an argument of the step, not part of the students'
state or of the optimizer, its BatchNorm uses running averages, and its maps pass through
``stop_gradient``.

Pure functions of networks and arrays; the trainer (data, checkpoints, metrics) is
:mod:`ustad.stfpm.train`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ustad import sharding as shd
from ustad.ensemble import init_ensemble, map_members, resolve_member_strategy
from ustad.stats import batch_moments, empty_moments, finalize, merge_moments
from ustad.stfpm import maps as stfpm
from ustad.stfpm.maps import level_scores

PyTree = Any


@functools.lru_cache(maxsize=16)
def make_optimizer(learning_rate: float = 0.4, momentum: float = 0.9, weight_decay: float = 1e-4):
    """SGD with momentum and L2 weight decay, as PyTorch's ``SGD(lr, momentum, weight_decay)``.

    PyTorch adds ``wd · θ`` to the gradient before the momentum buffer (``buf = μ·buf + g``,
    ``θ -= lr·buf``, the buffer starting at the first gradient), which is optax's
    ``add_decayed_weights`` followed by ``sgd(momentum)``; the decay applies to every parameter,
    BatchNorm's scale and bias included, as in the authors' code. Cached: equal arguments give
    the same object, so the steps built from it compile once per process.
    """
    return optax.chain(
        optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=momentum)
    )


def teacher_maps(network: nn.Module, teacher_variables: PyTree, images: jax.Array):
    """The frozen teacher's pyramid: ``[N, h_l, w_l, C_l]`` per level, no gradient."""
    return tuple(jax.lax.stop_gradient(network.apply(teacher_variables, images)))


def student_loss(network, params, batch_stats, images, targets, level_weights=None):
    """One student's loss in training mode (BatchNorm on batch statistics).

    Args:
        network: the pyramid network.
        params, batch_stats: the student's variables.
        images: ``[B, H, W, 3]``.
        targets: the teacher's maps, ``[B, h_l, w_l, C_l]`` per level.
        level_weights: α_l (default 1).

    Returns:
        ``(loss, new_batch_stats)``: scalar float32 (:func:`ustad.stfpm.maps.stfpm_loss`) and the
        updated running averages.
    """
    maps, updates = network.apply(
        {"params": params, "batch_stats": batch_stats},
        images,
        train=True,
        mutable=["batch_stats"],
    )
    return stfpm.stfpm_loss(targets, maps, level_weights), updates["batch_stats"]


def student_step(network, tx, member, images, targets, level_weights=None):
    """One SGD step of one student (ensemble-unaware).

    Args:
        member: ``{"params", "batch_stats", "opt_state"}``.

    Returns:
        ``(member, loss)``; ``loss`` is the loss before the update.
    """
    (loss, batch_stats), grads = jax.value_and_grad(student_loss, argnums=1, has_aux=True)(
        network, member["params"], member["batch_stats"], images, targets, level_weights
    )
    updates, opt_state = tx.update(grads, member["opt_state"], member["params"])
    params = optax.apply_updates(member["params"], updates)
    return {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}, loss


def init_students(network, tx, key, num_students: int, sharding=None) -> PyTree:
    """M independently initialised students with their optimizer states.

    Args:
        network: the pyramid network.
        tx: the optimizer.
        key: typed PRNG key; student i uses ``jax.random.split(key, M)[i]``.
        num_students: M.
        sharding: where the stacked result lives; None for the default device.

    Returns:
        ``{"params": [M, ...], "batch_stats": [M, ...], "opt_state": [M, ...]}``.
    """
    return _init_fn(network, tx, num_students, sharding)(key)


@functools.lru_cache(maxsize=16)
def _init_fn(network, tx, num_students, sharding):
    sample = jnp.zeros((1, 32, 32, 3), jnp.float32)

    def init(key):
        variables = init_ensemble(network, key, num_students, sample)
        return {
            "params": variables["params"],
            "batch_stats": variables["batch_stats"],
            "opt_state": jax.vmap(tx.init)(variables["params"]),
        }

    return jax.jit(init, out_shardings=sharding)


def make_train_step(
    network,
    tx,
    *,
    level_weights: Sequence[float] | None = None,
    cached_targets: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    shard_members: bool = False,
    member_strategy: str = "auto",
):
    """The jitted step that updates all M students at once (cached per arguments).

    Args:
        network: the pyramid network.
        tx: the optimizer (:func:`make_optimizer`).
        level_weights: α_l (None: 1 each).
        cached_targets: the caller passes the teacher's maps (computed once per image); False:
            it passes the teacher's variables and the teacher runs inside the step.
        mesh: a ``("data", "ensemble")`` mesh (images split over ``"data"``: BatchNorm's batch
            statistics are then global, XLA inserts the reductions); None: plain ``jax.jit``.
        shard_members: split the stacked students over ``"ensemble"``.
        member_strategy: ``"vmap"``, ``"sequential"`` or ``"auto"``
            (:func:`ustad.ensemble.resolve_member_strategy`).

    Returns:
        ``step(students, images, targets_or_teacher) -> (students, losses [M])``; ``students``
        as from :func:`init_students` (donated), ``images`` ``[B, H, W, 3]``, the third
        argument a tuple of the teacher's ``[B, h_l, w_l, C_l]`` maps or its variables.
    """
    strategy = resolve_member_strategy(member_strategy, sharded=shard_members, network="pyramid")
    weights = None if level_weights is None else tuple(float(w) for w in level_weights)
    return _train_step_fn(network, tx, weights, cached_targets, mesh, shard_members, strategy)


@functools.lru_cache(maxsize=16)
def _train_step_fn(network, tx, level_weights, cached_targets, mesh, shard_members, strategy):
    def one_student(member, images, targets):
        return student_step(network, tx, member, images, targets, level_weights)

    def step(students, images, targets_or_teacher):
        if cached_targets:
            targets = tuple(t.astype(jnp.float32) for t in targets_or_teacher)
        else:
            targets = teacher_maps(network, targets_or_teacher, images)
        # The teacher's maps are computed once and shared by every member.
        return map_members(one_student, students, images, targets, strategy=strategy)

    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    members = shd.member_sharding(mesh, shard_members)
    third = shd.batch_sharding(mesh) if cached_targets else shd.replicated(mesh)
    return jax.jit(
        step,
        in_shardings=(members, shd.batch_sharding(mesh), third),
        out_shardings=(members, shd.replicated(mesh)),
        donate_argnums=0,
    )


@functools.lru_cache(maxsize=16)
def teacher_maps_fn(network):
    """Jitted :func:`teacher_maps` (for the target cache)."""
    return jax.jit(functools.partial(teacher_maps, network))


@functools.lru_cache(maxsize=16)
def validation_loss_fn(network, level_weights, strategy):
    """Jitted ``(teacher vars, students, images [B, ...]) -> [M, B]``: each student's loss on
    each image, every network in inference mode (BatchNorm on running averages); the trainer
    averages it with :func:`ustad.training.validation_losses`."""

    def fn(teacher_variables, students, images):
        targets = teacher_maps(network, teacher_variables, images)
        weights = level_weights or (1.0,) * len(targets)

        def one(member, x):
            maps = network.apply(member, x)
            return sum(
                w * jnp.mean(stfpm.level_distance(t, s), axis=(1, 2))
                for w, t, s in zip(weights, targets, maps, strict=True)
            )

        variables = {"params": students["params"], "batch_stats": students["batch_stats"]}
        return map_members(one, variables, images, strategy=strategy)

    return jax.jit(fn)


@functools.lru_cache(maxsize=16)
def level_moments_fn(network, image_size, strategy):
    """Jitted ``(params, images) -> Moments`` of ``[e_1, v_1, …, e_L, v_L]`` over every pixel
    of the images at ``image_size`` (the score normalisation)."""

    def fn(params, images):
        errors, variances = level_scores(network, params, images, strategy)
        columns = []
        for error, variance in zip(errors, variances, strict=True):
            columns += [stfpm.upsample(error, image_size), stfpm.upsample(variance, image_size)]
        return batch_moments(jnp.stack(columns, axis=-1))

    return jax.jit(fn)


def _chunks(images: np.ndarray, size: int):
    for start in range(0, len(images), size):
        yield images[start : start + size]


def teacher_cache(network, teacher, images: np.ndarray, *, batch_size: int, max_bytes: float, put):
    """The teacher's maps of every training image on the host, or None when they would take
    more than ``max_bytes`` (the teacher then runs in every step).

    Args:
        network: the pyramid network.
        teacher: its (frozen) variables.
        images: ``[N, H, W, 3]`` host array.
        batch_size: images per jitted call.
        max_bytes: the budget for the float32 maps.
        put: places a host batch on the devices.

    Returns:
        One ``[N, h_l, w_l, C_l]`` float32 host array per level, or None.
    """
    shapes = jax.eval_shape(network.apply, teacher, jax.ShapeDtypeStruct(images.shape, jnp.float32))
    if sum(int(np.prod(s.shape)) * 4 for s in shapes) > max_bytes:
        return None
    fn = teacher_maps_fn(network)
    parts = [shd.to_host(fn(teacher, put(chunk))) for chunk in _chunks(images, batch_size)]
    return tuple(np.concatenate([p[level] for p in parts]) for level in range(len(shapes)))


def score_normalization(network, params, images, image_size, *, batch_size, put, strategy):
    """``[L, 4]`` float32 (e_μ, e_σ, v_μ, v_σ) per level over every pixel of ``images`` at
    ``image_size`` (streamed moments, Chan merge in float64).

    Args:
        network: the pyramid network.
        params: ``{"teacher": vars, "students": stacked {"params", "batch_stats"}}``.
        images: ``[N, H, W, 3]`` anomaly-free host images.
        image_size: ``(H, W)`` the maps are upsampled to.
        batch_size: images per jitted call.
        put: places a host batch on the devices.
        strategy: ``"vmap"`` or ``"sequential"`` over the students.
    """
    fn = level_moments_fn(network, tuple(image_size), strategy)
    total = None
    for chunk in _chunks(images, batch_size):
        moments = shd.to_host(fn(params, put(chunk)))
        total = merge_moments(
            empty_moments(moments.mean.shape[-1]) if total is None else total, moments
        )
    stats = finalize(total, min_std=1e-12)
    return np.stack([stats.mean, stats.std], axis=-1).reshape(-1, 4).astype(np.float32)
