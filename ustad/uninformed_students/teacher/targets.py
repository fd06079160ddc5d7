"""What T̂ distils from P: the target, its standardisation and its check (issue 23).

The paper's target is P's globally pooled head, ``P(p)``. For EfficientNet-Lite0 on T̂'s
native 17×17 or 32×32 window, five stride-2 stages shrink the map to 1×1 before the head, and
most of the 1,280 pooled dimensions are exactly 0 (1,161 at 17 px): a nearly dead target. A
target can instead be P's intermediate stages, each global-average-pooled over the window and
concatenated (stage 3 + 4 of Lite0: 40 + 80 = 120 dimensions), optionally standardised per
dimension with a mean and standard deviation measured once on a fixed sample of photo crops.
Those statistics are stored with the teacher (checkpoint metadata, teacher file header), so a
teacher says exactly what it was trained to predict.

:func:`target_fn` builds the pure ``(target_variables, images) -> [N, F]`` the train step
calls; ``target_variables`` is P's variables, plus ``mean`` and ``scale`` when standardised.
:func:`target_statistics` measures a sample's statistics and counts its dead (all-zero) and
near-constant dimensions; :func:`check_target` refuses (:class:`DeadTargetError`) or warns.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "HEAD",
    "NEAR_CONSTANT_RELATIVE_STD",
    "TARGET_CHECKS",
    "DeadTargetError",
    "TargetSpec",
    "check_target",
    "raw_features",
    "target_fn",
    "target_record",
    "target_statistics",
    "target_variables",
]


PyTree = Any

logger = logging.getLogger(__name__)


HEAD = "head"  # the paper's target: P's globally pooled head feature

TARGET_CHECKS = ("refuse", "warn")

# A dimension whose standard deviation over the sample is below this fraction of the median
# standard deviation of the live dimensions counts as near-constant: it carries (almost) no
# signal, and standardising it would blow its rounding noise up to unit variance.
NEAR_CONSTANT_RELATIVE_STD = 1e-3


class DeadTargetError(ValueError):
    """The distillation target has dead (all-zero) or near-constant dimensions."""


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """Which features of P are the target.

    Attributes:
      stages: P's stages, each pooled over the window and concatenated in this order; ``()``
        is the paper's pooled head (:data:`HEAD`).
      standardize: divide each dimension, less its sample mean, by its sample std.
    """

    stages: tuple[int, ...] = ()
    standardize: bool = False

    @property
    def name(self) -> str:
        stages = "+".join(f"stage{s}" for s in self.stages) if self.stages else HEAD
        return stages + (" standardised" if self.standardize else "")

    @property
    def is_paper(self) -> bool:
        """The target of teachers written before target options existed."""
        return not self.stages and not self.standardize

    @classmethod
    def from_record(cls, record: dict | None) -> TargetSpec:
        """From a teacher's ``target`` metadata (``None``: a teacher of the paper's target)."""
        if not record:
            return cls()
        return cls(tuple(int(s) for s in record.get("stages") or ()), bool(record["standardize"]))


def _pooled_stages(module, stages: tuple[int, ...], variables: PyTree, images: jax.Array):
    maps = module.apply(variables, jnp.asarray(images, jnp.float32), return_maps=True)
    missing = [s for s in stages if f"stage{s}" not in maps]
    if missing:
        raise ValueError(
            f"P has no stage {missing}; its maps are {sorted(k for k in maps if 'stage' in k)}"
        )
    pooled = [jnp.mean(maps[f"stage{s}"], axis=(1, 2)) for s in stages]
    return jax.lax.stop_gradient(jnp.concatenate(pooled, axis=-1))


@functools.lru_cache(maxsize=16)
def _stages_fn(backbone_module, stages: tuple[int, ...]):
    return functools.partial(_pooled_stages, backbone_module, stages)


def _raw_fn(backbone, stages: tuple[int, ...]):
    """P's head is ``backbone.features_fn`` itself (a backbone may have no ``module``)."""
    return _stages_fn(backbone.module, stages) if stages else backbone.features_fn


@functools.lru_cache(maxsize=16)
def _standardized_fn(raw: Callable):
    def features(target_variables, images):
        values = raw(target_variables["backbone"], images)
        return (values - target_variables["mean"]) / target_variables["scale"]

    return features


def target_fn(backbone, spec: TargetSpec) -> Callable[[PyTree, jax.Array], jax.Array]:
    """The target as a pure function ``(target_variables, images [N, H, W, 3]) -> [N, F]``.

    The same object for equal arguments (the jitted train step is cached on it). For the
    paper's target this is ``backbone.features_fn`` itself, with ``target_variables`` P's
    variables, exactly as before target options existed.

    Args:
      backbone: P (:class:`ustad.models.pretrained.Backbone`); stage targets need its module to
        accept ``return_maps=True`` and return ``"stage<s>"`` maps ``[N, h, w, C_s]``.
      spec: the target.
    """
    raw = _raw_fn(backbone, spec.stages)
    return _standardized_fn(raw) if spec.standardize else raw


def raw_features(backbone, spec: TargetSpec, images: np.ndarray, batch_size: int = 256):
    """``[N, F]`` float32 unstandardised target features of ``images`` (P's inputs)."""
    raw = jax.jit(_raw_fn(backbone, spec.stages))
    return np.concatenate(
        [
            np.asarray(raw(backbone.variables, jnp.asarray(images[i : i + batch_size])))
            for i in range(0, len(images), batch_size)
        ]
    )


def target_statistics(features: np.ndarray) -> dict:
    """Per-dimension statistics of a sample of raw target features, and its dead dimensions.

    Args:
      features: ``[N, F]`` raw targets on a fixed sample of crops.

    Returns:
      ``mean`` and ``std`` (``[F]`` float64 lists), ``scale`` (the std, 1 where a dimension is
      dead or near-constant, so that standardising leaves it at 0), ``dim`` F, ``dead_dims``
      (all values exactly 0), ``constant_dims`` (other dimensions with a std of 0),
      ``near_constant_dims`` (std below :data:`NEAR_CONSTANT_RELATIVE_STD` × the median std of
      the live dimensions, the constant ones included), ``total_variance`` (sum of the
      variances) and ``samples`` N.
    """
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"target sample must be [N >= 2, F], got shape {features.shape}")
    std = features.std(0)
    dead = np.all(features == 0, axis=0)
    live_std = std[(std > 0) & ~dead]
    floor = NEAR_CONSTANT_RELATIVE_STD * (np.median(live_std) if live_std.size else 0.0)
    near_constant = (std <= floor) & ~dead
    flat = dead | near_constant
    return {
        "dim": int(features.shape[1]),
        "samples": int(features.shape[0]),
        "mean": features.mean(0).tolist(),
        "std": std.tolist(),
        "scale": np.where(flat, 1.0, std).tolist(),
        "dead_dims": int(dead.sum()),
        "constant_dims": int((np.ptp(features, axis=0) == 0).sum() - dead.sum()),
        "near_constant_dims": int(near_constant.sum()),
        "total_variance": float(np.sum(std**2)),
    }


def check_target(statistics: dict, spec: TargetSpec, policy: str, where: str = "") -> None:
    """Refuse or loudly warn when the target has dead or near-constant dimensions.

    Args:
      statistics: :func:`target_statistics`.
      spec: the target (for the message).
      policy: ``"refuse"`` raises :class:`DeadTargetError`; ``"warn"`` logs a warning.
      where: what was measured (e.g. P's input size), for the message.

    Raises:
      DeadTargetError: ``policy="refuse"`` and some dimension is dead or near-constant.
    """
    if policy not in TARGET_CHECKS:
        raise ValueError(f"target check must be one of {TARGET_CHECKS}, got {policy!r}")
    dead, near = statistics["dead_dims"], statistics["near_constant_dims"]
    if not dead and not near:
        return
    message = (
        f"distillation target {spec.name}{where}: {dead} of {statistics['dim']} dimensions "
        f"are dead (all zero) and {near} near-constant on {statistics['samples']} photo crops "
        f"(total variance {statistics['total_variance']:.4g}); T̂ cannot learn them. Use live "
        f"stages (--config.target_stages=3,4) or a larger P input "
        f"(--config.backbone_input_scale)"
    )
    if policy == "refuse":
        raise DeadTargetError(message + ", or --config.target_check=warn to train anyway")
    logger.warning("WARNING: %s", message)


def target_variables(backbone_variables: PyTree, spec: TargetSpec, statistics: dict) -> PyTree:
    """What :func:`target_fn`'s function takes: P's variables, and the standardisation."""
    if not spec.standardize:
        return backbone_variables
    return {
        "backbone": backbone_variables,
        "mean": jnp.asarray(statistics["mean"], jnp.float32),
        "scale": jnp.asarray(statistics["scale"], jnp.float32),
    }


def target_record(spec: TargetSpec, statistics: dict, sample: dict) -> dict:
    """The ``target`` metadata a teacher keeps: the spec, the statistics, how they were got."""
    return {
        "stages": list(spec.stages),
        "standardize": spec.standardize,
        "name": spec.name,
        **statistics,
        "sample": sample,
    }
