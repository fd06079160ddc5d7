"""The teacher's jitted pieces (paper §3): optimizer, initialisation, train step, P's mean.

:func:`make_train_step` builds the one jitted step (state donated) that draws the positives,
runs P, T̂ and D on a batch, computes the loss of :mod:`ustad.uninformed_students.teacher.train`
and applies Adam. P
is frozen: its variables are an argument of the step, outside the optimizer, and its features
pass through ``stop_gradient``. :func:`train_apply` runs T̂ on patches with operations whose
gradients are fast on XLA:CPU.

Pure functions of networks and arrays; the trainer (image sources, checkpoints, metrics) is
:mod:`ustad.uninformed_students.teacher.train`, which re-exports them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ustad.uninformed_students.nets import LEAKY_SLOPE, Conv, PatchNet, Pool
from ustad.uninformed_students.teacher import patches as patches_lib
from ustad.uninformed_students.teacher.losses import (
    compactness_loss,
    distillation_loss,
    triplet_loss,
)

PyTree = Any


@functools.lru_cache(maxsize=16)
def make_optimizer(learning_rate: float = 2e-4, weight_decay: float = 1e-5):
    """Adam with L2 weight decay in the gradient, as the paper's PyTorch-style
    ``Adam(lr, weight_decay=wd)``: ``wd · θ`` joins the gradient before the moment estimates
    (not AdamW's decoupled decay). Applies to T̂ and D; P is never in the optimizer. Cached so
    that equal arguments give the same object and the step compiles once."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))


@functools.lru_cache(maxsize=16)
def make_init(teacher: PatchNet, decoder: nn.Dense, tx, channels: int):
    """Jitted ``key -> {"params": {"teacher", "decoder"}, "opt_state"}`` (one program: op by
    op, Flax's initialisers cost seconds of dispatch)."""
    patch = jnp.zeros((1, teacher.patch_size, teacher.patch_size, channels), jnp.float32)

    def init(key):
        teacher_key, decoder_key = jax.random.split(key)
        params = {
            "teacher": teacher.init(teacher_key, patch),
            "decoder": decoder.init(decoder_key, jnp.zeros((1, teacher.out_dim), jnp.float32)),
        }
        return {"params": params, "opt_state": tx.init(params)}

    return jax.jit(init)


def _max_pool(x: jax.Array, size: int) -> jax.Array:
    """``nn.max_pool(x, (s, s), strides=(s, s))`` as a reshape and a max: the same values, but
    its gradient is a compare-and-select instead of XLA's ``select_and_scatter``, which ran
    4–20x slower on CPU for these shapes. (With exact ties the gradient is split between the
    tied inputs rather than given to the first; both are valid subgradients.)"""
    batch, height, width, channels = x.shape
    out_h, out_w = height // size, width // size
    x = x[:, : out_h * size, : out_w * size].reshape(batch, out_h, size, out_w, size, channels)
    return jnp.max(x, axis=(2, 4))


def _conv_as_matmul(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """A valid convolution as im2col and one matmul: ``[B, H, W, C]`` and ``[k, k, C, F]`` ->
    ``[B, H − k + 1, W − k + 1, F]``."""
    k = kernel.shape[0]
    out_h, out_w = x.shape[1] - k + 1, x.shape[2] - k + 1
    columns = jnp.concatenate(
        [x[:, i : i + out_h, j : j + out_w] for i in range(k) for j in range(k)], axis=-1
    )
    return columns @ kernel.reshape(-1, kernel.shape[-1]).astype(x.dtype) + bias.astype(x.dtype)


# Convolutions with outputs up to this side run as im2col matmuls in train_apply: XLA's CPU
# convolution gradient was up to 23x slower there (p=17's third conv: 5.2 s vs 0.23 s for 64
# patches); for larger outputs XLA's convolution was as fast or faster.
_MATMUL_MAX_OUTPUT = 4


def train_apply(module: PatchNet, variables: PyTree, patches: jax.Array) -> jax.Array:
    """``module.apply(variables, patches)`` in patch mode, lowered for fast gradients on CPU.

    The same function of the same parameters (equal to float rounding, see the tests); only the
    operations differ: 2×2 pooling as reshape-and-max and the small-output convolutions as
    im2col matmuls, where XLA's CPU gradients of ``reduce_window``/``conv`` are slow.

    Args:
      module: a :class:`PatchNet`.
      variables: its ``{"params": ...}``.
      patches: ``[N, p, p, C]``.

    Returns:
      ``[N, out_dim]``.
    """
    p = module.patch_size
    if patches.shape[1:3] != (p, p):
        raise ValueError(f"train_apply takes [N, {p}, {p}, C] patches, got {patches.shape}")
    params = variables["params"]
    x = patches.astype(module.dtype)
    convs = [layer for layer in module.layers if isinstance(layer, Conv)]
    index = 0
    for layer in module.layers:
        if isinstance(layer, Pool):
            x = _max_pool(x, layer.size)
            continue
        conv = params[f"conv{index + 1}"]
        if x.shape[1] - layer.kernel + 1 <= _MATMUL_MAX_OUTPUT:
            x = _conv_as_matmul(x, conv["kernel"], conv["bias"])
        else:
            x = jax.lax.conv_general_dilated(
                x,
                conv["kernel"].astype(x.dtype),
                (1, 1),
                "VALID",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            ) + conv["bias"].astype(x.dtype)
        if index < len(convs) - 1:
            x = nn.leaky_relu(x, LEAKY_SLOPE)
        index += 1
    return x[:, 0, 0, :]


def teacher_window(patches: jax.Array, teacher: PatchNet) -> jax.Array:
    """The pixels of ``[B, p, p, C]`` patches that reach T̂'s output: the top-left R×R with
    R = ``teacher.receptive_field`` (17 of 17, 32 of 33, 60 of 65; the floor of 2×2 pooling on
    odd sides drops the last row and column). P is shown exactly this window, so that T̂ is
    never asked to predict P's view of pixels it cannot see."""
    side = teacher.receptive_field
    return patches[:, :side, :side]


def backbone_inputs(anchors: jax.Array, channels: int, input_size: int | None) -> jax.Array:
    """``[B, R, R, 3]`` RGB windows -> what P sees: gray repeated to 3 channels when T̂ is a
    1-channel teacher (so P describes exactly what T̂ sees), resized if ``input_size``."""
    if channels == 1:
        anchors = jnp.repeat(patches_lib.to_gray(anchors), 3, axis=-1)
    if input_size:
        shape = (anchors.shape[0], input_size, input_size, 3)
        anchors = jax.image.resize(anchors, shape, method="linear", antialias=True)
    return anchors


@functools.lru_cache(maxsize=16)
def make_train_step(
    teacher: PatchNet,
    decoder: nn.Dense,
    features_fn: Callable[[PyTree, jax.Array], jax.Array],
    tx,
    *,
    channels: int = 3,
    backbone_input_size: int | None = None,
    loss_weights: tuple[float, float, float] = (1.0, 0.0, 1.0),
    margin: float = 1.0,
    compactness_mode: str = "squared",
    max_shift: float = 2.0,
    zoom: float = 0.1,
    noise_std: float = 0.02,
    fast_apply: bool = True,
    grad_norm_steps: tuple[int, int] = (0, 0),
):
    """The jitted teacher step.

    Cached: equal arguments give the same jitted function (compiled once per process).

    Args:
      teacher: T̂.
      decoder: D, ``nn.Dense(F)``.
      features_fn: P, pure ``(variables, images [N, H, W, 3] in [0, 1]) -> [N, F]``.
      tx: the optimizer (:func:`make_optimizer`).
      channels: 3, or 1 for a grayscale teacher (T̂ sees luma; P sees luma repeated).
      backbone_input_size: resize P's window (:func:`teacher_window`) to this side before P;
        ``None``: native size.
      loss_weights: ``(λ_k, λ_m, λ_c)``; a zero weight skips its term's computation.
      margin: triplet margin δ.
      compactness_mode: see :func:`ustad.uninformed_students.teacher.losses.compactness_loss`.
      max_shift, zoom, noise_std: how positives are perturbed (:func:`patches.perturb`).
      fast_apply: run T̂ through :func:`train_apply` (same function, faster CPU gradients)
        instead of ``teacher.apply``.
      grad_norm_steps: ``(every, total)``: after the steps whose count (from 1) is a multiple
        of ``every`` or equals ``total``, the metrics also hold the norm of each weighted loss
        term's gradient with respect to T̂'s parameters (``grad_norm_distillation``,
        ``grad_norm_triplet``, ``grad_norm_compactness``; one extra backward pass per active
        term on those steps only) and ``grad_ratio_c_k`` (compactness / distillation), so an
        imbalance between the terms shows in the metrics lines; 0 elsewhere. ``every = 0``:
        never (no such metrics).

    Returns:
      ``step(state, backbone_variables, contexts, key, step) -> (state, metrics)``. ``state``
      as from :func:`make_init` (donated); ``contexts`` ``[B, c, c, 3]`` crops in [0, 1] whose
      centres are the anchors, or ``[2B, c, c, 3]`` when λ_m > 0 (the second half gives the
      negatives); ``key`` the run's typed key, folded with the int ``step`` for the positives;
      ``metrics`` float32 scalars ``loss, distillation, triplet, compactness``.
    """
    weight_k, weight_m, weight_c = loss_weights
    p = teacher.patch_size

    apply = functools.partial(train_apply, teacher) if fast_apply else teacher.apply

    def describe(params, images):
        return apply(params, patches_lib.to_gray(images) if channels == 1 else images)

    def loss_fn(params, backbone_variables, contexts, key):
        batch = contexts.shape[0] // 2 if weight_m else contexts.shape[0]
        anchors = patches_lib.center_crop(contexts[:batch], p)
        if weight_m:
            positives = patches_lib.perturb(
                key, contexts[:batch], p, max_shift=max_shift, zoom=zoom, noise_std=noise_std
            )
            negatives = patches_lib.center_crop(contexts[batch:], p)
            # One pass over 3B patches instead of three calls.
            descriptors = describe(
                params["teacher"], jnp.concatenate([anchors, positives, negatives])
            )
            anchor_desc, positive_desc, negative_desc = jnp.split(descriptors, 3)
            triplet = triplet_loss(anchor_desc, positive_desc, negative_desc, margin)
        else:
            anchor_desc = describe(params["teacher"], anchors)
            triplet = jnp.zeros((), jnp.float32)
        if weight_k:
            targets = jax.lax.stop_gradient(
                features_fn(
                    backbone_variables,
                    backbone_inputs(
                        teacher_window(anchors, teacher), channels, backbone_input_size
                    ),
                )
            )
            decoded = decoder.apply(params["decoder"], anchor_desc)
            distillation = distillation_loss(decoded, targets)
        else:
            distillation = jnp.zeros((), jnp.float32)
        if weight_c:
            compactness = compactness_loss(anchor_desc, mode=compactness_mode)
        else:
            compactness = jnp.zeros((), jnp.float32)
        loss = weight_k * distillation + weight_m * triplet + weight_c * compactness
        metrics = {
            "loss": loss,
            "distillation": distillation,
            "triplet": triplet,
            "compactness": compactness,
        }
        return loss, metrics

    weights = {"distillation": weight_k, "triplet": weight_m, "compactness": weight_c}
    active = tuple(name for name, weight in weights.items() if weight)

    def term_grad_norms(params, backbone_variables, contexts, key):
        """``{name: ||∇_T̂ (λ · term)||}`` for each active term (0 for the others)."""

        def term(teacher_params, name):
            full = dict(params, teacher=teacher_params)
            return weights[name] * loss_fn(full, backbone_variables, contexts, key)[1][name]

        norms = {name: jnp.zeros((), jnp.float32) for name in weights}
        for name in active:
            grads = jax.grad(term)(params["teacher"], name)
            norms[name] = optax.global_norm(grads).astype(jnp.float32)
        return norms

    def no_norms(params, backbone_variables, contexts, key):
        return {name: jnp.zeros((), jnp.float32) for name in weights}

    every, total = grad_norm_steps

    def step(state, backbone_variables, contexts, key, step_index):
        key = jax.random.fold_in(key, step_index)
        grads, metrics = jax.grad(loss_fn, has_aux=True)(
            state["params"], backbone_variables, contexts, key
        )
        if every:
            done = step_index + 1
            due = jnp.logical_or(done % every == 0, done == total)
            norms = jax.lax.cond(
                due, term_grad_norms, no_norms, state["params"], backbone_variables, contexts, key
            )
            metrics = dict(metrics, **{f"grad_norm_{k}": v for k, v in norms.items()})
            metrics["grad_ratio_c_k"] = norms["compactness"] / jnp.maximum(
                norms["distillation"], 1e-30
            )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state}, metrics

    return jax.jit(step, donate_argnums=0)


def mean_features(
    features_fn: Callable[[PyTree, jax.Array], jax.Array],
    backbone_variables: PyTree,
    patches: np.ndarray,
    *,
    channels: int = 3,
    backbone_input_size: int | None = None,
    batch_size: int = 64,
) -> jax.Array:
    """P's mean feature over some patches, fed to P as in training.

    Args:
      features_fn: P.
      backbone_variables: its variables.
      patches: ``[N, R, R, 3]`` in [0, 1]: the windows P sees (:func:`teacher_window`).
      channels: the teacher's input channels (1: P sees gray patches).
      backbone_input_size: as in :func:`make_train_step`.
      batch_size: patches per call of P.

    Returns:
      ``[F]`` float32.
    """
    features = _features_fn(features_fn, channels, backbone_input_size)
    total = sum(
        jnp.sum(features(backbone_variables, patches[i : i + batch_size]), axis=0)
        for i in range(0, len(patches), batch_size)
    )
    return total / len(patches)


@functools.lru_cache(maxsize=16)
def _features_fn(features_fn, channels, backbone_input_size):
    return jax.jit(lambda v, x: features_fn(v, backbone_inputs(x, channels, backbone_input_size)))
