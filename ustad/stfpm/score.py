"""Scoring with trained STFPM students: the model, its checkpoint, a detector.

An STFPM workdir (written by :mod:`ustad.stfpm.train`) holds Orbax checkpoints under
``<workdir>/checkpoints/<step>/`` whose metadata say ``"family": "stfpm"``;
:func:`ustad.families.load_detector` dispatches on that to :class:`STFPMDetector`, so ``ustad
score`` and ``ustad evaluate`` take STFPM workdirs unchanged.

:class:`STFPMDetector` is a :class:`ustad.detector.MapDetector` (``score(images) -> (maps,
image_scores)``, ``batch_size``): images are resized to the training size, scored there
(:func:`ustad.stfpm.maps.anomaly_map`), and the maps resized back; several models are averaged.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ustad import sharding as shd
from ustad.detector import MapDetector
from ustad.detector import score_sets as detector_score_sets
from ustad.ensemble import resolve_member_strategy
from ustad.program_cache import cached_jit
from ustad.stfpm import maps as stfpm
from ustad.stfpm.checkpoints import STFPMModel, load_model
from ustad.stfpm.maps import level_scores
from ustad.tiling import DEFAULT_OVERLAP

PyTree = Any
# The strides of the pyramid levels divide 32 (the deepest level of either backbone is at
# stride 16): sizes that keep an image's aspect are rounded to it.
STRIDE_MULTIPLE = 32


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

    if mesh is None:  # the traced program is kept for the next process (program_cache.py)
        return cached_jit(fn, ("stfpm.score", network, image_size, score, combination, strategy))
    return jax.jit(
        fn,
        in_shardings=(shd.replicated(mesh), shd.replicated(mesh), shd.batch_sharding(mesh)),
        out_shardings=shd.batch_sharding(mesh),
    )


class STFPMDetector(MapDetector):
    """Scores images with one or several trained STFPM models (maps averaged).

    Args:
        models: trained models (e.g. from :func:`load_model`).
        reduction: image score from the map: ``"max"`` (the paper's codes), ``"mean"`` or
            ``"topk"``.
        top_k: pixels averaged by ``"topk"`` (≥ 1).
        smooth_sigma: σ in pixels of a Gaussian over each final map before the image score; 0
            (default) = none (as :class:`ustad.uninformed_students.score.Detector`).
        compute_dtype: accepted for :class:`ustad.uninformed_students.score.Detector`'s interface;
            only float32 is implemented (another dtype raises).
        batch_size: images per jitted call; the last chunk is padded so nothing recompiles.
        mesh: a :func:`ustad.sharding.make_mesh` mesh to split batches over ``"data"``.
        member_strategy: how the students are run (:func:`ustad.ensemble.resolve_member_strategy`).
        score, combination: override the models' own (e.g. to measure the paper's product and
            the sum from one trained model); None keeps them.
        tile, tile_overlap: score by tiles of the training size at the images' own resolution
            (:class:`ustad.detector.MapDetector`).
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
        tile: bool = False,
        tile_overlap: float = DEFAULT_OVERLAP,
    ):
        if compute_dtype is not None and jnp.dtype(compute_dtype) != jnp.float32:
            raise ValueError("STFPM scores in float32 only (drop --bf16)")
        super().__init__(
            models, STFPMModel, "STFPM", reduction=reduction, top_k=top_k,
            smooth_sigma=smooth_sigma, batch_size=batch_size, mesh=mesh, tile=tile,
            tile_overlap=tile_overlap,
        )  # fmt: skip
        self.models = tuple(models)
        strategy = resolve_member_strategy(member_strategy, network="pyramid")
        for model in self.models:
            model_score = score or model.score
            model_combination = combination or model.combination
            stfpm.check_score(model_score, model_combination)
            fn = _score_fn(
                model.network, model.image_size, model_score, model_combination, strategy, mesh
            )
            norm = model.normalization
            norm = np.zeros((len(model.network.levels), 4), np.float32) if norm is None else norm
            params = self.place((model.params, np.asarray(norm, np.float32)))
            size = tuple(model.image_size)
            self._groups.append((size, model.channels, STRIDE_MULTIPLE, fn, params))

    @classmethod
    def load(cls, workdirs, **kwargs) -> STFPMDetector:
        """Load STFPM workdirs (one path or a list); see the class arguments."""
        if isinstance(workdirs, str | os.PathLike):
            workdirs = [workdirs]
        return cls([load_model(w) for w in workdirs], **kwargs)


def score_sets(models: Sequence[STFPMModel], images: np.ndarray, **detector_kwargs):
    """Maps and image scores of each model and, with several, of their average: what
    ``ustad evaluate`` reports (:func:`ustad.uninformed_students.score.score_sets` for this family).

    Returns:
        ``({name: [N, H, W]}, {name: [N]})``, names ``"stfpm"`` (``"stfpm_m<M>"`` for an
        ensemble) and ``"average"``.
    """
    names = [model.name for model in models]
    make = functools.partial(STFPMDetector, **detector_kwargs)
    return detector_score_sets(make, models, names, "average", images)
