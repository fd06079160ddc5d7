"""What a teacher run (:mod:`ustad.uninformed_students.teacher.train`) sets up from its config.

Checks of the config, the images and P it names, the distillation target and P's input size,
the crop sampler, the jitted train step and the checkpoint metadata; and the target's
statistics on a fixed sample of crops, measured before anything is written.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence

import jax
import numpy as np

from ustad.models.pretrained import Backbone
from ustad.uninformed_students.nets import layers_to_json
from ustad.uninformed_students.teacher import patches as patches_lib
from ustad.uninformed_students.teacher import sources
from ustad.uninformed_students.teacher import targets as targets_lib
from ustad.uninformed_students.teacher.files import FORMAT
from ustad.uninformed_students.teacher.steps import (
    backbone_inputs,
    make_train_step,
    teacher_window,
)

__all__ = [
    "INIT_DECODERS",
    "TARGET_SAMPLE_TAG",
    "backbone_from_config",
    "backbone_input_size",
    "check_config",
    "images_from_config",
    "measure_target",
    "sampler",
    "step_from_config",
    "target_spec",
    "teacher_meta",
]


TARGET_SAMPLE_TAG = 4  # key of the fixed crops that measure the target's statistics


def images_from_config(config) -> tuple[Sequence[np.ndarray], str]:
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


def backbone_from_config(config) -> Backbone:
    from ustad.models.pretrained import load_pretrained

    return load_pretrained(config.backbone, weights_path=config.backbone_weights or None)


INIT_DECODERS = ("mean", "lstsq", "random", "default")


def check_config(config) -> None:
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


def measure_target(config, sampler, key, teacher, backbone, spec, input_size) -> dict:
    """The target's statistics over a fixed sample of crops (as :func:`target_record`)."""
    count = int(config.get("target_sample_crops", 1024))
    crops = sampler.sample(0, count, key=jax.random.fold_in(key, TARGET_SAMPLE_TAG))
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
    sample = {"crops": count, "key": f"fold_in(seed key, {TARGET_SAMPLE_TAG})", "step": 0}
    return targets_lib.target_record(spec, statistics, sample)


def _margin(config) -> int:
    """Pixels around each crop for the triplets' shifted and zoomed positives (0 without)."""
    if config.lambda_m == 0:
        return 0
    return patches_lib.perturbation_margin(config.patch_size, config.max_shift, config.zoom)


def step_from_config(config, teacher, decoder, target_fn, tx, input_size):
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


def teacher_meta(config, teacher, backbone_name, target, source_name, input_size) -> dict:
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


def sampler(config, images, key) -> patches_lib.ContextSampler:
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
