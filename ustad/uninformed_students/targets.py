"""The students' regression targets: the run's frozen teacher and its normalised descriptors.

Teacher descriptors do not change during training, so by default they are computed once per
image and cached on the host (see :func:`choose_target_cache`); when they do not fit, the
teacher runs inside the train step instead (:func:`ustad.uninformed_students.steps.make_train_step`
with a ``teacher``).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ustad import sharding as shd
from ustad.uninformed_students.config import scale_teacher_name
from ustad.uninformed_students.dense import dense_apply
from ustad.uninformed_students.maps import teacher_targets
from ustad.uninformed_students.nets import PatchNet, patch_net

PyTree = Any


CACHE_MODES = ("auto", "float32", "float16", "bfloat16", "none")


_CACHE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": jnp.bfloat16}


def teacher_from_config(config, patch_size: int, channels: int, key: jax.Array):
    source = scale_teacher_name(config, patch_size)
    if source == "random":
        # Smoke runs only: an untrained teacher still gives a well-posed regression problem.
        module = patch_net(patch_size, widths=config.get("teacher_widths"), out_dim=config.out_dim)
        sample = jnp.zeros((1, patch_size, patch_size, channels))
        return module, jax.jit(module.init)(key, sample), "random"
    from ustad.uninformed_students.teacher.catalog import load_teacher, resolve_teacher

    module, variables, _ = load_teacher(source)
    return module, variables, str(resolve_teacher(source).resolve())


@functools.lru_cache(maxsize=16)
def describe_fn(module, padding):
    """A stable function object, so :func:`ustad.stats.descriptor_stats` reuses its compilation."""
    return lambda variables, images: dense_apply(module, variables, images, padding=padding)


def available_memory_bytes() -> int:
    """Memory the OS can still give this process (``MemAvailable``), or total RAM."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_target_cache(
    mode: str, num_images: int, image_size: tuple[int, int], dim: int, budget_bytes: float
) -> str:
    """How to hold the normalised teacher targets during training.

    Args:
      mode: ``"float32"``, ``"float16"``, ``"bfloat16"``, ``"none"`` (teacher in every step) or
        ``"auto"``: float32 if ``N·H·W·D·4`` bytes fit in the budget, else float16 if half of
        that fits, else none. float16 before bfloat16: the targets are standardised (|t| of order
        1–10), where float16's 10 mantissa bits (rel. error 5e-4) beat bfloat16's 7 (4e-3).
      num_images: N training images.
      image_size: ``(H, W)``.
      dim: descriptor dimension D.
      budget_bytes: host memory the cache may take.

    Returns:
      One of ``"float32"``, ``"float16"``, ``"bfloat16"``, ``"none"``.
    """
    if mode not in CACHE_MODES:
        raise ValueError(f"target_cache must be one of {CACHE_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    full = num_images * image_size[0] * image_size[1] * dim * 4
    if full <= budget_bytes:
        return "float32"
    if full / 2 <= budget_bytes:
        return "float16"
    return "none"


def build_target_cache(
    teacher: PatchNet,
    teacher_params: PyTree,
    images: np.ndarray,
    *,
    dtype,
    batch_size: int,
    padding: str = "reflect",
    put=None,
) -> np.ndarray:
    """Normalised teacher descriptors of every image, on the host.

    Args:
      teacher: the teacher network.
      teacher_params: ``{"variables": ..., "mean": [D], "std": [D]}``.
      images: ``[N, H, W, C]``.
      dtype: storage dtype (float32, float16 or bfloat16).
      batch_size: images per teacher call.
      padding: dense-extraction padding.
      put: places a host batch on the devices.

    Returns:
      ``[N, H, W, D]`` of ``dtype``.
    """
    put = put or jnp.asarray
    fn = _targets_fn(teacher, padding, np.dtype(dtype))
    cache = np.empty((*images.shape[:3], teacher.out_dim), dtype)
    for start in range(0, len(images), batch_size):
        chunk = fn(teacher_params, put(images[start : start + batch_size]))
        cache[start : start + len(chunk)] = shd.to_host(chunk)
    return cache


@functools.lru_cache(maxsize=16)
def _targets_fn(teacher, padding, dtype):
    def targets(t, images):
        normalized = teacher_targets(
            teacher, t["variables"], t["mean"], t["std"], images, padding=padding
        )
        return normalized.astype(dtype)

    return jax.jit(targets)


def training_targets(config, module: PatchNet, state: PyTree, train_images: np.ndarray, *, put):
    """How a run holds its targets, as ``config.target_cache`` says (:func:`choose_target_cache`).

    Args:
      config: see ``configs/students.py``.
      module: the teacher network.
      state: the training state (``"teacher"`` variables, ``"target_stats"``).
      train_images: ``[N, H, W, C]``.
      put: places a host batch on the devices.

    Returns:
      ``(cache_mode, data, teacher_params)``: ``data`` holds the ``"image"`` array and, unless
      ``cache_mode`` is ``"none"``, the ``"target"`` of every image; ``teacher_params`` is the
      train step's third argument when the teacher runs inside it.
    """
    cache_mode = choose_target_cache(
        config.target_cache,
        len(train_images),
        tuple(train_images.shape[1:3]),
        module.out_dim,
        config.target_cache_max_gb * 2**30
        if config.target_cache_max_gb
        else 0.5 * available_memory_bytes(),
    )
    teacher_params = {
        "variables": state["teacher"],
        "mean": state["target_stats"]["mean"],
        "std": state["target_stats"]["std"],
    }
    data = {"image": train_images}
    if cache_mode != "none":
        data["target"] = build_target_cache(
            module,
            teacher_params,
            train_images,
            dtype=_CACHE_DTYPES[cache_mode],
            batch_size=config.stats_batch_size,
            padding=config.padding,
            put=put,
        )
    return cache_mode, data, teacher_params
