"""Scoring with trained STFPM students: the model, its checkpoint, a detector.

An STFPM workdir (written by :mod:`ustad.train.stfpm`) holds Orbax checkpoints under
``<workdir>/checkpoints/<step>/`` whose metadata say ``"family": "stfpm"``;
:func:`ustad.scoring.load_scale` and :meth:`ustad.scoring.Detector.load` dispatch on that to
this module, so ``ustad score`` and ``ustad evaluate`` take STFPM workdirs unchanged.

:class:`STFPMDetector` has :class:`ustad.scoring.Detector`'s interface (``score(images) ->
(maps, image_scores)``, ``batch_size``): images are resized to the training size, scored there
(:func:`ustad.stfpm.anomaly_map`), and the maps resized back; several models are averaged.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ustad import sharding as shd
from ustad import stfpm
from ustad.score_maps import (
    check_scoring_options,
    combine_scales,
    map_members,
    resolve_member_strategy,
    scoring_settings,
)
from ustad.stfpm_nets import pyramid_from_spec

__all__ = [
    "STFPMDetector",
    "STFPMModel",
    "level_scores",
    "load_model",
    "model_from_checkpoint",
    "score_sets",
]

PyTree = Any
CHECKPOINT_SUBDIR = "checkpoints"


@dataclasses.dataclass(frozen=True)
class STFPMModel:
    """A trained STFPM teacher and M students, ready to score.

    Attributes:
        network: the pyramid network (teacher and students share it; parameters differ).
        params: ``{"teacher": vars, "students": {"params", "batch_stats"} stacked [M, ...]}``.
        image_size: ``(H, W)`` the students were trained at.
        score: ``"error"`` or ``"error_variance"`` (:func:`ustad.stfpm.anomaly_map`).
        combination: ``"product"``, ``"sum"`` or ``"mean"`` over the levels.
        normalization: ``[L, 4]`` float32 (e_μ, e_σ, v_μ, v_σ) per level over the validation
            pixels, or None (then only ``score="error"`` is possible).
        channels: C of the images the networks take (3).
    """

    network: nn.Module
    params: PyTree
    image_size: tuple[int, int]
    score: str = "error"
    combination: str = "product"
    normalization: np.ndarray | None = None
    channels: int = 3
    family: ClassVar[str] = stfpm.FAMILY

    @property
    def num_students(self) -> int:
        return int(jax.tree.leaves(self.params["students"])[0].shape[0])

    @property
    def name(self) -> str:
        return "stfpm" if self.num_students == 1 else f"stfpm_m{self.num_students}"


def level_scores(
    network: nn.Module, params: PyTree, images: jax.Array, member_strategy: str = "vmap"
) -> tuple[list[jax.Array], list[jax.Array]]:
    """Per level, e_l and v_l of the students (trace-friendly).

    Args:
        network: the pyramid network.
        params: as :attr:`STFPMModel.params`.
        images: ``[N, H, W, 3]`` in [0, 1].
        member_strategy: ``"vmap"`` or ``"sequential"`` over the students.

    Returns:
        ``(errors, variances)``: lists of ``[N, h_l, w_l]`` float32.
    """
    teacher_maps = jax.lax.stop_gradient(network.apply(params["teacher"], images))
    student_maps = map_members(
        lambda variables, x: network.apply(variables, x),
        params["students"],
        images,
        strategy=member_strategy,
    )
    return stfpm.ensemble_level_scores(teacher_maps, student_maps)


def model_from_checkpoint(workdir, step: int, state: PyTree, meta: dict) -> STFPMModel:
    """An :class:`STFPMModel` from a restored checkpoint (what ``load_scale`` dispatches to).

    Raises:
        ValueError: another format, or an unfinished run.
        FloatingPointError: non-finite statistics (a diverged run).
    """
    if meta.get("format") != stfpm.FORMAT:
        raise ValueError(f"{workdir} holds a {meta.get('format')!r} model, not {stfpm.FORMAT}")
    if "score_normalization" not in meta:
        raise ValueError(
            f"the STFPM students in {workdir} are not finished (step {step} of "
            f"{meta.get('total_steps')}); resume training first"
        )
    normalization = np.asarray(meta["score_normalization"], np.float32)
    if not np.isfinite(normalization).all():
        raise FloatingPointError(
            f"the STFPM students in {workdir}: the score statistics are not finite (training "
            f"diverged); retrain in a new workdir with a lower --config.learning_rate"
        )
    students = state["students"]
    return STFPMModel(
        network=pyramid_from_spec(meta["network"]),
        params=jax.tree.map(
            np.asarray,
            {
                "teacher": state["teacher"],
                "students": {"params": students["params"], "batch_stats": students["batch_stats"]},
            },
        ),
        image_size=tuple(int(s) for s in meta["image_size"]),
        score=meta.get("score", "error"),
        combination=meta.get("combination", "product"),
        normalization=normalization,
        channels=int(meta.get("channels", 3)),
    )


def load_model(workdir: str | os.PathLike) -> STFPMModel:
    """Load the newest finished checkpoint of an STFPM workdir."""
    from ustad.checkpointing import Checkpointer

    directory = Path(workdir) / CHECKPOINT_SUBDIR
    with Checkpointer(directory) as checkpointer:
        restored = checkpointer.restore_latest()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    return model_from_checkpoint(workdir, *restored)


@functools.lru_cache(maxsize=16)
def _score_fn(network, image_size, score, combination, strategy, mesh):
    def fn(params, normalization, images):
        errors, variances = level_scores(network, params, images, strategy)
        return stfpm.anomaly_map(
            errors,
            variances,
            image_size,
            score=score,
            combination=combination,
            normalization=normalization,
        )

    if mesh is None:
        return jax.jit(fn)
    return jax.jit(
        fn,
        in_shardings=(shd.replicated(mesh), shd.replicated(mesh), shd.batch_sharding(mesh)),
        out_shardings=shd.batch_sharding(mesh),
    )


class STFPMDetector:
    """Scores images with one or several trained STFPM models (maps averaged).

    Args:
        models: trained models (e.g. from :func:`load_model`).
        reduction: image score from the map: ``"max"`` (the paper's codes), ``"mean"`` or
            ``"topk"``.
        top_k: pixels averaged by ``"topk"`` (≥ 1).
        smooth_sigma: σ in pixels of a Gaussian over each final map before the image score; 0
            (default) = none (as :class:`ustad.scoring.Detector`).
        compute_dtype: accepted for :class:`ustad.scoring.Detector`'s interface; only float32
            is implemented (another dtype raises).
        batch_size: images per jitted call; the last chunk is padded so nothing recompiles.
        mesh: a :func:`ustad.sharding.make_mesh` mesh to split batches over ``"data"``.
        member_strategy: how the students are run (:func:`ustad.scoring.resolve_member_strategy`).
        score, combination: override the models' own (e.g. to measure the paper's product and
            the sum from one trained model); None keeps them.
    """

    def __init__(
        self,
        models: Sequence[STFPMModel],
        *,
        reduction: str = "max",
        top_k: int = 100,
        smooth_sigma: float = 0.0,
        compute_dtype=None,
        batch_size: int = 8,
        mesh: jax.sharding.Mesh | None = None,
        member_strategy: str = "auto",
        score: str | None = None,
        combination: str | None = None,
    ):
        if not models:
            raise ValueError("STFPMDetector needs at least one trained model")
        other = [type(m).__name__ for m in models if not isinstance(m, STFPMModel)]
        if other:
            raise ValueError(
                f"cannot average STFPM models with {', '.join(other)} (another family): score "
                f"each family's workdirs separately"
            )
        if compute_dtype is not None and jnp.dtype(compute_dtype) != jnp.float32:
            raise ValueError("STFPM scores in float32 only (drop --bf16)")
        check_scoring_options(reduction, top_k, smooth_sigma)
        self.models = tuple(models)
        self.reduction, self.top_k, self.smooth_sigma = reduction, top_k, float(smooth_sigma)
        self.mesh = mesh
        self.batch_size = batch_size
        if mesh is not None:
            ways = shd.data_size(mesh)
            self.batch_size = -(-batch_size // ways) * ways
        strategy = resolve_member_strategy(member_strategy)
        self._fns, self._params = [], []
        for model in self.models:
            model_score = score or model.score
            model_combination = combination or model.combination
            stfpm.check_score(model_score, model_combination)
            self._fns.append(
                _score_fn(
                    model.network, model.image_size, model_score, model_combination, strategy, mesh
                )
            )
            norm = model.normalization
            norm = np.zeros((len(model.network.levels), 4), np.float32) if norm is None else norm
            placed = (model.params, np.asarray(norm, np.float32))
            self._params.append(
                jax.device_put(placed) if mesh is None else shd.put_replicated(placed, mesh)
            )

    @classmethod
    def load(cls, workdirs, **kwargs) -> STFPMDetector:
        """Load STFPM workdirs (one path or a list); see the class arguments."""
        if isinstance(workdirs, str | os.PathLike):
            workdirs = [workdirs]
        return cls([load_model(w) for w in workdirs], **kwargs)

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Anomaly maps and image scores.

        Args:
            images: ``[N, H, W, C]`` float in [0, 1] (or uint8/uint16), C = 1 or 3, any size
                (resized to each model's training size, the maps resized back).

        Returns:
            ``(maps [N, H, W] float32, image_scores [N] float32)``.
        """
        from ustad.scoring import convert_channels

        def scorer(model, fn, params):
            def score(images):
                inputs = _resize(convert_channels(images, model.channels), model.image_size)
                return self._score_chunks(fn, params, inputs)

            return score

        scorers = map(scorer, self.models, self._fns, self._params)
        return combine_scales(
            images, list(scorers), len(self.models), smooth_sigma=self.smooth_sigma,
            reduction=self.reduction, top_k=self.top_k,
        )  # fmt: skip

    @property
    def settings(self) -> dict:
        """The scoring options, JSON-ready (as :attr:`ustad.scoring.Detector.settings`)."""
        return scoring_settings(self.reduction, self.top_k, self.smooth_sigma)

    def _score_chunks(self, fn, params, images: np.ndarray) -> np.ndarray:
        outputs = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            real = len(chunk)
            if real < self.batch_size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - real, 0)])
            chunk = jnp.asarray(chunk) if self.mesh is None else shd.shard_batch(chunk, self.mesh)
            outputs.append(shd.to_host(fn(*params, chunk))[:real])
        return np.concatenate(outputs)


def _resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if images.shape[1:3] == tuple(size):
        return images
    # The training images went through PIL's antialiased bilinear resize: use the same.
    from ustad.data.images import resize_image

    return np.stack([resize_image(image, size) for image in images])


def score_sets(models: Sequence[STFPMModel], images: np.ndarray, **detector_kwargs):
    """Maps and image scores of each model and, with several, of their average: what
    ``ustad evaluate`` reports (:func:`ustad.experiment.score_sets` for this family).

    Returns:
        ``({name: [N, H, W]}, {name: [N]})``, names ``"stfpm"`` (``"stfpm_m<M>"`` for an
        ensemble) and ``"average"``.
    """
    from ustad.experiment import _score_with_progress

    score_maps, image_scores = {}, {}
    for i, model in enumerate(models):
        name = model.name if model.name not in score_maps else f"{model.name}_{i}"
        detector = STFPMDetector([model], **detector_kwargs)
        score_maps[name], image_scores[name] = _score_with_progress(detector, images, name)
    if len(models) > 1:
        detector = STFPMDetector(list(models), **detector_kwargs)
        maps, scores = _score_with_progress(detector, images, "average")
        score_maps["average"], image_scores["average"] = maps, scores
    return score_maps, image_scores
