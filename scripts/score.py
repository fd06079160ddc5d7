"""Anomaly maps for a folder or glob of images with trained students (paper §5).

    python scripts/score.py --workdirs runs/students_p65 \\
        --images 'data/mvtec_ad/bottle/test/*/*.png' --out runs/students_p65/maps

Several ``--workdirs`` (or one multi-scale workdir) average their scales. For every image
``<rel>.png`` (its path relative to the images' common folder) this writes

* ``<out>/<rel>.npz``: ``anomaly_map [H, W] float32`` at the image's own size, ``score``;
* ``<out>/<rel>.png``: the image | the map over the image (one colour scale for the whole run);
* ``<out>/scores.csv``: ``path,score`` for all images.

Every file is written atomically (temporary file + rename). An unreadable image stops the run
before any scoring, with an error naming the file.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from pathlib import Path

from absl import app, flags

import ustad  # noqa: F401  (sets XLA flags before JAX starts a backend)
from ustad.io import atomic_write

FLAGS = flags.FLAGS
flags.DEFINE_list("workdirs", None, "students workdir(s); scales found in all are averaged")
flags.DEFINE_string("images", None, "image folder, glob pattern or single file")
flags.DEFINE_string("out", None, "output folder")
flags.DEFINE_integer("batch_size", 8, "images per jitted call")
flags.DEFINE_enum("reduction", "max", ["max", "mean", "topk"], "image score from the map")
flags.DEFINE_integer("top_k", 100, "pixels averaged by --reduction=topk")
flags.DEFINE_bool("bf16", False, "run the networks in bfloat16")
flags.DEFINE_float("vmin", None, "colour scale minimum (default: the run's minimum)")
flags.DEFINE_float("vmax", None, "colour scale maximum (default: the run's maximum)")
flags.mark_flags_as_required(["workdirs", "images", "out"])


_atomic_write = atomic_write


def overlay_panel(image, anomaly_map, vmin: float, vmax: float):
    """``[H, 2W, 3]`` uint8: the image | the colour-mapped map blended 50/50 over it."""
    import numpy as np
    from matplotlib import colormaps

    from ustad.data.images import to_uint8

    rgb = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
    scaled = np.clip((anomaly_map - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    heat = colormaps["inferno"](scaled)[..., :3].astype(np.float32)
    return to_uint8(np.concatenate([rgb, 0.5 * rgb + 0.5 * heat], axis=1))


def main(argv):
    del argv
    import numpy as np

    from ustad.data.images import encode_png, read_image, resolve_image_paths
    from ustad.scoring import Detector

    try:
        paths = resolve_image_paths(FLAGS.images)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    images = []
    for path in paths:
        try:
            images.append(read_image(path))
        except (FileNotFoundError, ValueError) as err:
            sys.exit(f"error: {err}")  # the message names the file

    import jax.numpy as jnp

    detector = Detector.load(
        FLAGS.workdirs,
        reduction=FLAGS.reduction,
        top_k=FLAGS.top_k,
        compute_dtype=jnp.bfloat16 if FLAGS.bf16 else None,
        batch_size=FLAGS.batch_size,
    )
    # Images of one size are scored together; each keeps its own size in the output.
    maps, scores = [None] * len(images), np.zeros(len(images), np.float32)
    by_size: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(image.shape, []).append(i)
    for indices in by_size.values():
        group_maps, group_scores = detector.score(np.stack([images[i] for i in indices]))
        for j, i in enumerate(indices):
            maps[i], scores[i] = group_maps[j], group_scores[j]

    vmin = FLAGS.vmin if FLAGS.vmin is not None else min(float(m.min()) for m in maps)
    vmax = FLAGS.vmax if FLAGS.vmax is not None else max(float(m.max()) for m in maps)
    out = Path(FLAGS.out)
    root = Path(os.path.commonpath([p.parent.resolve() for p in paths]))
    rows = []
    for path, image, anomaly_map, score in zip(paths, images, maps, scores, strict=True):
        rel = path.resolve().relative_to(root).with_suffix("")
        buffer = io.BytesIO()
        np.savez(buffer, anomaly_map=anomaly_map.astype(np.float32), score=np.float32(score))
        _atomic_write(out / f"{rel}.npz", buffer.getvalue())
        _atomic_write(out / f"{rel}.png", encode_png(overlay_panel(image, anomaly_map, vmin, vmax)))
        rows.append((str(path), f"{score:.6g}"))
    text = io.StringIO()
    csv.writer(text).writerows([("path", "score"), *rows])
    _atomic_write(out / "scores.csv", text.getvalue().encode())
    print(f"scored {len(paths)} images -> {out} (colour scale {vmin:.3g} … {vmax:.3g})")


if __name__ == "__main__":
    app.run(main)
