"""ResNet-18 (He et al., 2016) in Flax Linen, weight-compatible with torchvision.

The paper's pretrained network P is an ImageNet ResNet-18 whose 512-d globally average-pooled
feature the teacher is distilled from (paper.md §3). This module reproduces torchvision's
``resnet18``: BatchNorm uses its running statistics (eps 1e-5) unless called with
``train=True``, convolutions and max pooling pad symmetrically exactly as torchvision does, so a
converted torchvision state dict gives the same outputs.

:func:`stage_maps` is the network's body (normalisation, stem, stages) on its own, to be built
inside another module: STFPM's pyramid (:mod:`ustad.stfpm.nets`) is ResNet-18 cut after a stage,
narrower for tests, with BatchNorm in training mode for its students.
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
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BasicBlock",
    "Conv",
    "RESNET18_WIDTHS",
    "ResNet18",
    "convert_torchvision_resnet18",
    "load_resnet18",
    "stage_maps",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Channels of the stem and of stages 1-4 (torchvision's conv1, layer1..layer4).
RESNET18_WIDTHS = (64, 64, 128, 256, 512)


def _batch_norm(train: bool, momentum: float) -> functools.partial:
    """torch's ``BatchNorm2d`` (eps 1e-5): running statistics, or batch ones with ``train``.

    ``momentum`` is Flax's, the weight of the old running average (torch's 0.1 is 0.9 here).
    """
    return functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=momentum, epsilon=1e-5
    )


class Conv(nn.Module):
    """Bias-free 2-D convolution with symmetric zero padding, as torch's ``nn.Conv2d``.

    Its variables are those of ``nn.Conv(use_bias=False)`` (``kernel: [k, k, C_in, features]``).
    When the map is smaller than the kernel (layer4 of a 33×33 patch is 2×2), XLA's CPU backend
    swaps the convolution's operands and runs a path ~40× slower than on a larger map (1.6 s
    instead of 0.04 s for 64×2×2×512 → 512); such tiny maps are convolved as an explicit
    patch-matrix product instead, which computes the same sums.

    Attributes:
        features: output channels.
        kernel_size: k (square kernels).
        strides: stride in both directions.
        padding: zeros added on every side.
    """

    features: int
    kernel_size: int
    strides: int = 1
    padding: int = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``x: [N, H, W, C]`` to ``[N, (H + 2·padding - k) / strides + 1, .., features]``."""
        k, s, p = self.kernel_size, self.strides, self.padding
        kernel = self.param(
            "kernel",
            nn.initializers.variance_scaling(2.0, "fan_out", "normal"),  # torchvision's init
            (k, k, x.shape[-1], self.features),
        )
        if min(x.shape[1:3]) >= k:
            return jax.lax.conv_general_dilated(
                x, kernel, (s, s), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        out_h, out_w = (x.shape[1] - k) // s + 1, (x.shape[2] - k) // s + 1
        taps = [
            x[:, i : i + s * (out_h - 1) + 1 : s, j : j + s * (out_w - 1) + 1 : s]
            for i in range(k)
            for j in range(k)
        ]
        # Tap order (i, j, channel) matches the row-major flattening of the HWIO kernel.
        patches = jnp.concatenate(taps, axis=-1)
        return patches @ kernel.reshape(-1, self.features)


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with an identity (or 1×1 projection) shortcut.

    Attributes:
        features: output channels.
        strides: stride of the first convolution and of the projection shortcut.
        bn_momentum: Flax momentum of BatchNorm's running averages (used with ``train``).
    """

    features: int
    strides: int = 1
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps ``x: [N, H, W, C]`` to ``[N, H/strides, W/strides, features]``.

        ``train``: BatchNorm on batch statistics, updating ``batch_stats``; False (frozen, the
        default) uses the running averages.
        """
        norm = _batch_norm(train, self.bn_momentum)
        y = Conv(self.features, 3, self.strides, padding=1, name="conv1")(x)
        y = nn.relu(norm(name="bn1")(y))
        y = Conv(self.features, 3, padding=1, name="conv2")(y)
        y = norm(name="bn2")(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = Conv(self.features, 1, self.strides, name="downsample_conv")(x)
            shortcut = norm(name="downsample_bn")(shortcut)
        return nn.relu(y + shortcut)


def stage_maps(
    images: jax.Array,
    *,
    last_stage: int = 4,
    widths: Sequence[int] = RESNET18_WIDTHS,
    blocks: int = 2,
    normalize: bool = True,
    train: bool = False,
    bn_momentum: float = 0.9,
) -> dict[str, jax.Array]:
    """ResNet-18's normalisation, stem and stages 1..``last_stage``, without the head.

    Call it inside a module's ``nn.compact`` method: the layers it creates become that module's
    children, named as in :class:`ResNet18` (``conv1``, ``bn1``, ``layer<stage>_<block>``), so a
    network cut early holds a subset of ResNet-18's variables and loads its weights.

    Args:
        images: ``[N, H, W, 3]`` float RGB in [0, 1].
        last_stage: the deepest stage built (1-4).
        widths: channels of the stem and of stages 1-4; narrower ones make tiny test networks.
        blocks: residual blocks per stage.
        normalize: apply the ImageNet mean/std normalisation torchvision's weights expect.
        train: BatchNorm on batch statistics (apply with ``mutable=["batch_stats"]``); False
            uses the running averages.
        bn_momentum: Flax momentum of BatchNorm's running averages.

    Returns:
        ``{"layer<s>": [N, ceil(H/2^(s+1)), ceil(W/2^(s+1)), widths[s]]}`` for s = 1..last_stage.
    """
    x = images.astype(jnp.float32)
    if normalize:
        x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    x = Conv(widths[0], 7, 2, padding=3, name="conv1")(x)
    x = nn.relu(_batch_norm(train, bn_momentum)(name="bn1")(x))
    # Padding with -inf (nn.max_pool's pad value) equals torch's max pool padding.
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    maps = {}
    for stage in range(1, last_stage + 1):
        for index in range(blocks):
            strides = 2 if stage > 1 and index == 0 else 1
            x = BasicBlock(widths[stage], strides, bn_momentum, name=f"layer{stage}_{index}")(
                x, train
            )
        maps[f"layer{stage}"] = x
    return maps


class ResNet18(nn.Module):
    """torchvision's ResNet-18, frozen unless called with ``train=True``.

    Attributes:
        num_classes: size of the final linear layer (ImageNet: 1000).
        normalize: apply the ImageNet mean/std normalisation torchvision's weights expect.
        bn_momentum: Flax momentum of BatchNorm's running averages (used with ``train``).
    """

    num_classes: int = 1000
    normalize: bool = True
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(
        self, images: jax.Array, *, train: bool = False, return_maps: bool = False
    ) -> jax.Array | dict[str, jax.Array]:
        """Runs the network.

        Args:
            images: ``[N, H, W, 3]`` float RGB in [0, 1] (any size ≥ 1; 224 is ImageNet's).
            train: BatchNorm on batch statistics, updating ``batch_stats`` (apply with
                ``mutable=["batch_stats"]``); False (frozen, the default) uses the running
                averages.
            return_maps: also return the intermediate feature maps and the logits.

        Returns:
            ``pooled: [N, 512]``, the globally average-pooled last feature map; or, with
            ``return_maps``, a dict with ``"layer1" [N, H/4, W/4, 64]``, ``"layer2" [.., /8, 128]``,
            ``"layer3" [.., /16, 256]``, ``"layer4" [.., /32, 512]`` (sizes rounded up),
            ``"pooled" [N, 512]`` and ``"logits" [N, num_classes]``.
        """
        maps = stage_maps(
            images, normalize=self.normalize, train=train, bn_momentum=self.bn_momentum
        )
        pooled = jnp.mean(maps["layer4"], axis=(1, 2))
        # The classifier is always built so torchvision's fc weights have somewhere to go; under
        # jit it costs nothing when only `pooled` is used.
        logits = nn.Dense(self.num_classes, name="fc")(pooled)
        if not return_maps:
            return pooled
        return {**maps, "pooled": pooled, "logits": logits}


def _torch_module(path: tuple[str, ...]) -> str:
    """Flax module path -> torchvision module name (``layer2_0/downsample_bn`` ->
    ``layer2.0.downsample.1``)."""
    names = []
    for part in path:
        if part.startswith("layer"):
            part = part.replace("_", ".")
        names.append(
            {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(part, part)
        )
    return ".".join(names)


def convert_torchvision_resnet18(
    state_dict: Mapping[str, np.ndarray],
    *,
    num_classes: int = 1000,
    source: str = "state dict",
) -> dict:
    """Converts torchvision's ``resnet18`` state dict to :class:`ResNet18` variables.

    Args:
        state_dict: torchvision keys (``conv1.weight``, ``bn1.running_mean``,
            ``layer1.0.conv1.weight``, ``layer2.0.downsample.0.weight``, ``fc.bias``, ...) to
            arrays in torch layout (conv OIHW, linear [out, in]); ``num_batches_tracked``
            entries may be present or not.
        num_classes: rows of ``fc.weight``.
        source: names the state dict (usually its path) in error messages.

    Returns:
        ``{"params": ..., "batch_stats": ...}`` of float32 jax arrays (kernels HWIO).

    Raises:
        convert.StateDictMismatchError: listing every missing, unexpected and mis-shaped key.
    """
    module = ResNet18(num_classes=num_classes)
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


def load_resnet18(path: str | os.PathLike, *, num_classes: int = 1000) -> tuple[ResNet18, dict]:
    """Loads a torchvision ResNet-18 weight file (torch zip, legacy or safetensors).

    Args:
        path: the weight file, e.g. torchvision's ``resnet18-f37072fd.pth``.
        num_classes: rows of the file's ``fc.weight``.

    Returns:
        ``(module, variables)`` for ``module.apply(variables, images)``.

    Raises:
        torch_io.WeightFileError: the file is not a readable weight file.
        convert.StateDictMismatchError: its keys or shapes are not ResNet-18's.
    """
    state_dict = torch_io.load_state_dict(path)
    variables = convert_torchvision_resnet18(
        state_dict, num_classes=num_classes, source=os.fspath(path)
    )
    return ResNet18(num_classes=num_classes), variables
