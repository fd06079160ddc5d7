"""Fast dense descriptor extraction (Bailer et al., BMVC 2017; paper §2).

The descriptor of the p×p patch centred at every pixel of an image, computed without running the
patch network once per pixel. Two exact methods share one entry point:

* ``"multipool"``: each s×s/s pooling becomes multi-pooling (the s² shifted poolings stacked on
  the batch axis); after the last layer the stacked offsets are *unwarped* (transpose + reshape)
  back into H×W order.
* ``"atrous"``: pooling with stride 1 and every later layer dilated by the accumulated stride; the
  output is already in H×W order.

Both equal per-patch evaluation up to float rounding (tests/test_dense.py).

**Alignment.** A p×p patch net sees only its top-left R×R pixels, R = ``module.receptive_field``
(17 for p = 17; the floor of 2×2 pooling on odd sides makes it 32 for p = 33 and 60 for p = 65).
The image is padded by ``a = R // 2`` rows/columns at the top/left and ``p − 1 − a`` at the
bottom/right, so the descriptor of pixel (r, c) sees rows r − a … r − a + R − 1: centred exactly
on the pixel for odd R (p = 17) and half a pixel up-left of it for even R (p = 33: r − 16 … r + 15;
p = 65: r − 30 … r + 29), the closest a window of even side can be. (Padding (p − 1)/2 on every
side, as the paper's "pad by (p−1)/2" reads, would centre p = 65's window 2.5 px up-left of its
pixel, offsetting its maps from the masks and from the other scales in a multi-scale average.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ustad.uninformed_students.nets import PatchNet, Pool

PADDING_MODES = ("reflect", "constant", "edge", "symmetric")


# "none": the input already carries its margin (``before`` + ``after`` = p − 1 pixels per axis,
# :func:`padding_widths`), e.g. a crop of a padded image (:func:`crop_with_context`); the output
# is (H − p + 1) × (W − p + 1) and equals the full image's descriptors at those pixels.
PREPADDED = "none"


METHODS = ("multipool", "atrous")


# Measured in benchmarks/dense_extraction.py (RESULTS.md): multi-pooling is the faster exact
# method on CPU and GPU for the paper's networks, so it is the default.
DEFAULT_METHOD = "multipool"


def _input_channels(variables) -> int | None:
    params = variables.get("params", variables) if hasattr(variables, "get") else variables
    try:
        return int(params["conv1"]["kernel"].shape[-2])
    except (KeyError, TypeError, IndexError):
        return None


def check_dense_inputs(module: PatchNet, variables, images_shape, *, patch_size, padding, method):
    """Validate a dense-extraction request, raising ``ValueError`` that says what to change."""
    if patch_size != module.patch_size:
        raise ValueError(
            f"patch_size={patch_size} but the module's receptive field is {module.patch_size}"
        )
    if padding not in PADDING_MODES and padding != PREPADDED:
        raise ValueError(
            f"padding must be one of {PADDING_MODES} (numpy.pad modes) or {PREPADDED!r} (the "
            f"input already padded), got {padding!r}"
        )
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if len(images_shape) != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {tuple(images_shape)}")
    _, height, width, channels = images_shape
    if padding == PREPADDED:
        margin = module.patch_size - 1
        if height <= margin or width <= margin:
            raise ValueError(
                f"padding={PREPADDED!r} expects images carrying their {margin}-pixel margin "
                f"(p − 1 for p={patch_size}), got {height}×{width}"
            )
        height, width = height - margin, width - margin
    stride = module.stride
    if height % stride or width % stride:
        what = "image size" if padding != PREPADDED else "output size (input − (p − 1))"
        raise ValueError(
            f"{what} {height}×{width} must be a multiple of {stride} (the product of the "
            f"pooling strides for p={patch_size}); resize or crop to e.g. "
            f"{-(-height // stride) * stride}×{-(-width // stride) * stride}"
        )
    half = max(padding_widths(module))
    if padding in ("reflect", "symmetric") and (height <= half or width <= half):
        raise ValueError(
            f"{padding!r} padding by up to {half} needs images larger than {half} pixels, got "
            f"{height}×{width}; use padding='constant' or 'edge'"
        )
    expected = _input_channels(variables)
    if expected is not None and expected != channels:
        raise ValueError(
            f"images have {channels} channels but the network's first convolution expects "
            f"{expected}; convert the images (e.g. grayscale↔RGB) or use a matching network"
        )


def padding_widths(module: PatchNet) -> tuple[int, int]:
    """``(before, after)`` padding of each spatial axis for ``module`` (see the module
    docstring): ``before = R // 2``, ``after = p − 1 − before``; their sum is p − 1."""
    before = module.receptive_field // 2
    return before, module.patch_size - 1 - before


def _pad(images: jax.Array, module: PatchNet, padding: str) -> jax.Array:
    if padding == PREPADDED:
        return images
    before, after = padding_widths(module)
    return jnp.pad(images, ((0, 0), (before, after), (before, after), (0, 0)), mode=padding)


def pad_images(images, module: PatchNet, padding: str = "reflect"):
    """The images padded as :func:`dense_apply` pads them (numpy in, numpy out; jax likewise).

    A crop of the result (:func:`crop_with_context`) fed with ``padding="none"`` gives exactly
    the full image's descriptors of the crop's pixels.
    """
    before, after = padding_widths(module)
    widths = ((0, 0), (before, after), (before, after), (0, 0))
    if isinstance(images, jax.Array):
        return jnp.pad(images, widths, mode=padding)
    import numpy as np

    return np.pad(images, widths, mode=padding)


def crop_with_context(padded, top: int, left: int, size: tuple[int, int], module: PatchNet):
    """The crop of output pixels ``[top, top + h) × [left, left + w)`` with its receptive-field
    margin, from images padded by :func:`pad_images`: ``padded[:, top : top + h + p − 1,
    left : left + w + p − 1]``. Its descriptors under ``padding="none"`` equal the full image's
    at those pixels (exact-context crops)."""
    height, width = size
    margin = module.patch_size - 1
    return padded[:, top : top + height + margin, left : left + width + margin]


def unwarp(stacked: jax.Array, batch: int, strides: tuple[int, ...]) -> jax.Array:
    """Undo the offset stacking of multi-pooling.

    Args:
      stacked: ``[prod(s_i²)·N, Qh, Qw, D]``, offsets of the last pooling outermost.
      batch: N.
      strides: pooling strides in network order (s_1, …, s_l).

    Returns:
      ``[N, Qh·S, Qw·S, D]`` with S = prod(s_i); pixel r = S·q + Σ_i o_i·prod_{j<i} s_j.
    """
    levels = len(strides)
    _, qh, qw, dim = stacked.shape
    shape = []
    for s in reversed(strides):
        shape += [s, s]
    x = stacked.reshape(*shape, batch, qh, qw, dim)
    oy_axes = [2 * i for i in range(levels)]  # o_l … o_1, most significant first
    ox_axes = [2 * i + 1 for i in range(levels)]
    n_axis = 2 * levels
    x = x.transpose(n_axis, n_axis + 1, *oy_axes, n_axis + 2, *ox_axes, n_axis + 3)
    total = 1
    for s in strides:
        total *= s
    return x.reshape(batch, qh * total, qw * total, dim)


@functools.partial(jax.jit, static_argnames=("module", "padding", "method"))
def _dense(module: PatchNet, variables, images, padding: str, method: str):
    batch, height, width, _ = images.shape
    if padding == PREPADDED:
        height, width = height - (module.patch_size - 1), width - (module.patch_size - 1)
    padded = _pad(images, module, padding)
    if method == "atrous":
        # The floor of odd-sized poolings makes the true receptive field smaller than p (32 of
        # 33, 60 of 65): the extra rows at the end belong to no patch.
        return module.apply(variables, padded, mode="atrous")[:, :height, :width]
    stride = module.stride
    out = module.apply(variables, padded, mode="multipool")
    out = out[:, : height // stride, : width // stride]
    strides = tuple(layer.size for layer in module.layers if isinstance(layer, Pool))
    if not strides:
        return out
    return unwarp(out, batch, strides)


def dense_apply(
    module: PatchNet,
    variables,
    images: jax.Array,
    *,
    patch_size: int | None = None,
    padding: str = "reflect",
    method: str | None = None,
) -> jax.Array:
    """Dense patch descriptors for every pixel.

    Args:
      module: a :class:`~ustad.uninformed_students.nets.PatchNet`.
      variables: its variables (``{"params": ...}``).
      images: ``[N, H, W, C]``; H and W multiples of ``module.stride`` (8 for p=65, 4 for p=33).
      patch_size: p; checked against the module when given.
      padding: how the image is padded (p − 1 in all per axis, see :func:`padding_widths`;
        a numpy.pad mode name), or ``"none"``: the images already carry that margin and the
        output is ``(H − p + 1) × (W − p + 1)`` (exact-context crops, :func:`crop_with_context`).
      method: ``"multipool"`` or ``"atrous"``; ``None`` uses :data:`DEFAULT_METHOD`.

    Returns:
      ``[N, H, W, out_dim]``: the descriptor of the p×p patch ``padded[r:r+p, c:c+p]`` of each
      pixel (r, c), whose R×R window is centred on the pixel to within half a pixel (module
      docstring, :func:`padding_widths`).
    """
    method = method or DEFAULT_METHOD
    check_dense_inputs(
        module,
        variables,
        images.shape,
        patch_size=module.patch_size if patch_size is None else patch_size,
        padding=padding,
        method=method,
    )
    return _dense(module, variables, images, padding, method)


def extract_patches(images: jax.Array, module: PatchNet, padding: str = "reflect") -> jax.Array:
    """Every p×p patch of the images padded as :func:`dense_apply` pads them, for per-patch
    reference evaluation.

    Args:
      images: ``[N, H, W, C]``.
      module: the patch network (its p and receptive field fix the padding).

    Returns:
      ``[N, H, W, p, p, C]`` (memory grows with p²: use on small images).
    """
    patch_size = module.patch_size
    padded = _pad(images, module, padding)
    _, height, width, _ = images.shape
    rows = jnp.arange(height)[:, None] + jnp.arange(patch_size)[None, :]  # [H, p]
    cols = jnp.arange(width)[:, None] + jnp.arange(patch_size)[None, :]  # [W, p]
    return padded[:, rows[:, None, :, None], cols[None, :, None, :]]


def per_patch_apply(
    module: PatchNet, variables, images: jax.Array, *, padding: str = "reflect", chunk: int = 4096
) -> jax.Array:
    """Reference: the patch network run on every patch separately (slow; for tests/benchmarks).

    Args:
      images: ``[N, H, W, C]``.

    Returns:
      ``[N, H, W, out_dim]``.
    """
    batch, height, width, channels = images.shape
    p = module.patch_size
    patches = extract_patches(images, module, padding).reshape(-1, p, p, channels)
    apply = jax.jit(lambda v, x: module.apply(v, x))
    outs = [apply(variables, patches[i : i + chunk]) for i in range(0, patches.shape[0], chunk)]
    return jnp.concatenate(outs).reshape(batch, height, width, -1)
