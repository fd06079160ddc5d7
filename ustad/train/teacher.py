"""Teacher pretraining (paper §3): distil a pretrained network P into the patch network T̂.

For a batch of random p×p patches (see :mod:`ustad.train.patches`) the loss is::

    L = λ_k ||D(T̂(p)) − P(p)||²                                  (distillation, D: Dense d→F)
      + λ_m max(0, δ + δ⁺ − δ⁻)                                  (triplets with p⁺ and p⁻)
      + λ_c Σ_{i≠j} c_ij                                          (compactness on T̂(p))

with the paper's λ_k = λ_c = 1, λ_m = 0 by default. P is frozen (outside the optimizer, its
features through ``stop_gradient``); the loss, the jitted step and the other pure pieces are in
:mod:`ustad.train.teacher_steps` and importable from here too.

Workdir layout::

    <workdir>/checkpoints/<step>/   T̂ and D parameters, optimizer state (arrays) + metadata
                                    (architecture, channels, backbone, how patches reach P)
    <workdir>/metrics.jsonl          loss terms and throughput

:func:`load_teacher` rebuilds T̂ from the newest checkpoint for the students trainer.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ustad.checkpointing import Checkpointer
from ustad.metric_writer import MetricWriter, check_finite, progress
from ustad.models.patch_net import PatchNet, layers_to_json, patch_net
from ustad.models.pretrained import Backbone
from ustad.train import patches as patches_lib
from ustad.train import teacher_files
from ustad.train.teacher_files import CHECKPOINT_SUBDIR, FORMAT, load_teacher
from ustad.train.teacher_steps import (
    _backbone_inputs,  # noqa: F401  (benchmarks read it here)
    make_init,
    make_optimizer,
    make_train_step,
    mean_features,
    teacher_window,
    train_apply,
)

__all__ = [
    "CHECKPOINT_SUBDIR",
    "FORMAT",
    "load_teacher",
    "make_init",
    "make_optimizer",
    "make_train_step",
    "mean_features",
    "train_and_evaluate",
    "teacher_window",
    "train_apply",
]

PyTree = Any
logger = logging.getLogger(__name__)
# Checkpoint fields a resumed run must share with the run that wrote them.
_BIAS_PATCHES = 256  # patches whose mean P feature initialises D's bias
_RESUME_FIELDS = ("patch_size", "out_dim", "layers", "channels", "backbone", "feature_dim")


# ---------------------------------------------------------------------------------------------
# The trainer.


def _images_from_config(config) -> tuple[Sequence[np.ndarray], str]:
    source = config.source
    if source == "natural":
        return patches_lib.natural_photos(), "natural photos (scikit-image, scikit-learn)"
    if source == "folder":
        path = config.source_path
        if os.path.isdir(path):
            # A folder tree of photos, less its fixed held-out split (kept for the probes).
            images = patches_lib.photo_folder(path, split="train")
            return images, f"photo folder {path} (train split, {len(images)} images)"
        return patches_lib.image_files(path), f"images {path}"
    if source == "tfds":
        images = patches_lib.tfds_images(
            config.tfds_name,
            split=config.tfds_split,
            data_dir=config.tfds_data_dir or None,
            download=config.tfds_download,
        )
        return images, f"tfds {config.tfds_name} {config.tfds_split}"
    raise ValueError(f"config.source must be natural, folder or tfds, got {source!r}")


def _backbone_from_config(config) -> Backbone:
    from ustad.models.pretrained import load_pretrained

    return load_pretrained(config.backbone, weights_path=config.backbone_weights or None)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    images: Sequence[np.ndarray] | None = None,
    backbone: Backbone | None = None,
) -> tuple[PatchNet, PyTree, dict]:
    """Pretrain (or resume) one teacher T̂ for ``config.patch_size``.

    Args:
      config: see ``configs/teacher.py``.
      workdir: checkpoints and metrics; a run found there resumes from its newest checkpoint.
      images: ``[H_i, W_i, C]`` images to crop patches from instead of ``config.source``.
      backbone: P instead of ``load_pretrained(config.backbone)`` (e.g. a tiny network in
        tests); its ``features_fn`` must be pure and jit-friendly.

    Returns:
      ``(module, variables, metadata)`` as :func:`load_teacher` gives.

    Raises:
      FloatingPointError: the loss became NaN or inf (the message names the step).
    """
    workdir = Path(workdir)
    p = config.patch_size
    channels = config.channels
    if channels not in (1, 3):
        raise ValueError(f"config.channels must be 1 or 3, got {channels}")
    if config.get("init_decoder", "mean") not in ("mean", "default"):
        raise ValueError(f"config.init_decoder must be mean or default, got {config.init_decoder}")
    if images is None:
        images, source_name = _images_from_config(config)
    else:
        source_name = f"{len(images)} in-memory images"
    # An injected P is recorded under the config's name too: the name says which features the
    # teacher learnt, which the caller knows best.
    backbone_name = config.backbone
    if backbone is None:
        backbone = _backbone_from_config(config)
    input_size = config.backbone_input_size or None
    loss_weights = (config.lambda_k, config.lambda_m, config.lambda_c)
    triplets = config.lambda_m != 0
    margin = patches_lib.perturbation_margin(p, config.max_shift, config.zoom) if triplets else 0
    crop_size = config.crop_size or p
    total_steps = config.num_steps

    teacher = patch_net(p, out_dim=config.out_dim, widths=config.widths)
    window = teacher.receptive_field
    decoder = nn.Dense(backbone.feature_dim)
    tx = make_optimizer(config.learning_rate, config.weight_decay)
    # threefry (JAX's default) is the portable choice; "rbg" compiles several times faster on
    # CPU (seconds per run, which matters for tests).
    key = jax.random.key(config.seed, impl=config.get("prng_impl", "threefry2x32"))
    state = make_init(teacher, decoder, tx, channels)(jax.random.fold_in(key, 0))
    step_fn = make_train_step(
        teacher,
        decoder,
        backbone.features_fn,
        tx,
        channels=channels,
        backbone_input_size=input_size,
        loss_weights=loss_weights,
        margin=config.margin,
        compactness_mode=config.compactness_mode,
        max_shift=config.max_shift,
        zoom=config.zoom,
        noise_std=config.noise_std,
        fast_apply=config.get("fast_apply", True),
    )
    meta = {
        "format": FORMAT,
        "patch_size": p,
        "out_dim": config.out_dim,
        "layers": layers_to_json(teacher.layers),
        "widths": config.widths,
        "channels": channels,
        "backbone": backbone_name,
        "feature_dim": backbone.feature_dim,
        "backbone_input": (
            f"T̂'s {window}×{window} window resized to {input_size}×{input_size} (bilinear, "
            "antialiased)"
            if input_size
            else f"T̂'s native {window}×{window} window"
        )
        + ("; grayscale repeated to 3 channels" if channels == 1 else ""),
        "backbone_input_size": input_size or 0,
        "backbone_window": window,
        "crop_size": crop_size,
        "source": source_name,
        "total_steps": total_steps,
        "config": json.loads(config.to_json_best_effort()),
    }

    sampler = patches_lib.ContextSampler(
        images,
        p + 2 * margin,
        jax.random.fold_in(key, 1),
        scale=p / crop_size,
        pool_size=config.pool_size,
        steps_per_pool=config.steps_per_pool,
        workers=config.loader_workers,
        levels=tuple(config.get("crop_levels", (1.0,))),
        flip=config.get("flip", False),
        color_jitter=config.get("color_jitter", 0.0),
    )
    perturb_key = jax.random.fold_in(key, 2)
    # On the device once, not transferred with every step.
    backbone_variables = jax.device_put(backbone.variables)
    checkpointer = Checkpointer(
        workdir / CHECKPOINT_SUBDIR, max_to_keep=config.get("keep_checkpoints", 2)
    )
    writer = MetricWriter(workdir)
    try:
        start_step = checkpointer.latest_step() or 0
        if start_step:
            # Compare the metadata first: restoring into a different architecture would fail
            # with a shape error that does not say which setting changed.
            _, old_meta = checkpointer.restore(start_step)
            for name in _RESUME_FIELDS:
                if old_meta.get(name) != meta[name]:
                    raise ValueError(
                        f"{workdir} holds a teacher with {name}={old_meta.get(name)}, but this "
                        f"run has {meta[name]}; use a new workdir"
                    )
            state, _ = checkpointer.restore(start_step, state)
            logger.info("resuming %s at step %d of %d", workdir, start_step, total_steps)
        elif config.get("init_from", ""):
            state, start_step = _init_from_file(config.init_from, state, meta)
            logger.info("continuing %s from step %d of %s", workdir, start_step, config.init_from)
        elif config.get("init_decoder", "mean") == "mean" and config.lambda_k:
            # D starts as the constant predictor of P's mean feature: zero kernel, bias = the
            # mean (an initialisation the paper leaves open). At lr 2e-4 Adam moves a bias by
            # ~2e-4 per step, so learning a mean of order 0.1–1 per dimension from zero takes
            # thousands of steps, and a random kernel adds noise of order ||T̂(p)||² to L_k.
            crops = sampler.sample(0, _BIAS_PATCHES, key=jax.random.fold_in(key, 3))
            bias = mean_features(
                backbone.features_fn,
                backbone_variables,
                teacher_window(patches_lib.center_crop(crops, p), teacher),
                channels=channels,
                backbone_input_size=input_size,
            )
            kernel = jnp.zeros_like(state["params"]["decoder"]["params"]["kernel"])
            decoder_params = {"params": {"kernel": kernel, "bias": bias}}
            state = dict(state, params=dict(state["params"], decoder=decoder_params))
        state = _train_loop(
            config,
            state,
            step_fn,
            backbone_variables,
            sampler,
            perturb_key,
            start_step,
            checkpointer,
            writer,
            meta,
            workdir / "snapshots",
        )
        if start_step < total_steps:
            checkpointer.save(total_steps, state, dict(meta, step=total_steps))
    finally:
        sampler.close()
        checkpointer.close()
        writer.close()
    variables = jax.tree.map(np.asarray, state["params"]["teacher"])
    return teacher, variables, dict(meta, step=total_steps)


def _init_from_file(source, state, meta):
    """T̂ and D from a teacher file or name, to continue its training in a new workdir (e.g. a
    shipped teacher trained further in a later session). Adam's moments start afresh."""
    path = teacher_files.resolve_teacher(source)
    if not path.is_file():
        raise ValueError(f"config.init_from must be a teacher file or name, got workdir {path}")
    _, variables, header = teacher_files.read_teacher_file(path)
    for name in _RESUME_FIELDS:
        if json.loads(json.dumps(header.get(name))) != json.loads(json.dumps(meta[name])):
            raise ValueError(
                f"config.init_from={source} ({path}) holds a teacher with {name}="
                f"{header.get(name)}, but this run has {meta[name]}"
            )
    decoder = teacher_files.load_decoder(path)
    if decoder is None:
        raise ValueError(f"{path} was exported without its decoder; it cannot be trained further")
    params = {
        "teacher": jax.tree.map(jnp.asarray, variables),
        "decoder": {"params": jax.tree.map(jnp.asarray, decoder)},
    }
    start = int(header["step"])
    if start >= meta["total_steps"]:
        raise ValueError(
            f"config.init_from={source} already has {start} steps; set config.num_steps above it"
        )
    return dict(state, params=params, opt_state=state["opt_state"]), start


def _train_loop(
    config,
    state,
    step_fn,
    backbone_variables,
    sampler,
    key,
    start_step,
    checkpointer,
    writer,
    meta,
    snapshot_dir,
):
    """Steps ``start_step … config.num_steps − 1``; returns the final state."""
    total_steps, batch_size = config.num_steps, config.batch_size
    crops_per_step = 2 * batch_size if config.lambda_m else batch_size
    bar = progress(total_steps, initial=start_step, desc=f"teacher p{config.patch_size}")
    pending = None
    last_time, last_step = time.perf_counter(), start_step
    try:
        for step in range(start_step, total_steps):
            contexts = sampler.sample(step, crops_per_step)
            state, metrics = step_fn(state, backbone_variables, contexts, key, np.int32(step))
            # Check the previous step's loss only now, so the host prepares the next batch
            # while the device runs this step.
            if pending is not None:
                _check(*pending)
            pending = (step, metrics)
            bar.update(1)
            done = step + 1
            if done % config.log_every_steps == 0 or done == total_steps:
                _check(*pending)
                pending = None
                now = time.perf_counter()
                rate = (done - last_step) / (now - last_time)
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                writer.write(done, **values, steps_per_s=rate, patches_per_s=rate * batch_size)
                bar.set_postfix(loss=f"{values['loss']:.4g}", refresh=False)
                last_time, last_step = now, done
            every = config.checkpoint_every_steps
            if every and done % every == 0 and done < total_steps:
                checkpointer.save(done, state, dict(meta, step=done))
            snapshot = config.get("snapshot_every_steps", 0)
            if snapshot and done % snapshot == 0:
                # Kept for good (unlike checkpoints): the probes measure the teacher along its
                # training curve without re-training.
                params = jax.device_get(state["params"])
                teacher_files.write_teacher_file(
                    snapshot_dir / f"step_{done:07d}.teacher.npz",
                    params["teacher"],
                    dict(meta, step=done),
                    dtype="float16",
                    decoder=params["decoder"]["params"],
                )
        if pending is not None:
            _check(*pending)
    finally:
        bar.close()
    return state


def _check(step: int, metrics: dict) -> None:
    check_finite("the teacher loss", float(metrics["loss"]), step)
