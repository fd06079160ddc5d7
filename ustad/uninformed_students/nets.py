"""Patch-descriptor networks of Uninformed Students (paper §1).

One network per receptive field p ∈ {17, 33, 65}: valid convolutions, no padding, no
normalisation, leaky ReLU (slope 5e-3) after every convolution but the last, 2×2 max pooling
with stride 2. A p×p patch maps to a single ``out_dim`` descriptor. The same parameters also
run on whole images in two dense modes (see :mod:`ustad.uninformed_students.dense`):

* ``"multipool"``: every pooling layer becomes Bailer et al.'s multi-pooling, the s² shifted
  poolings stacked on the batch axis (later layers treat them as batch);
* ``"atrous"``: pooling with stride 1 and every later layer dilated by the accumulated stride.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

LEAKY_SLOPE = 5e-3


MODES = ("patch", "multipool", "atrous")


@dataclass(frozen=True)
class Conv:
    kernel: int
    features: int


@dataclass(frozen=True)
class Pool:
    size: int = 2


# The paper's printed tables do not all reach a 1×1 output (p=17 conv1, p=65 last conv); these
# rows are the reading that does, and they match the parameter counts (3.0 M, 1.6 M, 2.3 M).
ARCHITECTURES: dict[int, tuple[Conv | Pool, ...]] = {
    17: (Conv(6, 128), Conv(5, 256), Conv(5, 256), Conv(4, 128)),
    33: (Conv(5, 128), Pool(), Conv(5, 256), Pool(), Conv(2, 256), Conv(4, 128)),
    65: (
        Conv(5, 128),
        Pool(),
        Conv(5, 128),
        Pool(),
        Conv(5, 256),
        Pool(),
        Conv(4, 256),
        Conv(1, 128),
    ),
}


def receptive_field(layers: Sequence[Conv | Pool]) -> int:
    """Side of the square input that a stack of valid layers maps to one output pixel."""
    size = 1
    for layer in reversed(layers):
        size = size + layer.kernel - 1 if isinstance(layer, Conv) else size * layer.size
    return size


def total_stride(layers: Sequence[Conv | Pool]) -> int:
    """Product of the pooling strides: dense extraction needs H, W divisible by it."""
    stride = 1
    for layer in layers:
        if isinstance(layer, Pool):
            stride *= layer.size
    return stride


def layers_to_json(layers: Sequence[Conv | Pool]) -> list[list]:
    """``[["conv", kernel, features] | ["pool", size], ...]`` for checkpoint metadata."""
    return [
        ["conv", layer.kernel, layer.features] if isinstance(layer, Conv) else ["pool", layer.size]
        for layer in layers
    ]


def layers_from_json(rows: Sequence[Sequence]) -> tuple[Conv | Pool, ...]:
    """Inverse of :func:`layers_to_json`."""
    return tuple(Conv(int(r[1]), int(r[2])) if r[0] == "conv" else Pool(int(r[1])) for r in rows)


def multi_max_pool(x: jax.Array, size: int) -> jax.Array:
    """Bailer et al.'s multi-pooling.

    Args:
      x: ``[B, H, W, C]``.
      size: pooling window and stride s.

    Returns:
      ``[s*s*B, H', W', C]`` with ``H' = (H - s + 1) // s``: the pooling of ``x`` shifted by
      every offset (oy, ox) ∈ [0, s)², stacked offset-major (oy outermost), all cropped to the
      size the largest offset allows.
    """
    height, width = x.shape[1], x.shape[2]
    out_h, out_w = (height - size + 1) // size, (width - size + 1) // size
    pooled = []
    for oy in range(size):
        for ox in range(size):
            shifted = x[:, oy : oy + out_h * size, ox : ox + out_w * size]
            pooled.append(nn.max_pool(shifted, (size, size), strides=(size, size)))
    return jnp.concatenate(pooled, axis=0)


def dilated_max_pool(x: jax.Array, size: int, dilation: int) -> jax.Array:
    """Stride-1 max pooling whose window taps are ``dilation`` pixels apart ([B,H,W,C])."""
    return lax.reduce_window(
        x,
        -jnp.inf,
        lax.max,
        window_dimensions=(1, size, size, 1),
        window_strides=(1, 1, 1, 1),
        padding="VALID",
        window_dilation=(1, dilation, dilation, 1),
    )


class PatchNet(nn.Module):
    """Patch-descriptor CNN ``T̂: R^{p×p×C} -> R^{out_dim}``.

    Attributes:
      layers: the layer table, e.g. ``ARCHITECTURES[65]`` (the last Conv's width is replaced by
        ``out_dim``).
      patch_size: nominal patch side p; a p×p input maps to one descriptor.
      out_dim: descriptor dimension d.
      dtype: computation dtype (parameters stay float32).
    """

    layers: tuple[Conv | Pool, ...]
    patch_size: int
    out_dim: int = 128
    dtype: jnp.dtype = jnp.float32

    @property
    def receptive_field(self) -> int:
        """Pixels that actually reach the output (the floor of odd-sized poolings drops the
        last row/column of the nominal patch: 32 of 33, 60 of 65)."""
        return receptive_field(self.layers)

    @property
    def stride(self) -> int:
        return total_stride(self.layers)

    @nn.compact
    def __call__(self, x: jax.Array, mode: str = "patch") -> jax.Array:
        """Apply the network.

        Args:
          x: ``[N, H, W, C]``. In ``"patch"`` mode H = W = p and the result is ``[N, out_dim]``;
            otherwise the raw dense map of the selected mode (see
            :mod:`ustad.uninformed_students.dense`).
          mode: ``"patch"``, ``"multipool"`` or ``"atrous"``.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "patch" and x.shape[1:3] != (self.patch_size, self.patch_size):
            raise ValueError(
                f"patch mode takes [N, {self.patch_size}, {self.patch_size}, C] patches, got "
                f"shape {x.shape}; use ustad.uninformed_students.dense.dense_apply for whole images"
            )
        x = x.astype(self.dtype)
        convs = [layer for layer in self.layers if isinstance(layer, Conv)]
        dilation = 1
        conv_index = 0
        for layer in self.layers:
            if isinstance(layer, Pool):
                if mode == "multipool":
                    x = multi_max_pool(x, layer.size)
                elif mode == "atrous":
                    x = dilated_max_pool(x, layer.size, dilation)
                    dilation *= layer.size
                else:
                    x = nn.max_pool(x, (layer.size, layer.size), strides=(layer.size,) * 2)
                continue
            last = conv_index == len(convs) - 1
            x = nn.Conv(
                self.out_dim if last else layer.features,
                (layer.kernel, layer.kernel),
                padding="VALID",
                kernel_dilation=(dilation, dilation),
                dtype=self.dtype,
                name=f"conv{conv_index + 1}",
            )(x)
            if not last:
                x = nn.leaky_relu(x, LEAKY_SLOPE)
            conv_index += 1
        if mode == "patch":
            return x[:, 0, 0, :]
        return x


def patch_net(
    patch_size: int,
    *,
    out_dim: int = 128,
    widths: float | Sequence[int] | None = None,
    dtype: jnp.dtype = jnp.float32,
) -> PatchNet:
    """The paper's patch network for receptive field ``patch_size``.

    Args:
      patch_size: p ∈ {17, 33, 65}.
      out_dim: descriptor dimension (128 in the paper).
      widths: ``None`` for the paper's channel counts; a float to scale every hidden width (e.g.
        ``1/16`` for tiny test nets); or one int per hidden convolution (all but the last).
      dtype: computation dtype.
    """
    if patch_size not in ARCHITECTURES:
        raise ValueError(f"patch_size must be one of {sorted(ARCHITECTURES)}, got {patch_size}")
    layers = ARCHITECTURES[patch_size]
    hidden = [i for i, layer in enumerate(layers) if isinstance(layer, Conv)][:-1]
    if widths is not None:
        if isinstance(widths, int | float):
            new = [max(1, round(layers[i].features * widths)) for i in hidden]
        else:
            new = [int(w) for w in widths]
            if len(new) != len(hidden):
                raise ValueError(
                    f"widths for p={patch_size} needs {len(hidden)} ints (one per hidden conv), "
                    f"got {len(new)}"
                )
        layers = list(layers)
        for i, width in zip(hidden, new, strict=True):
            layers[i] = Conv(layers[i].kernel, width)
        layers = tuple(layers)
    return PatchNet(layers=layers, patch_size=patch_size, out_dim=out_dim, dtype=dtype)


def patch_net_from_record(record) -> PatchNet:
    """The network a checkpoint's metadata or a teacher file's header describes (its
    ``"layers"`` as :func:`layers_to_json` wrote them, ``"patch_size"``, ``"out_dim"``)."""
    return PatchNet(
        layers=layers_from_json(record["layers"]),
        patch_size=int(record["patch_size"]),
        out_dim=int(record["out_dim"]),
    )
