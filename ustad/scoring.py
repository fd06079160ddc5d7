"""Anomaly scores from a teacher and its M students (paper §5).

Per pixel (r, c), with μ^{S_i} the students' dense predictions and t = (y^T − μ)/σ the
normalised teacher descriptor:

* mixture mean ``μ̄ = (1/M) Σ_i μ^{S_i}``;
* regression error ``e = ||μ̄ − t||²``;
* predictive variance ``v = (1/M) Σ_i ||μ^{S_i}||² − ||μ̄||²``;
* score ``ẽ + ṽ = (e − e_μ)/e_σ + (v − v_μ)/v_σ``, with ``e_μ, e_σ, v_μ, v_σ`` the mean and
  standard deviation of e and v over every pixel of held-out anomaly-free validation images;
* several receptive fields: the plain average of the per-scale scores.

The paper defines no image-level score for MVTec AD; the map's maximum is the common choice and
the default here (mean and top-k mean are options).

:class:`Detector` loads trained students (see :mod:`ustad.train.students`) and scores images;
its helpers live in :mod:`ustad.scoring` too so that scoring needs nothing from training.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ustad import sharding as shd
from ustad.dense import dense_apply
from ustad.models.patch_net import PatchNet, layers_from_json
from ustad.stats import Moments, batch_moments, empty_moments, finalize, merge_moments

PyTree = Any
REDUCTIONS = ("max", "mean", "topk")


class ScoreNormalization(NamedTuple):
    """Mean and standard deviation of e and v over the validation pixels (scalars)."""

    error_mean: float
    error_std: float
    variance_mean: float
    variance_std: float

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self._asdict().items()}


MEMBER_STRATEGIES = ("auto", "vmap", "sequential")


def resolve_member_strategy(strategy: str = "auto", *, sharded: bool = False) -> str:
    """How a function of one student is lifted to the M stacked students.

    ``"vmap"`` batches the members into one computation (convolutions whose input and kernel
    both carry the member axis become grouped convolutions). ``"sequential"`` runs the members
    one after another inside the same compiled program (a fully unrolled ``lax.scan``: ordinary
    convolutions, one member's activations at a time).

    ``"auto"``: ``"sequential"`` on CPU, where for p=65 at 128², M=3 it was 1.18× faster than
    vmap (28.3 vs 33.4 s, alternating runs on a loaded 2-core AMD EPYC; benchmarks/
    student_step.py) and used less memory; ``"vmap"`` on accelerators (grouped convolutions
    are native there; not measured in this project yet) and whenever the members are sharded
    over devices, so that each device runs its own members. A rolled ``lax.map`` ran 30×
    slower on XLA:CPU and is not offered.
    """
    if strategy not in MEMBER_STRATEGIES:
        raise ValueError(f"member_strategy must be one of {MEMBER_STRATEGIES}, got {strategy!r}")
    if strategy != "auto":
        return strategy
    return "sequential" if jax.default_backend() == "cpu" and not sharded else "vmap"


def map_members(fn, stacked: PyTree, *shared, strategy: str = "vmap"):
    """``fn(member, *shared)`` for every member of ``stacked`` (leading axis M).

    Args:
      fn: a function of one member's pytree and the shared arguments.
      stacked: pytree with leading axis M.
      *shared: arguments common to all members (e.g. the images).
      strategy: ``"vmap"`` or ``"sequential"`` (see :func:`resolve_member_strategy`).

    Returns:
      ``fn``'s outputs stacked along a new leading axis M.
    """
    if strategy == "vmap":
        return jax.vmap(fn, in_axes=(0,) + (None,) * len(shared))(stacked, *shared)
    if strategy == "sequential":
        # Fully unrolled: straight-line code, no while loop (XLA:CPU ran convolutions inside a
        # rolled loop ~30× slower).
        _, outputs = jax.lax.scan(
            lambda carry, member: (carry, fn(member, *shared)), None, stacked, unroll=True
        )
        return outputs
    raise ValueError(f"strategy must be 'vmap' or 'sequential', got {strategy!r}")


def mixture_mean(student_outputs: jax.Array) -> jax.Array:
    """``[M, ..., D] → [..., D]``: the mean of the students' predictions."""
    return jnp.mean(student_outputs, axis=0)


def regression_error(student_outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """``e = ||μ̄ − t||²``.

    Args:
      student_outputs: ``[M, ..., D]`` students' predictions μ^{S_i}.
      targets: ``[..., D]`` normalised teacher descriptors.

    Returns:
      ``[...]`` float32.
    """
    diff = mixture_mean(student_outputs.astype(jnp.float32)) - targets.astype(jnp.float32)
    return jnp.sum(jnp.square(diff), axis=-1)


def predictive_variance(student_outputs: jax.Array) -> jax.Array:
    """``v = (1/M) Σ_i ||μ^{S_i}||² − ||μ̄||²``, computed as ``(1/M) Σ_i ||μ^{S_i} − μ̄||²``.

    The two are equal; the centred form avoids the float32 cancellation of the paper's form
    when the predictions are large compared with their spread.

    Args:
      student_outputs: ``[M, ..., D]``.

    Returns:
      ``[...]`` float32, ≥ 0.
    """
    outputs = student_outputs.astype(jnp.float32)
    centred = outputs - jnp.mean(outputs, axis=0)
    return jnp.mean(jnp.sum(jnp.square(centred), axis=-1), axis=0)


def normalized_score(
    error: jax.Array, variance: jax.Array, normalization: ScoreNormalization | jax.Array
) -> jax.Array:
    """``(e − e_μ)/e_σ + (v − v_μ)/v_σ`` elementwise.

    Args:
      error, variance: ``[...]``.
      normalization: a :class:`ScoreNormalization` or ``[4]`` array in its field order.
    """
    e_mean, e_std, v_mean, v_std = (normalization[i] for i in range(4))
    return (error - e_mean) / e_std + (variance - v_mean) / v_std


def reduce_maps(maps: jax.Array, reduction: str = "max", top_k: int = 100) -> jax.Array:
    """Image scores from anomaly maps.

    Args:
      maps: ``[N, H, W]``.
      reduction: ``"max"`` (default), ``"mean"`` or ``"topk"`` (mean of the ``top_k`` highest
        pixels, less sensitive to a single noisy pixel than the max).
      top_k: pixels averaged by ``"topk"`` (clipped to H·W).

    Returns:
      ``[N]``.
    """
    flat = maps.reshape(maps.shape[0], -1)
    if reduction == "max":
        return jnp.max(flat, axis=1)
    if reduction == "mean":
        return jnp.mean(flat, axis=1)
    if reduction == "topk":
        return jnp.mean(jax.lax.top_k(flat, min(top_k, flat.shape[1]))[0], axis=1)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def teacher_targets(
    teacher: PatchNet, teacher_variables: PyTree, mean, std, images, *, padding="reflect"
) -> jax.Array:
    """Normalised, frozen teacher descriptors ``(y^T − μ)/σ``.

    Args:
      teacher: the teacher network.
      teacher_variables: its variables (never trained here: wrapped in ``stop_gradient``).
      mean, std: ``[D]`` target statistics.
      images: ``[N, H, W, C]``.

    Returns:
      ``[N, H, W, D]`` float32.
    """
    descriptors = dense_apply(teacher, teacher_variables, images, padding=padding)
    targets = (descriptors.astype(jnp.float32) - mean) / std
    return jax.lax.stop_gradient(targets)


def error_and_variance(
    teacher: PatchNet,
    student: PatchNet,
    params: PyTree,
    images: jax.Array,
    padding="reflect",
    member_strategy: str = "vmap",
) -> tuple[jax.Array, jax.Array]:
    """e and v maps of one scale (trace-friendly).

    Args:
      teacher, student: networks (same architecture, possibly different compute dtypes).
      params: ``{"teacher": vars, "students": stacked vars [M, ...], "mean": [D], "std": [D]}``.
      images: ``[N, H, W, C]``.
      padding: dense-extraction padding.
      member_strategy: ``"vmap"`` or ``"sequential"`` over the students (:func:`map_members`).

    Returns:
      ``(error, variance)``, each ``[N, H, W]`` float32.
    """
    targets = teacher_targets(
        teacher, params["teacher"], params["mean"], params["std"], images, padding=padding
    )
    outputs = map_members(
        lambda v, x: dense_apply(student, v, x, padding=padding),
        params["students"],
        images,
        strategy=member_strategy,
    )
    return regression_error(outputs, targets), predictive_variance(outputs)


def normalization_from_moments(moments: Moments) -> ScoreNormalization:
    """From the moments of the ``[..., 2]`` stack ``(e, v)``."""
    stats = finalize(moments, min_std=1e-12)
    return ScoreNormalization(
        float(stats.mean[0]), float(stats.std[0]), float(stats.mean[1]), float(stats.std[1])
    )


@functools.lru_cache(maxsize=16)
def _error_variance_moments_fn(teacher, student, padding, strategy):
    def moments_of(params, images):
        error, variance = error_and_variance(teacher, student, params, images, padding, strategy)
        return batch_moments(jnp.stack([error, variance], axis=-1))

    return jax.jit(moments_of)


def compute_normalization(
    teacher: PatchNet,
    student: PatchNet,
    params: PyTree,
    images: np.ndarray,
    *,
    batch_size: int,
    padding: str = "reflect",
    put=None,
    member_strategy: str = "auto",
) -> ScoreNormalization:
    """e_μ, e_σ, v_μ, v_σ over every pixel of ``images`` (streamed, Chan merge in float64).

    Args:
      teacher, student, params: as for :func:`error_and_variance`.
      images: ``[N, H, W, C]`` anomaly-free validation images (host array).
      batch_size: images per jitted call.
      padding: dense-extraction padding.
      put: places a host batch on the devices (default ``jnp.asarray``).
      member_strategy: see :func:`resolve_member_strategy`.
    """
    put = put or jnp.asarray
    strategy = resolve_member_strategy(member_strategy)
    moments_of = _error_variance_moments_fn(teacher, student, padding, strategy)
    total = None
    for start in range(0, len(images), batch_size):
        moments = shd.to_host(moments_of(params, put(images[start : start + batch_size])))
        total = moments if total is None else merge_moments(total, moments)
    if total is None:
        raise ValueError("compute_normalization needs at least one image")
    return normalization_from_moments(merge_moments(empty_moments(2), total))


# ---------------------------------------------------------------------------------------------
# Trained scales and the detector.

CHECKPOINT_SUBDIR = "checkpoints"
FORMAT = "ustad.students/1"


@dataclasses.dataclass(frozen=True)
class ScaleModel:
    """One receptive field's teacher, students and statistics, ready to score.

    Attributes:
      network: the patch network (teacher and students share it; parameters differ).
      params: ``{"teacher": vars, "students": vars stacked [M, ...], "mean": [D], "std": [D]}``.
      normalization: e/v statistics over the validation images.
      image_size: ``(H, W)`` the students were trained at.
      channels: C of the training images.
      padding: dense-extraction padding used in training.
    """

    network: PatchNet
    params: PyTree
    normalization: ScoreNormalization
    image_size: tuple[int, int]
    channels: int
    padding: str = "reflect"

    @property
    def patch_size(self) -> int:
        return self.network.patch_size

    @property
    def num_students(self) -> int:
        return int(jax.tree.leaves(self.params["students"])[0].shape[0])


def find_scale_dirs(workdir: str | os.PathLike) -> list[Path]:
    """The trained scales under ``workdir``: itself if it holds checkpoints, else its ``p*``
    sub-folders that do (the layout of a multi-scale training run)."""
    workdir = Path(workdir)
    if (workdir / CHECKPOINT_SUBDIR).is_dir():
        return [workdir]
    found = sorted(
        (d for d in workdir.glob("p*") if (d / CHECKPOINT_SUBDIR).is_dir()),
        key=lambda d: int(d.name[1:]) if d.name[1:].isdigit() else 0,
    )
    if not found:
        raise FileNotFoundError(
            f"no trained students in {workdir}: expected {workdir / CHECKPOINT_SUBDIR} or "
            f"p17/, p33/, p65/ sub-folders holding one (train with scripts/train_students.py)"
        )
    return found


def load_scale(workdir: str | os.PathLike) -> ScaleModel:
    """Load the newest complete checkpoint of one scale's students workdir."""
    from ustad.checkpointing import Checkpointer

    directory = Path(workdir) / CHECKPOINT_SUBDIR
    with Checkpointer(directory) as checkpointer:
        restored = checkpointer.restore_latest()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    step, state, meta = restored
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory} holds a {meta.get('format')!r} checkpoint, not {FORMAT}")
    if not meta.get("score_normalization"):
        raise ValueError(
            f"the students in {workdir} are not finished (step {step} of "
            f"{meta.get('total_steps')}, no score normalisation yet); resume training first"
        )
    network = PatchNet(
        layers=layers_from_json(meta["layers"]),
        patch_size=int(meta["patch_size"]),
        out_dim=int(meta["out_dim"]),
    )
    params = {
        "teacher": state["teacher"],
        "students": state["students"]["params"],
        "mean": state["target_stats"]["mean"],
        "std": state["target_stats"]["std"],
    }
    return ScaleModel(
        network=network,
        params=jax.tree.map(np.asarray, params),
        normalization=ScoreNormalization(**meta["score_normalization"]),
        image_size=tuple(int(s) for s in meta["image_size"]),
        channels=int(meta["channels"]),
        padding=meta.get("padding", "reflect"),
    )


def convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """``[..., C]`` images as ``channels`` channels: gray repeated to RGB, or RGB to luma."""
    if images.shape[-1] == channels:
        return images
    if images.shape[-1] == 1 and channels == 3:
        return np.repeat(images, 3, axis=-1)
    if images.shape[-1] == 3 and channels == 1:
        # Same luma weights as ustad.data.images.read_image(grayscale=True).
        return (images @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    raise ValueError(f"images have {images.shape[-1]} channels; the students expect {channels}")


def _resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if images.shape[1:3] == size:
        return images
    # The training images went through PIL's antialiased bilinear resize: use the same.
    from ustad.data.images import resize_image

    return np.stack([resize_image(image, size) for image in images])


class Detector:
    """Scores images with one or several trained scales (averaged, paper §5).

    Args:
      scales: trained scales (e.g. from :meth:`load`).
      reduction: image score from the map, ``"max"``, ``"mean"`` or ``"topk"``.
      top_k: pixels averaged by ``"topk"``.
      compute_dtype: ``jnp.bfloat16`` runs both networks in bfloat16 (parameters and the e/v
        arithmetic stay float32); ``None`` keeps float32.
      batch_size: images per jitted call; the last chunk is padded so nothing recompiles.
      mesh: a :func:`ustad.sharding.make_mesh` mesh to split batches over ``"data"`` (parameters
        replicated); ``None`` runs on the default device.
      member_strategy: how the students are run, see :func:`resolve_member_strategy`.
    """

    def __init__(
        self,
        scales: Sequence[ScaleModel],
        *,
        reduction: str = "max",
        top_k: int = 100,
        compute_dtype=None,
        batch_size: int = 8,
        mesh: jax.sharding.Mesh | None = None,
        member_strategy: str = "auto",
    ):
        if not scales:
            raise ValueError("Detector needs at least one trained scale")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.scales = tuple(scales)
        self.reduction, self.top_k = reduction, top_k
        strategy = resolve_member_strategy(member_strategy)
        self.mesh = mesh
        self.batch_size = batch_size
        if mesh is not None:
            ways = shd.data_size(mesh)
            self.batch_size = -(-batch_size // ways) * ways
        # Scales trained at the same size and channels share one jitted call.
        groups: dict[tuple, list[int]] = {}
        for i, scale in enumerate(self.scales):
            groups.setdefault((scale.image_size, scale.channels), []).append(i)
        self._groups = [(key, tuple(members)) for key, members in groups.items()]
        self._fns = {}
        self._params = {}
        for key, members in self._groups:
            networks = tuple(self.scales[i].network for i in members)
            if compute_dtype is not None:
                networks = tuple(n.clone(dtype=compute_dtype) for n in networks)
            paddings = tuple(self.scales[i].padding for i in members)
            params = tuple(
                dict(
                    self.scales[i].params, norm=np.asarray(self.scales[i].normalization, np.float32)
                )
                for i in members
            )
            self._fns[key] = _score_fn(networks, paddings, mesh, strategy)
            if mesh is None:
                self._params[key] = jax.device_put(params)
            else:
                self._params[key] = shd.put_replicated(params, mesh)

    @classmethod
    def load(cls, workdirs: str | os.PathLike | Sequence[str | os.PathLike], **kwargs) -> Detector:
        """Load trained students.

        Args:
          workdirs: a students workdir (one scale, or a multi-scale run with ``p*/``
            sub-folders) or a list of them; every scale found is averaged.
          **kwargs: see the class arguments.
        """
        if isinstance(workdirs, str | os.PathLike):
            workdirs = [workdirs]
        dirs = [d for w in workdirs for d in find_scale_dirs(w)]
        return cls([load_scale(d) for d in dirs], **kwargs)

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Anomaly maps and image scores.

        Args:
          images: ``[N, H, W, C]`` float in [0, 1], any size (resized to each scale's training
            size and the maps resized back) and 1 or 3 channels.

        Returns:
          ``(maps [N, H, W] float32, image_scores [N] float32)``.
        """
        images = np.asarray(images, np.float32)
        if images.ndim != 4:
            raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
        count, height, width = images.shape[:3]
        total = np.zeros((count, height, width), np.float32)
        for (size, channels), _ in self._groups:
            inputs = _resize_images(convert_channels(images, channels), size)
            maps = self._score_group((size, channels), inputs)
            if maps.shape[1:] != (height, width):
                maps = np.asarray(jax.image.resize(maps, (count, height, width), "linear"))
            total += maps
        maps = total / len(self.scales)
        scores = np.asarray(reduce_maps(jnp.asarray(maps), self.reduction, self.top_k))
        return maps, scores

    def _score_group(self, key, images: np.ndarray) -> np.ndarray:
        fn, params = self._fns[key], self._params[key]
        outputs = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            real = len(chunk)
            if real < self.batch_size:
                pad = np.repeat(chunk[-1:], self.batch_size - real, axis=0)
                chunk = np.concatenate([chunk, pad])
            chunk = jnp.asarray(chunk) if self.mesh is None else shd.shard_batch(chunk, self.mesh)
            outputs.append(shd.to_host(fn(params, chunk))[:real])
        return np.concatenate(outputs)


@functools.lru_cache(maxsize=16)
def _score_fn(networks, paddings, mesh, strategy):
    """The jitted multi-scale score, cached so equal detectors share one compilation."""
    fn = functools.partial(_score_sum, networks, paddings, strategy)
    if mesh is None:
        return jax.jit(fn)
    return jax.jit(
        fn,
        in_shardings=(shd.replicated(mesh), shd.batch_sharding(mesh)),
        out_shardings=shd.batch_sharding(mesh),
    )


def _score_sum(networks, paddings, strategy, params, images):
    """Σ over scales of the normalised score maps, ``[N, H, W]`` float32."""
    total = 0.0
    for network, padding, p in zip(networks, paddings, params, strict=True):
        error, variance = error_and_variance(network, network, p, images, padding, strategy)
        total = total + normalized_score(error, variance, p["norm"])
    return total
