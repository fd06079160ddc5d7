"""Input pipeline: deterministic minibatches of in-memory arrays, and random patch sampling.

Batch order depends only on `(seed, epoch)`, so a run resumed at epoch e (and batch b, via
`start_batch`) sees exactly the batches the interrupted run would have seen.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

from ustad.data.images import load_images

PyTree = Any


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: `[num_examples]` int64, a function of (seed, epoch)."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def num_batches(num_examples: int, batch_size: int, drop_remainder: bool = True) -> int:
    """Batches per epoch."""
    full, rest = divmod(num_examples, batch_size)
    return full + (1 if rest and not drop_remainder else 0)


def data_axis_size(sharding: jax.sharding.NamedSharding) -> int:
    """How many ways `sharding` splits the leading (batch) dimension."""
    spec = sharding.spec
    if len(spec) == 0 or spec[0] is None:
        return 1
    axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    return math.prod(sharding.mesh.shape[axis] for axis in axes)


def iterate_batches(
    data: PyTree,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
    sharding: jax.sharding.NamedSharding | None = None,
    start_batch: int = 0,
) -> Iterator[PyTree]:
    """Yields the minibatches of one epoch.

    Args:
        data: an array or a pytree (dict, tuple, ...) of arrays sharing the leading dimension
            N, e.g. `{"image": [N, H, W, C], "label": [N]}`.
        batch_size: examples per batch (global, over all devices).
        seed: shuffling seed.
        epoch: epoch number; with `seed` it fixes the order (`epoch_permutation`).
        shuffle: False keeps the stored order.
        drop_remainder: drop the last incomplete batch; otherwise it is yielded, smaller.
        sharding: if given, each batch leaf becomes a `jax.Array` with this sharding, e.g.
            `NamedSharding(mesh, PartitionSpec("data"))` splits the batch over the mesh's
            "data" axis. Every batch size must be divisible by that axis size. In multi-process
            runs every process computes the same global batch (the order is deterministic) and
            places only its own shards.
        start_batch: skip the first batches of the epoch (to resume mid-epoch).

    Yields:
        Pytrees shaped like `data` with leading dimension `batch_size` (numpy arrays, or
        `jax.Array`s if `sharding` is given).
    """
    leaves, treedef = jax.tree.flatten(data)
    # One host copy up front: indexing a jax.Array per batch would transfer it every time.
    leaves = [np.asarray(leaf) for leaf in leaves]
    if not leaves:
        raise ValueError("data holds no arrays")
    num_examples = leaves[0].shape[0]
    for leaf in leaves:
        if leaf.shape[:1] != (num_examples,):
            raise ValueError(
                f"All arrays need the same leading dimension; got {[x.shape for x in leaves]}"
            )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    count = num_batches(num_examples, batch_size, drop_remainder)
    if sharding is not None:
        ways = data_axis_size(sharding)
        sizes = {min(batch_size, num_examples - b * batch_size) for b in range(count)}
        bad = sorted(s for s in sizes if s % ways)
        if bad:
            raise ValueError(
                f"Batch size(s) {bad} not divisible by the {ways} data shards of {sharding.spec}"
                + ("; use drop_remainder=True" if batch_size % ways == 0 else "")
            )
    order = epoch_permutation(num_examples, seed, epoch) if shuffle else np.arange(num_examples)
    for b in range(start_batch, count):
        idx = order[b * batch_size : (b + 1) * batch_size]
        batch = [leaf[idx] for leaf in leaves]
        if sharding is not None:
            batch = [jax.make_array_from_process_local_data(sharding, x, x.shape) for x in batch]
        yield jax.tree.unflatten(treedef, batch)


RngLike = int | np.random.Generator | jax.Array


def numpy_rng(rng: RngLike) -> np.random.Generator:
    """A numpy generator from an int seed, a generator (returned as is) or a JAX key.

    JAX keys (typed `jax.random.key` or raw uint32) seed numpy with their key data, so
    `jax.random.fold_in(key, step)` gives a reproducible, step-dependent stream.
    """
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, int | np.integer):
        return np.random.default_rng(int(rng))
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return np.random.default_rng(np.asarray(rng, np.uint32).ravel().tolist())


class PatchSampler:
    """Draws random square patches from a collection of images of any sizes.

    Patch positions are uniform over all valid positions in the whole collection (an image
    contributes in proportion to its number of positions), which is what "random crops of a
    dataset" means when image sizes differ.

    Example (teacher pretraining, resumable):
        sampler = PatchSampler.from_files("photos/*.jpg", patch_size=65)
        patches = sampler.sample(jax.random.fold_in(key, step), 64)  # [64, 65, 65, 3]

    Args:
        images: `[H_i, W_i, C]` arrays (same C); kept by reference, not copied.
        patch_size: default side p of the patches.
        names: optional names (paths) used in error messages.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        patch_size: int,
        *,
        names: Sequence[str] | None = None,
    ):
        if not images:
            raise ValueError("PatchSampler needs at least one image")
        names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
        channels = images[0].shape[-1]
        for image, name in zip(images, names, strict=True):
            if image.ndim != 3 or image.shape[-1] != channels:
                raise ValueError(f"{name}: expected [H, W, {channels}], got {image.shape}")
        self.images = list(images)
        self.names = names
        self.patch_size = patch_size
        self._check(patch_size)

    @classmethod
    def from_files(
        cls,
        source: str | os.PathLike | Sequence[str | os.PathLike],
        patch_size: int,
        *,
        image_size: int | Sequence[int] | None = None,
        grayscale: bool = False,
    ) -> PatchSampler:
        """Loads a folder, glob pattern (e.g. `"imgs/**/*.jpg"`) or list of image files.

        Args:
            source: see `ustad.data.images.resolve_image_paths`.
            patch_size: default patch side.
            image_size: resize every image to this size first; None keeps native sizes.
            grayscale: C = 1 instead of 3.
        """
        images, paths = load_images(source, image_size=image_size, grayscale=grayscale)
        return cls(images, patch_size, names=paths)

    def _check(self, patch_size: int) -> None:
        for image, name in zip(self.images, self.names, strict=True):
            if min(image.shape[:2]) < patch_size:
                raise ValueError(
                    f"{name} is {image.shape[0]}x{image.shape[1]}, smaller than the "
                    f"{patch_size}x{patch_size} patches"
                )

    def sample(self, rng: RngLike, batch_size: int, *, patch_size: int | None = None) -> np.ndarray:
        """Draws `batch_size` patches.

        Args:
            rng: int seed, numpy generator or JAX key; equal rngs give equal patches.
            batch_size: B.
            patch_size: override the default p (e.g. draw p + 2s to crop shifted copies).

        Returns:
            `[B, p, p, C]` array with the images' dtype.
        """
        p = self.patch_size if patch_size is None else patch_size
        if patch_size is not None:
            self._check(p)
        gen = numpy_rng(rng)
        valid = np.array([(h - p + 1) * (w - p + 1) for h, w, _ in (x.shape for x in self.images)])
        which = gen.choice(len(self.images), size=batch_size, p=valid / valid.sum())
        patches = []
        for i in which:
            height, width = self.images[i].shape[:2]
            top = gen.integers(0, height - p + 1)
            left = gen.integers(0, width - p + 1)
            patches.append(self.images[i][top : top + p, left : left + p])
        return np.stack(patches)


def sample_patches(
    images: Sequence[np.ndarray], patch_size: int, batch_size: int, rng: RngLike
) -> np.ndarray:
    """`[B, p, p, C]` random patches from `[H_i, W_i, C]` images; see `PatchSampler`."""
    return PatchSampler(images, patch_size).sample(rng, batch_size)
