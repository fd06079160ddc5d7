"""Scoring images with trained students (paper §5): trained scales and the detector.

A :class:`ScaleModel` is one receptive field's teacher, M students and score statistics, as
:func:`load_scale` reads them from a students workdir (see :mod:`ustad.uninformed_students.train`).
:class:`Detector` scores images with one or several scales: the normalised score ``ẽ + ṽ`` of
each scale at its training size, resized back and averaged over the scales, optionally smoothed
by a Gaussian (not in the paper; off by default), and an image score reduced from the map.

The per-pixel maths lives in :mod:`ustad.uninformed_students.maps` (targets, e and v) and
:mod:`ustad.ensemble` (their normalisation); what both families' detectors share in
:mod:`ustad.detector`. Scoring needs nothing from training.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from ustad import sharding as shd
from ustad.detector import MapDetector
from ustad.detector import score_sets as detector_score_sets
from ustad.ensemble import (
    normalized_score,
    resolve_member_strategy,
)
from ustad.program_cache import cached_jit
from ustad.tiling import DEFAULT_OVERLAP
from ustad.uninformed_students.checkpoints import ScaleModel, find_scale_dirs, load_scale
from ustad.uninformed_students.maps import (
    error_and_variance,
)

PyTree = Any


logger = logging.getLogger(__name__)


class Detector(MapDetector):
    """Scores images with one or several trained scales (averaged, paper §5).

    Args:
      scales: trained scales (e.g. from :meth:`load`).
      reduction: image score from the map, ``"max"`` (default), ``"mean"`` or ``"topk"`` (the
        mean of the ``top_k`` highest pixels). The paper defines none.
      top_k: pixels averaged by ``"topk"`` (≥ 1).
      smooth_sigma: σ in pixels of a Gaussian applied to each final map (after the scales are
        averaged, at the input images' size) before the image score; 0 (default, the paper) =
        none. An exported model (``ustad export``) scores as ``smooth_sigma=0``.
      compute_dtype: ``jnp.bfloat16`` runs both networks in bfloat16 (parameters and the e/v
        arithmetic stay float32); ``None`` keeps float32.
      batch_size: images per jitted call; the last chunk is padded so nothing recompiles.
      mesh: a :func:`ustad.sharding.make_mesh` mesh to split batches over ``"data"`` (parameters
        replicated); ``None`` runs on the default device.
      member_strategy: how the students are run, see
        :func:`ustad.ensemble.resolve_member_strategy`.
      tile, tile_overlap: score by tiles of the training size at the images' own resolution
        (:class:`ustad.detector.MapDetector`).
      drop_worse_than_chance: leave out of the mean of several scales those whose
        pseudo-anomaly AUROC (:attr:`ScaleModel.pseudo_auroc`) is below 0.5, with a warning
        (:func:`select_scales`); ``False`` averages every scale given.

    :meth:`score` (maps and image scores) is :meth:`ustad.detector.MapDetector.score`.
    """

    def __init__(
        self,
        scales: Sequence[ScaleModel],
        *,
        reduction: str = "max",
        top_k: int = 100,
        smooth_sigma: float = 0.0,
        compute_dtype=None,
        batch_size: int = 8,
        mesh: jax.sharding.Mesh | None = None,
        member_strategy: str = "auto",
        tile: bool = False,
        tile_overlap: float = DEFAULT_OVERLAP,
        drop_worse_than_chance: bool = True,
    ):
        scales = select_scales(scales) if drop_worse_than_chance else tuple(scales)
        super().__init__(
            scales, ScaleModel, "Uninformed Students", reduction=reduction, top_k=top_k,
            smooth_sigma=smooth_sigma, batch_size=batch_size, mesh=mesh, tile=tile,
            tile_overlap=tile_overlap,
        )  # fmt: skip
        self.scales = tuple(scales)
        strategy = resolve_member_strategy(member_strategy)
        # Scales trained at the same size and channels share one jitted call.
        groups: dict[tuple, list[int]] = {}
        for i, scale in enumerate(self.scales):
            groups.setdefault((scale.image_size, scale.channels), []).append(i)
        for (size, channels), members in groups.items():
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
            multiple = math.lcm(*(network.stride for network in networks))
            fn = _score_fn(networks, paddings, mesh, strategy)
            self._groups.append((size, channels, multiple, fn, (self.place(params),)))

    @classmethod
    def load(cls, workdirs: str | os.PathLike | Sequence[str | os.PathLike], **kwargs) -> Detector:
        """Load trained students (for either family's workdirs:
        :func:`ustad.families.load_detector`).

        Args:
          workdirs: a students workdir (one scale, or a multi-scale run with ``p*/``
            sub-folders) or a list of them; every scale found is averaged.
          **kwargs: see the class arguments.
        """
        if isinstance(workdirs, str | os.PathLike):
            workdirs = [workdirs]
        dirs = [d for w in workdirs for d in find_scale_dirs(w)]
        return cls([load_scale(d) for d in dirs], **kwargs)


def select_scales(scales: Sequence[ScaleModel]) -> tuple[ScaleModel, ...]:
    """The scales a multi-scale mean averages: all but those that rank held-out good images
    above the same images with planted defects (pseudo-anomaly AUROC < 0.5, measured after
    training), each left out with a one-line warning. A scale without the measurement (older
    workdirs) is kept; a single scale is always kept; when every scale would be left out, all
    are kept, with a warning.

    A mean of normalised maps gives every scale the same weight, so a scale that is worse than
    chance (issue 21: p = 17 at image AUROC 0.41 on a 54-image category) pulls the others down.
    """
    scales = tuple(scales)
    aurocs = [getattr(scale, "pseudo_auroc", None) for scale in scales]
    bad = [i for i, auroc in enumerate(aurocs) if auroc is not None and auroc < 0.5]
    if len(scales) < 2 or not bad:
        return scales
    names = ", ".join(f"p{scales[i].patch_size} ({aurocs[i]:.3f})" for i in bad)
    if len(bad) == len(scales):
        logger.warning(
            "every scale is worse than chance on held-out good images with planted defects "
            "(pseudo-defect image AUROC %s): averaging all of them anyway", names,
        )  # fmt: skip
        return scales
    logger.warning(
        "leaving %s out of the multi-scale mean: worse than chance on held-out good images "
        "with planted defects (pseudo-defect image AUROC < 0.5)", names,
    )  # fmt: skip
    return tuple(scale for i, scale in enumerate(scales) if i not in bad)


def score_sets(scales: Sequence[ScaleModel], images: np.ndarray, **detector_kwargs):
    """Anomaly maps and image scores of each scale and, with several, of their average (the
    paper's multi-scale score: the plain mean).

    Args:
      scales: trained :class:`ScaleModel` s.
      images: ``[N, H, W, C]`` float32 in [0, 1].
      **detector_kwargs: see :class:`Detector`.

    Returns:
      ``({name: [N, H, W] maps}, {name: [N] scores})``, names ``"p<p>"`` and ``"multiscale"``.
    """
    names = [f"p{scale.patch_size}" for scale in scales]
    make = functools.partial(Detector, **detector_kwargs)
    return detector_score_sets(make, scales, names, "multiscale", images)


@functools.lru_cache(maxsize=16)
def _score_fn(networks, paddings, mesh, strategy):
    """The jitted multi-scale score, cached so equal detectors share one compilation."""
    fn = functools.partial(_score_sum, networks, paddings, strategy)
    if mesh is None:  # the traced program is kept for the next process (program_cache.py)
        return cached_jit(fn, ("uninformed_students.score", networks, paddings, strategy))
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
