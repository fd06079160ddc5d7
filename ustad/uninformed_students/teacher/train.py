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
from ustad.uninformed_students.teacher import targets as targets_lib
from ustad.uninformed_students.teacher.catalog import load_teacher
from ustad.uninformed_students.teacher.files import FORMAT
from ustad.uninformed_students.teacher.steps import (
    backbone_inputs,
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
    "INIT_DECODERS",
    "backbone_input_size",
    "least_squares_decoder",
    "load_teacher",
    "make_init",
    "make_optimizer",
    "make_train_step",
    "mean_features",
    "target_spec",
    "train_and_evaluate",
    "teacher_window",
    "train_apply",
]


PyTree = Any


logger = logging.getLogger(__name__)


_BIAS_PATCHES = 256  # patches whose P features initialise D (its bias, or a least-squares fit)
_TARGET_SAMPLE_TAG = 4  # key of the fixed crops that measure the target's statistics
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
      DeadTargetError: ``config.target_check="refuse"`` and the target has dead or
        near-constant dimensions on the fixed sample of crops (before anything is written).
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
    spec = target_spec(config)
    input_size = backbone_input_size(config, teacher.receptive_field)
    tx = make_optimizer(config.learning_rate, config.weight_decay)
    # threefry (JAX's default) is the portable choice; "rbg" compiles several times faster on
    # CPU (seconds per run, which matters for tests).
    key = jax.random.key(config.seed, impl=config.get("prng_impl", "threefry2x32"))
    sampler = _sampler(config, images, jax.random.fold_in(key, 1))
    checkpointer = writer = None
    try:
        target = _measure_target(config, sampler, key, teacher, backbone, spec, input_size)
        # Before anything is written; a resumed or continued run measures the same fixed sample.
        side = input_size or teacher.receptive_field
        targets_lib.check_target(
            target, spec, config.get("target_check", "warn"), f" (P on {side}×{side} inputs)"
        )
        decoder = nn.Dense(target["dim"])
        state = make_init(teacher, decoder, tx, config.channels)(jax.random.fold_in(key, 0))
        meta = _teacher_meta(config, teacher, backbone_name, target, source_name, input_size)
        checkpointer = Checkpointer(
            workdir / CHECKPOINT_SUBDIR, max_to_keep=config.get("keep_checkpoints", 2)
        )
        writer = MetricWriter(workdir)

        def compatible(old_meta):
            old_spec = targets_lib.TargetSpec.from_record(old_meta.get("target"))
            if old_spec != spec:
                raise ValueError(
                    f"{workdir} holds a teacher with target {old_spec.name}, but this run has "
                    f"{spec.name}; use a new workdir"
                )
            for name in (*_RESUME_FIELDS, "backbone_input_size"):
                if old_meta.get(name, 0) != meta[name]:
                    raise ValueError(
                        f"{workdir} holds a teacher with {name}={old_meta.get(name)}, but this "
                        f"run has {meta[name]}; use a new workdir"
                    )

        start_step, state, old_meta = resume(checkpointer, state, compatible)
        if start_step:
            logger.info("resuming %s at step %d of %d", workdir, start_step, total_steps)
            # The statistics the run started with (the same sample; stored, not re-measured).
            meta["target"] = old_meta.get("target") or meta["target"]
        elif config.get("init_from", ""):
            state, start_step, meta["target"] = _init_from_file(config.init_from, state, meta)
            logger.info("continuing %s from step %d of %s", workdir, start_step, config.init_from)
        # On the device once, not transferred with every step.
        variables = jax.device_put(
            targets_lib.target_variables(backbone.variables, spec, meta["target"])
        )
        target_fn = targets_lib.target_fn(backbone, spec)
        if not start_step and config.lambda_k:
            crops = sampler.sample(0, _BIAS_PATCHES, key=jax.random.fold_in(key, 3))
            init = _decoder_initialiser(config)
            if init is not None:
                state = init(config, state, teacher, target_fn, variables, crops, input_size)
        step_fn = _step_from_config(config, teacher, decoder, target_fn, tx, input_size)
        state = _train_loop(
            config,
            state,
            step_fn,
            variables,
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
        if checkpointer is not None:
            checkpointer.close()
        if writer is not None:
            writer.close()
    variables = jax.tree.map(np.asarray, state["params"]["teacher"])
    return teacher, variables, dict(meta, step=total_steps)


INIT_DECODERS = ("mean", "lstsq", "random", "default")


def _check_config(config) -> None:
    if config.channels not in (1, 3):
        raise ValueError(f"config.channels must be 1 or 3, got {config.channels}")
    if config.get("init_decoder", "mean") not in INIT_DECODERS:
        raise ValueError(
            f"--config.init_decoder={config.init_decoder!r}: choose one of {INIT_DECODERS}"
        )
    if config.get("target_check", "warn") not in targets_lib.TARGET_CHECKS:
        raise ValueError(
            f"--config.target_check={config.target_check!r}: choose one of "
            f"{targets_lib.TARGET_CHECKS}"
        )
    stages = tuple(config.get("target_stages") or ())
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in stages):
        raise ValueError(f"--config.target_stages={stages!r}: stage numbers ≥ 1 (or empty: head)")
    if len(set(stages)) != len(stages):
        raise ValueError(f"--config.target_stages={stages!r}: each stage at most once")
    scale = float(config.get("backbone_input_scale", 0.0) or 0.0)
    if scale < 0:
        raise ValueError(f"--config.backbone_input_scale={scale}: must be ≥ 0 (0: not used)")
    if scale and config.backbone_input_size:
        raise ValueError(
            f"--config.backbone_input_scale={scale} and --config.backbone_input_size="
            f"{config.backbone_input_size}: set at most one"
        )
    if int(config.get("target_sample_crops", 1024)) < 2:
        raise ValueError(f"--config.target_sample_crops={config.target_sample_crops}: need ≥ 2")


def target_spec(config) -> targets_lib.TargetSpec:
    """The distillation target a teacher config asks for."""
    return targets_lib.TargetSpec(
        tuple(int(s) for s in config.get("target_stages") or ()),
        bool(config.get("target_standardize", False)),
    )


def backbone_input_size(config, window: int) -> int | None:
    """P's input side: ``config.backbone_input_size``, or T̂'s window R times
    ``config.backbone_input_scale`` (rounded; 1 or 0 = native); ``None``: the native R×R."""
    scale = float(config.get("backbone_input_scale", 0.0) or 0.0)
    if scale:
        size = max(1, round(window * scale))
        return None if size == window else size
    return config.backbone_input_size or None


def _measure_target(config, sampler, key, teacher, backbone, spec, input_size) -> dict:
    """The target's statistics over a fixed sample of crops (as :func:`target_record`)."""
    count = int(config.get("target_sample_crops", 1024))
    crops = sampler.sample(0, count, key=jax.random.fold_in(key, _TARGET_SAMPLE_TAG))
    windows = teacher_window(patches_lib.center_crop(crops, config.patch_size), teacher)
    prepare = jax.jit(
        functools.partial(backbone_inputs, channels=config.channels, input_size=input_size)
    )
    features = np.concatenate(
        [
            targets_lib.raw_features(backbone, spec, np.asarray(prepare(windows[i : i + 256])))
            for i in range(0, len(windows), 256)
        ]
    )
    statistics = targets_lib.target_statistics(features)
    sample = {"crops": count, "key": f"fold_in(seed key, {_TARGET_SAMPLE_TAG})", "step": 0}
    return targets_lib.target_record(spec, statistics, sample)


def _margin(config) -> int:
    """Pixels around each crop for the triplets' shifted and zoomed positives (0 without)."""
    if config.lambda_m == 0:
        return 0
    return patches_lib.perturbation_margin(config.patch_size, config.max_shift, config.zoom)


def _step_from_config(config, teacher, decoder, target_fn, tx, input_size):
    every = config.log_every_steps if config.get("log_grad_norms", True) else 0
    return make_train_step(
        teacher,
        decoder,
        target_fn,
        tx,
        channels=config.channels,
        backbone_input_size=input_size,
        loss_weights=(config.lambda_k, config.lambda_m, config.lambda_c),
        margin=config.margin,
        compactness_mode=config.compactness_mode,
        max_shift=config.max_shift,
        zoom=config.zoom,
        noise_std=config.noise_std,
        fast_apply=config.get("fast_apply", True),
        grad_norm_steps=(int(every), int(config.num_steps)),
    )


def _teacher_meta(config, teacher, backbone_name, target, source_name, input_size) -> dict:
    """The checkpoint metadata of a teacher run (what a resumed run and a teacher file keep)."""
    window = teacher.receptive_field
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
        "feature_dim": target["dim"],
        "backbone_input": seen
        + ("; grayscale repeated to 3 channels" if config.channels == 1 else "")
        + ("" if targets_lib.TargetSpec.from_record(target).is_paper else f"; {target['name']}"),
        "backbone_input_size": input_size or 0,
        "backbone_window": window,
        "crop_size": config.crop_size or config.patch_size,
        "source": source_name,
        "total_steps": config.num_steps,
        "config": json.loads(config.to_json_best_effort()),
        "target": target,
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


def _decoder_initialiser(config):
    """The function that initialises D for ``config.init_decoder`` (None: Flax's random init)."""
    return {"mean": _decoder_at_mean, "lstsq": _decoder_least_squares}.get(
        config.get("init_decoder", "mean")
    )


def _window_targets(config, teacher, target_fn, variables, crops, input_size) -> np.ndarray:
    """``[N, F]`` targets of the crops' anchors, as the train step computes them."""
    windows = teacher_window(patches_lib.center_crop(crops, config.patch_size), teacher)
    features = jax.jit(lambda v, x: target_fn(v, backbone_inputs(x, config.channels, input_size)))
    return np.concatenate(
        [np.asarray(features(variables, windows[i : i + 64])) for i in range(0, len(windows), 64)]
    )


def _decoder_at_mean(config, state, teacher, target_fn, variables, crops, input_size):
    """D as the constant predictor of the mean target: zero kernel, bias = the mean over
    ``crops`` (an initialisation the paper leaves open). At lr 2e-4 Adam moves a bias by ~2e-4
    per step, so learning a mean of order 0.1–1 per dimension from zero takes thousands of
    steps, and a random kernel adds noise of order ||T̂(p)||² to L_k. A zero kernel also starts
    the distillation gradient reaching T̂ at zero (it flows through D's kernel), which left the
    shipped teachers trained by the compactness loss alone (issue 23): prefer ``lstsq``."""
    bias = mean_features(
        target_fn,
        variables,
        teacher_window(patches_lib.center_crop(crops, config.patch_size), teacher),
        channels=config.channels,
        backbone_input_size=input_size,
    )
    kernel = jnp.zeros_like(state["params"]["decoder"]["params"]["kernel"])
    decoder_params = {"params": {"kernel": kernel, "bias": bias}}
    return dict(state, params=dict(state["params"], decoder=decoder_params))


# Ridge of the least-squares D, relative to the mean eigenvalue of the descriptors' Gram matrix.
_LSTSQ_RIDGE = 1e-3


def _decoder_least_squares(config, state, teacher, target_fn, variables, crops, input_size):
    """D as the least-squares (ridge) linear read-out of the targets from the initial T̂'s
    descriptors on the first ``crops``: L_k starts at what a linear map of T̂ cannot explain,
    and the distillation gradient reaches T̂ from the first step (unlike a zero kernel)."""
    anchors = patches_lib.center_crop(jnp.asarray(crops), config.patch_size)
    if config.channels == 1:
        anchors = patches_lib.to_gray(anchors)
    descriptors = np.asarray(
        jax.jit(teacher.apply)(state["params"]["teacher"], anchors), np.float64
    )
    targets = _window_targets(config, teacher, target_fn, variables, crops, input_size)
    kernel, bias = least_squares_decoder(descriptors, np.asarray(targets, np.float64))
    params = state["params"]["decoder"]["params"]
    decoder_params = {
        "params": {
            "kernel": jnp.asarray(kernel, params["kernel"].dtype),
            "bias": jnp.asarray(bias, params["bias"].dtype),
        }
    }
    return dict(state, params=dict(state["params"], decoder=decoder_params))


def least_squares_decoder(
    descriptors: np.ndarray, targets: np.ndarray, ridge: float = _LSTSQ_RIDGE
) -> tuple[np.ndarray, np.ndarray]:
    """Ridge least squares ``targets ≈ descriptors @ kernel + bias``.

    Args:
      descriptors: ``[N, d]``.
      targets: ``[N, F]``.
      ridge: added to the centred Gram matrix, times its mean diagonal entry.

    Returns:
      ``kernel [d, F]``, ``bias [F]`` (float64).
    """
    x_mean, y_mean = descriptors.mean(0), targets.mean(0)
    centred = descriptors - x_mean
    gram = centred.T @ centred
    gram += ridge * max(np.trace(gram) / len(gram), 1e-12) * np.eye(len(gram))
    kernel = np.linalg.solve(gram, centred.T @ (targets - y_mean))
    return kernel, y_mean - x_mean @ kernel


def _init_from_file(source, state, meta):
    """T̂ and D from a teacher file or name, to continue its training in a new workdir (e.g. a
    shipped teacher trained further in a later session). Adam's moments start afresh."""
    path = catalog.resolve_teacher(source)
    if not path.is_file():
        raise ValueError(f"config.init_from must be a teacher file or name, got workdir {path}")
    _, variables, header = teacher_files.read_teacher_file(path)
    file_spec = targets_lib.TargetSpec.from_record(header.get("target"))
    if file_spec != targets_lib.TargetSpec.from_record(meta["target"]):
        raise ValueError(
            f"config.init_from={source} ({path}) holds a teacher of target {file_spec.name}, but "
            f"this run has {meta['target']['name']}"
        )
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
    # The file's own statistics: the targets it was trained on, not a re-measurement.
    target = header.get("target") or meta["target"]
    return dict(state, params=params, opt_state=state["opt_state"]), start, target


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
