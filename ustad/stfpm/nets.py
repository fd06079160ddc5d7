"""STFPM's networks: an ImageNet backbone cut after its pyramid levels, trainable or frozen.

STFPM (Wang et al., BMVC 2021) matches a frozen pretrained teacher and a randomly initialised
student of the *same* architecture at several feature levels. The modules here are the backbones
of :mod:`ustad.models` (their ``stage_maps``) cut after the deepest level used, with BatchNorm
in training mode (batch statistics, running averages updated) when called with ``train=True``,
as PyTorch's ``student.train()``. Their variables carry the full backbones' names, so the
pretrained variables of :func:`ustad.models.pretrained.load_pretrained` load into them (the
unused deeper layers dropped, see :func:`teacher_variables`).

Pyramids (strides 4, 8, 16, as in the paper):

* ``resnet18``: conv2_x, conv3_x, conv4_x (torchvision ``layer1..layer3``): 64, 128, 256
  channels. The paper's teacher; its ImageNet weights need a download (or a local file).
* ``efficientnet_lite0``: the last block of each stride 4, 8, 16: stage 2 (24 channels),
  stage 3 (40) and stage 5 (112; stage 4, 80 channels, has stride 16 too but is shallower).
  ImageNet weights from a pip package, so the offline default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ustad.models import efficientnet_lite, resnet

__all__ = [
    "BACKBONES",
    "EfficientNetLite0Pyramid",
    "ResNet18Pyramid",
    "pyramid_from_spec",
    "pyramid_net",
    "pyramid_spec",
    "teacher_variables",
]


PyTree = Any


BACKBONES = ("resnet18", "efficientnet_lite0")


class ResNet18Pyramid(nn.Module):
    """ResNet-18's stem and first stages; returns the outputs of ``levels``.

    Attributes:
        levels: stage numbers whose outputs are returned (1 = conv2_x / ``layer1``); the
            network stops after the deepest.
        widths: channels of the stem and of stages 1–4 (torchvision: 64, 64, 128, 256, 512);
            smaller widths make tiny test networks.
        blocks: residual blocks per stage (ResNet-18: 2).
        normalize: apply the ImageNet mean/std normalisation the pretrained weights expect.
        bn_momentum: Flax momentum of BatchNorm's running averages in training mode.
    """

    levels: tuple[int, ...] = (1, 2, 3)
    widths: tuple[int, ...] = resnet.RESNET18_WIDTHS
    blocks: int = 2
    normalize: bool = True
    bn_momentum: float = 0.9

    @property
    def level_names(self) -> tuple[str, ...]:
        return tuple(f"layer{level}" for level in self.levels)

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(2 ** (level + 1) for level in self.levels)

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> tuple[jax.Array, ...]:
        """Runs the network.

        Args:
            images: ``[N, H, W, 3]`` float RGB in [0, 1].
            train: BatchNorm on batch statistics, updating ``batch_stats`` (call ``apply`` with
                ``mutable=["batch_stats"]``); False uses the running averages.

        Returns:
            One ``[N, ceil(H/s), ceil(W/s), C_l]`` map per level, s = 4, 8, 16, 32 for stages
            1–4 and C_l = ``widths[level]``.
        """
        maps = resnet.stage_maps(
            images,
            last_stage=max(self.levels),
            widths=self.widths,
            blocks=self.blocks,
            normalize=self.normalize,
            train=train,
            bn_momentum=self.bn_momentum,
        )
        return tuple(maps[name] for name in self.level_names)


class EfficientNetLite0Pyramid(nn.Module):
    """EfficientNet-Lite0's stem and first stages; returns the outputs of ``levels``.

    Attributes:
        levels: stage numbers whose outputs are returned (1–7 as in
            :data:`ustad.models.efficientnet_lite.LITE0_STAGES`); the network stops after the
            deepest. Default 2, 3, 5: the last stage of each stride 4, 8, 16.
        stages: the (kernel, stride, expand ratio, channels, repeats) table; smaller ones make
            tiny test networks.
        stem: channels of the stem convolution (Lite0: 32).
        normalize: map [0, 1] inputs to the (x·255 − 127)/128 range the weights were trained on.
        bn_momentum: Flax momentum of the running averages in training mode. 0.9 (PyTorch's
            default 0.1) rather than the TF weights' 0.99: a student trained from scratch for
            a few hundred steps would otherwise keep 15 % of its initial statistics.
    """

    levels: tuple[int, ...] = (2, 3, 5)
    stages: tuple[tuple[int, int, int, int, int], ...] = efficientnet_lite.LITE0_STAGES
    stem: int = 32
    normalize: bool = True
    bn_momentum: float = 0.9

    @property
    def level_names(self) -> tuple[str, ...]:
        return tuple(f"stage{level}" for level in self.levels)

    @property
    def strides(self) -> tuple[int, ...]:
        cumulative = np.cumprod([2] + [stage[1] for stage in self.stages])
        return tuple(int(cumulative[level]) for level in self.levels)

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> tuple[jax.Array, ...]:
        """Runs the network.

        Args:
            images: ``[N, H, W, 3]`` float RGB in [0, 1].
            train: BatchNorm on batch statistics (``mutable=["batch_stats"]``), else running
                averages.

        Returns:
            One ``[N, ceil(H/s), ceil(W/s), C]`` map per level (Lite0: s = 4, 8, 16 and
            C = 24, 40, 112 for the default levels).
        """
        maps = efficientnet_lite.stage_maps(
            images,
            last_stage=max(self.levels),
            stages=self.stages,
            stem=self.stem,
            normalize=self.normalize,
            train=train,
            bn_momentum=self.bn_momentum,
        )
        return tuple(maps[name] for name in self.level_names)


def pyramid_net(backbone: str, *, tiny: bool = False, levels: Sequence[int] | None = None):
    """The pyramid network of a backbone.

    Args:
        backbone: ``"resnet18"`` or ``"efficientnet_lite0"``.
        tiny: a narrow, shallow variant for tests and smoke runs (no pretrained weights fit).
        levels: the stages returned; default the three of the module docstring.

    Returns:
        A :class:`ResNet18Pyramid` or :class:`EfficientNetLite0Pyramid`.
    """
    kwargs = {} if levels is None else {"levels": tuple(int(level) for level in levels)}
    if backbone == "resnet18":
        if tiny:
            kwargs.update(widths=(8, 8, 16, 16, 32), blocks=1)
        return ResNet18Pyramid(**kwargs)
    if backbone == "efficientnet_lite0":
        if tiny:
            table = tuple(
                (k, s, min(e, 2), max(c // 8, 4), 1)
                for k, s, e, c, _ in efficientnet_lite.LITE0_STAGES
            )
            kwargs.update(stages=table, stem=8)
        return EfficientNetLite0Pyramid(**kwargs)
    raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")


def pyramid_spec(module: nn.Module) -> dict:
    """The JSON-serialisable description of a pyramid network, for checkpoint metadata."""
    if isinstance(module, ResNet18Pyramid):
        return {
            "backbone": "resnet18",
            "levels": list(module.levels),
            "widths": list(module.widths),
            "blocks": module.blocks,
            "normalize": module.normalize,
            "bn_momentum": module.bn_momentum,
        }
    if isinstance(module, EfficientNetLite0Pyramid):
        return {
            "backbone": "efficientnet_lite0",
            "levels": list(module.levels),
            "stages": [list(stage) for stage in module.stages],
            "stem": module.stem,
            "normalize": module.normalize,
            "bn_momentum": module.bn_momentum,
        }
    raise TypeError(f"not a pyramid network: {type(module).__name__}")


def pyramid_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """Inverse of :func:`pyramid_spec`."""
    spec = dict(spec)
    backbone = spec.pop("backbone")
    spec["levels"] = tuple(spec["levels"])
    if backbone == "resnet18":
        spec["widths"] = tuple(spec["widths"])
        return ResNet18Pyramid(**spec)
    if backbone == "efficientnet_lite0":
        spec["stages"] = tuple(tuple(int(v) for v in stage) for stage in spec["stages"])
        return EfficientNetLite0Pyramid(**spec)
    raise ValueError(f"unknown backbone {backbone!r} in a model file")


def teacher_variables(module: nn.Module, full_variables: PyTree) -> PyTree:
    """The part of a full backbone's variables that ``module`` uses.

    Args:
        module: a pyramid network.
        full_variables: ``{"params", "batch_stats"}`` of the whole backbone (e.g. from
            :func:`ustad.models.pretrained.load_pretrained`), whose names the pyramid shares.

    Returns:
        ``module``'s variables: the deeper layers, head and classifier dropped.

    Raises:
        ValueError: a variable the pyramid needs is missing or has another shape (the weights
            are not this backbone's).
    """
    template = jax.eval_shape(
        module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    )

    def pick(shape_node, full_node, path):
        if isinstance(shape_node, Mapping):
            if not isinstance(full_node, Mapping):
                raise ValueError(f"backbone weights: {'/'.join(path)} is not a module")
            missing = sorted(set(shape_node) - set(full_node))
            if missing:
                raise ValueError(
                    f"backbone weights lack {', '.join('/'.join((*path, m)) for m in missing)}"
                )
            return {k: pick(v, full_node[k], (*path, k)) for k, v in shape_node.items()}
        array = jnp.asarray(full_node, jnp.float32)
        if array.shape != shape_node.shape:
            raise ValueError(
                f"backbone weights: {'/'.join(path)} has shape {array.shape}, the pyramid "
                f"expects {shape_node.shape}"
            )
        return array

    return pick(dict(template), dict(full_variables), ())
