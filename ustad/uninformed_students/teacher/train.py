"""Teacher pretraining (paper §3): distil a pretrained network P into the patch network T̂.

For a batch of random p×p patches (see :mod:`ustad.uninformed_students.teacher.patches`) the
loss is::

    L = λ_k ||D(T̂(p)) − P(p)||²                                  (distillation, D: Dense d→F)
      + λ_m max(0, δ + δ⁺ − δ⁻)                                  (triplets with p⁺ and p⁻)
      + λ_c Σ_{i≠j} c_ij                                          (compactness on T̂(p))

with the paper's λ_k = λ_c = 1, λ_m = 0 by default. P is frozen (outside the optimizer, its
features through ``stop_gradient``); the loss, the jitted step and the other pure pieces are in
:mod:`ustad.uninformed_students.teacher.steps` and importable from here too; this module runs
them through :func:`ustad.training.run_loop`.

Workdir layout::

    <workdir>/checkpoints/<step>/   T̂ and D parameters, optimizer state (arrays) + metadata
                                    (architecture, channels, backbone, how patches reach P)
    <workdir>/metrics.jsonl          loss terms and throughput

:func:`load_teacher` rebuilds T̂ from the newest checkpoint for the students trainer.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ustad.checkpointing import CHECKPOINT_SUBDIR, Checkpointer
from ustad.metric_writer import MetricWriter, check_finite
from ustad.models.pretrained import Backbone
from ustad.training import Every, Hook, Log, Saves, resume, run_loop
from ustad.uninformed_students.nets import PatchNet, layers_to_json, patch_net
from ustad.uninformed_students.teacher import catalog, sources
from ustad.uninformed_students.teacher import files as teacher_files
from ustad.uninformed_students.teacher import patches as patches_lib
from ustad.uninformed_students.teacher.catalog import load_teacher
from ustad.uninformed_students.teacher.files import FORMAT
from ustad.uninformed_students.teacher.steps import (
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


_BIAS_PATCHES = 256  # patches whose mean P feature initialises D's bias
# Checkpoint fields a resumed run must share with the run that wrote them.
_RESUME_FIELDS = ("patch_size", "out_dim", "layers", "channels", "backbone", "feature_dim")


def _images_from_config(config) -> tuple[Sequence[np.ndarray], str]:
    source = config.source
    if source == "natural":
        return sources.natural_photos(), "natural photos (scikit-image, scikit-learn)"
    if source == "folder":
        path = config.source_path
        if os.path.isdir(path):
            # A folder tree of photos, less its fixed held-out split (kept for the probes).
            images = sources.photo_folder(path, split="train")
            return images, f"photo folder {path} (train split, {len(images)} images)"
        return sources.image_files(path), f"images {path}"
    if source == "tfds":
        images = sources.tfds_images(
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
    _check_config(config)
    if images is None:
        images, source_name = _images_from_config(config)
    else:
        source_name = f"{len(images)} in-memory images"
    # An injected P is recorded under the config's name too: the name says which features the
    # teacher learnt, which the caller knows best.
    backbone_name = config.backbone
    if backbone is None:
        backbone = _backbone_from_config(config)
    p, total_steps = config.patch_size, config.num_steps
    teacher = patch_net(p, out_dim=config.out_dim, widths=config.widths)
    decoder = nn.Dense(backbone.feature_dim)
    tx = make_optimizer(config.learning_rate, config.weight_decay)
    # threefry (JAX's default) is the portable choice; "rbg" compiles several times faster on
    # CPU (seconds per run, which matters for tests).
    key = jax.random.key(config.seed, impl=config.get("prng_impl", "threefry2x32"))
    state = make_init(teacher, decoder, tx, config.channels)(jax.random.fold_in(key, 0))
    step_fn = _step_from_config(config, teacher, decoder, backbone, tx)
    meta = _teacher_meta(config, teacher, backbone_name, backbone.feature_dim, source_name)
    sampler = _sampler(config, images, jax.random.fold_in(key, 1))
    # On the device once, not transferred with every step.
    backbone_variables = jax.device_put(backbone.variables)
    checkpointer = Checkpointer(
        workdir / CHECKPOINT_SUBDIR, max_to_keep=config.get("keep_checkpoints", 2)
    )
    writer = MetricWriter(workdir)
    try:

        def compatible(old_meta):
            for name in _RESUME_FIELDS:
                if old_meta.get(name) != meta[name]:
                    raise ValueError(
                        f"{workdir} holds a teacher with {name}={old_meta.get(name)}, but this "
                        f"run has {meta[name]}; use a new workdir"
                    )

        start_step, state, _ = resume(checkpointer, state, compatible)
        if start_step:
            logger.info("resuming %s at step %d of %d", workdir, start_step, total_steps)
        elif config.get("init_from", ""):
            state, start_step = _init_from_file(config.init_from, state, meta)
            logger.info("continuing %s from step %d of %s", workdir, start_step, config.init_from)
        elif config.get("init_decoder", "mean") == "mean" and config.lambda_k:
            crops = sampler.sample(0, _BIAS_PATCHES, key=jax.random.fold_in(key, 3))
            state = _decoder_at_mean(config, state, teacher, backbone, backbone_variables, crops)
        state = _train_loop(
            config,
            state,
            step_fn,
            backbone_variables,
            sampler,
            jax.random.fold_in(key, 2),
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


def _check_config(config) -> None:
    if config.channels not in (1, 3):
        raise ValueError(f"config.channels must be 1 or 3, got {config.channels}")
    if config.get("init_decoder", "mean") not in ("mean", "default"):
        raise ValueError(f"config.init_decoder must be mean or default, got {config.init_decoder}")


def _margin(config) -> int:
    """Pixels around each crop for the triplets' shifted and zoomed positives (0 without)."""
    if config.lambda_m == 0:
        return 0
    return patches_lib.perturbation_margin(config.patch_size, config.max_shift, config.zoom)


def _step_from_config(config, teacher, decoder, backbone: Backbone, tx):
    return make_train_step(
        teacher,
        decoder,
        backbone.features_fn,
        tx,
        channels=config.channels,
        backbone_input_size=config.backbone_input_size or None,
        loss_weights=(config.lambda_k, config.lambda_m, config.lambda_c),
        margin=config.margin,
        compactness_mode=config.compactness_mode,
        max_shift=config.max_shift,
        zoom=config.zoom,
        noise_std=config.noise_std,
        fast_apply=config.get("fast_apply", True),
    )


def _teacher_meta(config, teacher, backbone_name, feature_dim, source_name) -> dict:
    """The checkpoint metadata of a teacher run (what a resumed run and a teacher file keep)."""
    window = teacher.receptive_field
    input_size = config.backbone_input_size or None
    seen = (
        f"T̂'s {window}×{window} window resized to {input_size}×{input_size} (bilinear, antialiased)"
        if input_size
        else f"T̂'s native {window}×{window} window"
    )
    return {
        "format": FORMAT,
        "patch_size": config.patch_size,
        "out_dim": config.out_dim,
        "layers": layers_to_json(teacher.layers),
        "widths": config.widths,
        "channels": config.channels,
        "backbone": backbone_name,
        "feature_dim": feature_dim,
        "backbone_input": seen
        + ("; grayscale repeated to 3 channels" if config.channels == 1 else ""),
        "backbone_input_size": input_size or 0,
        "backbone_window": window,
        "crop_size": config.crop_size or config.patch_size,
        "source": source_name,
        "total_steps": config.num_steps,
        "config": json.loads(config.to_json_best_effort()),
    }


def _sampler(config, images, key) -> patches_lib.ContextSampler:
    p, crop_size = config.patch_size, config.crop_size or config.patch_size
    return patches_lib.ContextSampler(
        images,
        p + 2 * _margin(config),
        key,
        scale=p / crop_size,
        pool_size=config.pool_size,
        steps_per_pool=config.steps_per_pool,
        workers=config.loader_workers,
        levels=tuple(config.get("crop_levels", (1.0,))),
        flip=config.get("flip", False),
        color_jitter=config.get("color_jitter", 0.0),
    )


def _decoder_at_mean(config, state, teacher, backbone, backbone_variables, crops):
    """D as the constant predictor of P's mean feature: zero kernel, bias = the mean over
    ``crops`` (an initialisation the paper leaves open). At lr 2e-4 Adam moves a bias by ~2e-4
    per step, so learning a mean of order 0.1–1 per dimension from zero takes thousands of
    steps, and a random kernel adds noise of order ||T̂(p)||² to L_k."""
    bias = mean_features(
        backbone.features_fn,
        backbone_variables,
        teacher_window(patches_lib.center_crop(crops, config.patch_size), teacher),
        channels=config.channels,
        backbone_input_size=config.backbone_input_size or None,
    )
    kernel = jnp.zeros_like(state["params"]["decoder"]["params"]["kernel"])
    decoder_params = {"params": {"kernel": kernel, "bias": bias}}
    return dict(state, params=dict(state["params"], decoder=decoder_params))


def _init_from_file(source, state, meta):
    """T̂ and D from a teacher file or name, to continue its training in a new workdir (e.g. a
    shipped teacher trained further in a later session). Adam's moments start afresh."""
    path = catalog.resolve_teacher(source)
    if not path.is_file():
        raise ValueError(f"config.init_from must be a teacher file or name, got workdir {path}")
    _, variables, header = teacher_files.read_teacher_file(path)
    for name in _RESUME_FIELDS:
        if json.loads(json.dumps(header.get(name))) != json.loads(json.dumps(meta[name])):
            raise ValueError(
                f"config.init_from={source} ({path}) holds a teacher with {name}="
                f"{header.get(name)}, but this run has {meta[name]}"
            )
    decoder = catalog.load_decoder(path)
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
    contexts = (sampler.sample(step, crops_per_step) for step in range(start_step, total_steps))

    def step(state, contexts, step):
        return step_fn(state, backbone_variables, contexts, key, np.int32(step))

    snapshot = functools.partial(_snapshot, snapshot_dir, meta)
    return run_loop(
        step,
        state,
        contexts,
        start_step=start_step,
        total_steps=total_steps,
        check=_check,
        log=Log(
            writer,
            Every(config.log_every_steps, final=True),
            lambda metrics: {k: float(v) for k, v in metrics.items()},
            {"steps_per_s": 1, "patches_per_s": batch_size},
            f"teacher p{config.patch_size}",
        ),
        saves=Saves(
            checkpointer, Every(config.checkpoint_every_steps), lambda step: dict(meta, step=step)
        ),
        hooks=[Hook.observer(Every(config.get("snapshot_every_steps", 0)), snapshot)],
    )


def _snapshot(snapshot_dir: Path, meta: dict, step: int, state: PyTree) -> None:
    """T̂ and D after ``step`` steps as a float16 teacher file, kept for good (unlike
    checkpoints): the probes measure the teacher along its training curve without re-training."""
    params = jax.device_get(state["params"])
    teacher_files.write_teacher_file(
        snapshot_dir / f"step_{step:07d}.teacher.npz",
        params["teacher"],
        dict(meta, step=step),
        dtype="float16",
        decoder=params["decoder"]["params"],
    )


def _check(step: int, metrics: dict) -> None:
    """The step's loss terms (host scalars): a NaN or inf ``loss`` raises, naming the step."""
    check_finite("the teacher loss", float(metrics["loss"]), step)
