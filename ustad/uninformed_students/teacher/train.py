"""Teacher pretraining (paper §3): distil a pretrained network P into the patch network T̂.

For a batch of random p×p patches (see :mod:`ustad.uninformed_students.teacher.patches`) the
loss is::

    L = λ_k ||D(T̂(p)) − P(p)||²                                  (distillation, D: Dense d→F)
      + λ_m max(0, δ + δ⁺ − δ⁻)                                  (triplets with p⁺ and p⁻)
      + λ_c Σ_{i≠j} c_ij                                          (compactness on T̂(p))

with the paper's λ_k = λ_c = 1, λ_m = 0 by default. P is frozen (outside the optimizer, its
features through ``stop_gradient``); the loss, the jitted step and the other pure pieces are in
:mod:`ustad.uninformed_students.teacher.steps` and importable from here too; what the config
sets up (P, the target, the sampler, the step, the metadata) is in
:mod:`ustad.uninformed_students.teacher.run_setup`, D's initialisations in
:mod:`ustad.uninformed_students.teacher.decoder_init`; this module runs them through
:func:`ustad.training.run_loop`.

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
from ustad.uninformed_students.nets import PatchNet, patch_net
from ustad.uninformed_students.teacher import catalog, decoder_init, run_setup
from ustad.uninformed_students.teacher import files as teacher_files
from ustad.uninformed_students.teacher import targets as targets_lib
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


_BIAS_PATCHES = 256  # patches whose P features initialise D (its bias, or a least-squares fit)
# Checkpoint fields a resumed run must share with the run that wrote them.
_RESUME_FIELDS = ("patch_size", "out_dim", "layers", "channels", "backbone", "feature_dim")


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
    run_setup.check_config(config)
    if images is None:
        images, source_name = run_setup.images_from_config(config)
    else:
        source_name = f"{len(images)} in-memory images"
    # An injected P is recorded under the config's name too: the name says which features the
    # teacher learnt, which the caller knows best.
    backbone_name = config.backbone
    if backbone is None:
        backbone = run_setup.backbone_from_config(config)
    p, total_steps = config.patch_size, config.num_steps
    teacher = patch_net(p, out_dim=config.out_dim, widths=config.widths)
    spec = run_setup.target_spec(config)
    input_size = run_setup.backbone_input_size(config, teacher.receptive_field)
    tx = make_optimizer(config.learning_rate, config.weight_decay)
    # threefry (JAX's default) is the portable choice; "rbg" compiles several times faster on
    # CPU (seconds per run, which matters for tests).
    key = jax.random.key(config.seed, impl=config.get("prng_impl", "threefry2x32"))
    sampler = run_setup.sampler(config, images, jax.random.fold_in(key, 1))
    checkpointer = writer = None
    try:
        target = run_setup.measure_target(config, sampler, key, teacher, backbone, spec, input_size)
        # Before anything is written; a resumed or continued run measures the same fixed sample.
        side = input_size or teacher.receptive_field
        targets_lib.check_target(
            target, spec, config.get("target_check", "warn"), f" (P on {side}×{side} inputs)"
        )
        decoder = nn.Dense(target["dim"])
        state = make_init(teacher, decoder, tx, config.channels)(jax.random.fold_in(key, 0))
        meta = run_setup.teacher_meta(
            config, teacher, backbone_name, target, source_name, input_size
        )
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
            init = decoder_init.decoder_initialiser(config)
            if init is not None:
                state = init(config, state, teacher, target_fn, variables, crops, input_size)
        step_fn = run_setup.step_from_config(config, teacher, decoder, target_fn, tx, input_size)
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
