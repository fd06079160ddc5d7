"""The scorer that :mod:`ustad.deploy` exports: ``images → (anomaly_map, image_score)``.

One pure function of the input images (and, for the JAX artefact, of the weights), written in
plain ``jax.lax``/``jax.numpy`` so that a converter sees only convolutions, slices, maxima,
reshapes and arithmetic:

* each patch network runs densely from its layer table (no Flax): valid convolutions, leaky
  ReLU, and every 2×2 pooling as the maximum of its strided slices, either as multi-pooling
  (offsets stacked on the batch axis, unwarped at the end) or à trous (stride 1, later layers
  dilated), exactly as :mod:`ustad.uninformed_students.dense` computes them;
* per scale the normalised score ``ẽ + ṽ`` (:mod:`ustad.uninformed_students.maps`), at the scale's
  training size (other input sizes are resized in the graph), averaged over the scales;
* the image score reduced from the map (max by default).

With the same weights it equals :meth:`ustad.uninformed_students.score.Detector.score` to float
rounding (tests/test_deploy.py). Why not the Flax networks themselves: jax2onnx (0.13 to 0.17) swaps
``flax.linen.max_pool`` for a keyword-only stand-in that the networks' positional call breaks,
and turns ``lax.reduce_window`` on NHWC arrays into a 4-D MaxPool that ONNX Runtime refuses.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ustad.detector import reduce_maps
from ustad.ensemble import normalized_score, predictive_variance, regression_error
from ustad.host_images import LUMA
from ustad.uninformed_students.dense import padding_widths, unwarp
from ustad.uninformed_students.nets import LEAKY_SLOPE, Conv, Pool

PyTree = Any


METHODS = ("multipool", "atrous")


# Luma weights of ustad.data.images.read_image(grayscale=True) and ustad.uninformed_students.score.


def net_weights(variables: PyTree, layers: Sequence[Conv | Pool]) -> list[tuple]:
    """``[(kernel [k, k, C_in, C_out], bias [C_out]), ...]`` of a patch network's variables,
    in layer order (a leading member axis is kept)."""
    params = variables["params"]
    count = sum(isinstance(layer, Conv) for layer in layers)
    return [
        (np.asarray(params[f"conv{i + 1}"]["kernel"]), np.asarray(params[f"conv{i + 1}"]["bias"]))
        for i in range(count)
    ]


def _max_pool(x: jax.Array, size: int, dilation: int, stride: int) -> jax.Array:
    """Max over the ``size × size`` taps ``dilation`` apart, every ``stride`` pixels, as the
    maximum of strided slices ([B, H, W, C], VALID)."""
    span = (size - 1) * dilation + 1
    out_h = (x.shape[1] - span) // stride + 1
    out_w = (x.shape[2] - span) // stride + 1
    result = None
    for i in range(size):
        for j in range(size):
            tap = jax.lax.slice(
                x,
                (0, i * dilation, j * dilation, 0),
                (
                    x.shape[0],
                    i * dilation + (out_h - 1) * stride + 1,
                    j * dilation + (out_w - 1) * stride + 1,
                    x.shape[3],
                ),
                (1, stride, stride, 1),
            )
            result = tap if result is None else jnp.maximum(result, tap)
    return result


def _multi_pool(x: jax.Array, size: int) -> jax.Array:
    """Multi-pooling ([B, H, W, C] → [s²·B, H', W', C], offsets outermost, oy before ox), as
    :func:`ustad.uninformed_students.nets.multi_max_pool`."""
    out_h, out_w = (x.shape[1] - size + 1) // size, (x.shape[2] - size + 1) // size
    pooled = []
    for oy in range(size):
        for ox in range(size):
            shifted = x[:, oy : oy + out_h * size, ox : ox + out_w * size]
            pooled.append(_max_pool(shifted, size, 1, size))
    return jnp.concatenate(pooled, axis=0)


def dense_net(
    layers: Sequence[Conv | Pool],
    weights: Sequence[tuple],
    padded: jax.Array,
    *,
    method: str,
    height: int,
    width: int,
) -> jax.Array:
    """A patch network run densely on padded images.

    Args:
      layers: the layer table (:attr:`ustad.uninformed_students.nets.PatchNet.layers`).
      weights: :func:`net_weights` of one network.
      padded: ``[N, H + p − 1, W + p − 1, C]`` images padded as
        :func:`ustad.uninformed_students.dense.dense_apply` pads them.
      method: ``"multipool"`` or ``"atrous"``.
      height, width: H and W.

    Returns:
      ``[N, H, W, D]`` descriptors, those of :func:`ustad.uninformed_students.dense.dense_apply`.
    """
    batch = padded.shape[0]
    x, dilation, conv_index = padded, 1, 0
    strides = tuple(layer.size for layer in layers if isinstance(layer, Pool))
    for layer in layers:
        if isinstance(layer, Pool):
            if method == "multipool":
                x = _multi_pool(x, layer.size)
            else:
                x = _max_pool(x, layer.size, dilation, 1)
                dilation *= layer.size
            continue
        kernel, bias = weights[conv_index]
        x = jax.lax.conv_general_dilated(
            x,
            jnp.asarray(kernel, x.dtype),
            (1, 1),
            "VALID",
            rhs_dilation=(dilation, dilation),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        x = x + jnp.asarray(bias, x.dtype)
        conv_index += 1
        if conv_index < len(weights):
            # jax.nn.leaky_relu's own formula; jax2onnx 0.13 cannot convert the call itself.
            x = jnp.where(x >= 0, x, LEAKY_SLOPE * x)
    if method == "atrous":
        return x[:, :height, :width]
    stride = int(np.prod(strides)) if strides else 1
    x = x[:, : height // stride, : width // stride]
    return unwarp(x, batch, strides) if strides else x


def scale_weights(scale) -> dict:
    """The arrays one :class:`ustad.uninformed_students.checkpoints.ScaleModel` scores with, as
    :func:`make_scorer`
    takes them: ``{"teacher": [(kernel, bias)], "students": [(kernel [M, ...], bias [M, ...])],
    "mean": [D], "std": [D], "norm": [4]}`` (float32 NumPy)."""
    layers = scale.network.layers
    return {
        "teacher": net_weights(scale.params["teacher"], layers),
        "students": net_weights(scale.params["students"], layers),
        "mean": np.asarray(scale.params["mean"], np.float32),
        "std": np.asarray(scale.params["std"], np.float32),
        "norm": np.asarray(scale.normalization, np.float32),
    }


def teacher_sha256(scale) -> str:
    """SHA-256 (hex) of a scale's teacher parameters: every convolution's kernel then bias,
    in layer order, as little-endian float32 C-order bytes."""
    digest = hashlib.sha256()
    for kernel, bias in net_weights(scale.params["teacher"], scale.network.layers):
        for array in (kernel, bias):
            digest.update(np.ascontiguousarray(array, "<f4").tobytes())
    return digest.hexdigest()


def _convert_channels(images: jax.Array, channels: int) -> jax.Array:
    if images.shape[-1] == channels:
        return images
    if images.shape[-1] == 1 and channels == 3:
        return jnp.concatenate([images] * 3, axis=-1)
    if images.shape[-1] == 3 and channels == 1:
        return jnp.sum(images * jnp.asarray(LUMA, images.dtype), axis=-1, keepdims=True)
    raise ValueError(f"images have {images.shape[-1]} channels; a scale expects {channels}")


def _scale_score(scale, weights: dict, images: jax.Array, method: str) -> jax.Array:
    """``ẽ + ṽ`` of one scale, ``[N, H, W]`` at the images' size."""
    layers, padding = scale.network.layers, scale.padding
    height, width = images.shape[1:3]
    before, after = padding_widths(scale.network)
    padded = jnp.pad(images, ((0, 0), (before, after), (before, after), (0, 0)), mode=padding)

    def run(net_weights_):
        return dense_net(layers, net_weights_, padded, method=method, height=height, width=width)

    targets = (run(weights["teacher"]) - weights["mean"]) / weights["std"]
    # One straight chain of convolutions per student, unrolled when traced: jax2onnx 0.13–0.17
    # converts vmapped convolutions (grouped, member-batched kernels) to wrong numbers, and a
    # scan becomes an ONNX Loop that ONNX Runtime does not optimise across.
    students = weights["students"]
    outputs = jnp.stack(
        [run([(k[m], b[m]) for k, b in students]) for m in range(students[0][0].shape[0])]
    )
    error = regression_error(outputs, targets)
    variance = predictive_variance(outputs)
    return normalized_score(error, variance, weights["norm"])


def make_scorer(
    scales: Sequence,
    *,
    size: tuple[int, int],
    reduction: str = "max",
    top_k: int = 100,
    method: str = "multipool",
):
    """The multi-scale scorer as a pure function ``score(weights, images)``.

    Args:
      scales: :class:`ustad.uninformed_students.checkpoints.ScaleModel` s (their arrays are read
      from ``weights``).
      size: ``(H, W)`` of the input images; a scale trained at another size gets them resized
        in the graph (antialiased bilinear) and its map resized back (bilinear).
      reduction, top_k: the image score, see :func:`ustad.detector.reduce_maps`.
      method: dense extraction, ``"multipool"`` or ``"atrous"``.

    Returns:
      ``score(weights, images) -> (anomaly_map [N, H, W], image_score [N])``, float32, with
      ``weights = [scale_weights(s) for s in scales]`` and ``images [N, H, W, C]`` float32 in
      [0, 1] (C converted per scale, gray↔RGB, as the Detector converts it).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    size = tuple(int(s) for s in size)

    def score(weights, images):
        images = images.astype(jnp.float32)
        total = 0.0
        for scale, scale_weights_ in zip(scales, weights, strict=True):
            x = _convert_channels(images, scale.channels)
            if tuple(scale.image_size) != size:
                shape = (x.shape[0], *scale.image_size, x.shape[-1])
                x = jnp.clip(jax.image.resize(x, shape, "linear", antialias=True), 0.0, 1.0)
            maps = _scale_score(scale, scale_weights_, x, method)
            if tuple(scale.image_size) != size:
                maps = jax.image.resize(maps, (maps.shape[0], *size), "linear")
            total = total + maps
        maps = total / len(scales)
        return maps, reduce_maps(maps, reduction, top_k)

    return score
