"""Anomaly maps for image files on disk: what ``ustad score`` writes.

For every image ``<rel>`` (its path relative to the images' common folder, extension kept, so
``x.png`` and ``x.jpg`` side by side stay two outputs) this writes

* ``<out>/<rel>.npz``: ``anomaly_map [H, W] float32`` at the image's own size, ``score``;
* ``<out>/<rel>.overlay.png``: the image | the map over the image (one colour scale for the run);
* ``<out>/scores.csv``: ``path,score`` for all images;
* ``<out>/scoring.json``: what scored them and how (``settings``: the image score, the
  smoothing), when given.

Every image is read before any is scored (an unreadable one stops the run with an error naming
it) and every file is written atomically (temporary file + rename).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ustad.data.images import encode_png, read_image, to_uint8
from ustad.io import atomic_write
from ustad.metric_writer import progress


def output_names(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Each image's path relative to the images' common folder, extension kept.

    Raises:
        ValueError: two inputs would give the same output (the same file listed twice).
    """
    resolved = [Path(p).resolve() for p in paths]
    root = Path(os.path.commonpath([p.parent for p in resolved]))
    names = [p.relative_to(root) for p in resolved]
    seen: dict[Path, Path] = {}
    for name, path in zip(names, paths, strict=True):
        if name in seen:
            raise ValueError(f"{path} and {seen[name]} would write the same output {name}")
        seen[name] = Path(path)
    return names


def overlay_panel(image: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float):
    """The image | the colour-mapped map blended 50/50 over it.

    Args:
        image: ``[H, W, C]`` float32 in [0, 1], C = 1 or 3.
        anomaly_map: ``[H, W]``.
        vmin, vmax: the colour scale.

    Returns:
        ``[H, 2W, 3]`` uint8.
    """
    from matplotlib import colormaps

    rgb = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
    scaled = np.clip((anomaly_map - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    heat = colormaps["inferno"](scaled)[..., :3].astype(np.float32)
    return to_uint8(np.concatenate([rgb, 0.5 * rgb + 0.5 * heat], axis=1))


def score_files(
    detector,
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    images: Sequence[np.ndarray] | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    settings: dict | None = None,
) -> tuple[list[np.ndarray], np.ndarray, tuple[float, float]]:
    """Score image files and write their maps, overlays and ``scores.csv`` under ``out``.

    Args:
        detector: a :class:`ustad.uninformed_students.score.Detector`, or an exported model
            (:class:`ustad.deploy.ExportedDetector`; anything with ``batch_size`` and
            ``score(images) -> (maps, scores)``).
        paths: image files (any size; images of one size are scored together).
        out: output folder.
        images: the images already read (``[H_i, W_i, C]`` float32 in [0, 1]); default: read
            ``paths`` here.
        vmin, vmax: the overlays' colour scale; default the run's minimum and maximum.
        settings: JSON-ready facts written to ``<out>/scoring.json`` with the colour scale
            (e.g. the workdirs and :attr:`ustad.uninformed_students.score.Detector.settings`); None
            writes none.

    Returns:
        ``(maps, scores, (vmin, vmax))``: ``[H_i, W_i]`` maps and ``[N]`` scores in input order.

    Raises:
        FileNotFoundError, ValueError: an unreadable image (named), or clashing output names.
    """
    names = output_names(paths)
    images = [read_image(path) for path in paths] if images is None else images
    maps, scores = [None] * len(images), np.zeros(len(images), np.float32)
    by_size: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(image.shape, []).append(i)
    with progress(len(images), desc="scoring", unit="img") as bar:
        for indices in by_size.values():
            for start in range(0, len(indices), detector.batch_size):
                chunk = indices[start : start + detector.batch_size]
                chunk_maps, chunk_scores = detector.score(np.stack([images[i] for i in chunk]))
                for j, i in enumerate(chunk):
                    maps[i], scores[i] = chunk_maps[j], chunk_scores[j]
                bar.update(len(chunk))
    vmin = min(float(m.min()) for m in maps) if vmin is None else vmin
    vmax = max(float(m.max()) for m in maps) if vmax is None else vmax
    out = Path(out)
    for name, image, anomaly_map, score in zip(names, images, maps, scores, strict=True):
        buffer = io.BytesIO()
        np.savez(buffer, anomaly_map=anomaly_map.astype(np.float32), score=np.float32(score))
        atomic_write(out / f"{name}.npz", buffer.getvalue())
        overlay = overlay_panel(image, anomaly_map, vmin, vmax)
        atomic_write(out / f"{name}.overlay.png", encode_png(overlay))
    text = io.StringIO()
    rows = [(str(path), f"{score:.6g}") for path, score in zip(paths, scores, strict=True)]
    csv.writer(text, lineterminator="\n").writerows([("path", "score"), *rows])
    atomic_write(out / "scores.csv", text.getvalue().encode())
    if settings is not None:
        record = dict(settings, images=len(paths), vmin=vmin, vmax=vmax)
        atomic_write(out / "scoring.json", (json.dumps(record, indent=2) + "\n").encode())
    return maps, scores, (vmin, vmax)
