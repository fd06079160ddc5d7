"""Anomaly maps and decisions for image files on disk: what ``ustad score`` writes.

For every image ``<rel>`` (its path relative to the images' common folder, extension kept, so
``x.png`` and ``x.jpg`` side by side stay two outputs) this writes

* ``<out>/<rel>.npz`` (deflate-compressed): ``anomaly_map [H, W]`` at the image's own size
  (float32, lossless; or float16 with ``map_dtype="float16"``: half the size, ~3 significant
  digits) and ``score`` (float32);
* ``<out>/<rel>.mask.png``: with a threshold, the defect pixels (255) above the pixel threshold;
* ``<out>/<rel>.overlay.png``: the image | the map over the image with the threshold's contour
  (cyan) | a colour bar (the threshold marked); the colour scale is fixed by the calibration
  (:meth:`ustad.calibration.Calibration.colour_scale`), so a good image scored alone stays dark;
  without one, the run's minimum … maximum;
* ``<out>/scores.csv``: ``path,score`` and, with a threshold, :data:`DECISION_COLUMNS`;
* ``<out>/scoring.json``: what scored them and how, when given.

Every image is decoded once before any is scored (an unreadable one stops the run naming it,
writing nothing) and the output folder is checked to be writable first; then images are read
again and scored one batch at a time, a background thread decoding the next batches while the
current one is scored (:func:`ustad.image_batches.read_batches`: at most ``prefetch`` batches
ahead, so no more than a few batches are held at native size). Every file is written
atomically; when writing fails midway (a full disk), ``scores.csv`` lists the images done and the
error says how many.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import functools
import io
import json
import logging
import os
import queue
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ustad.calibration import Calibration
from ustad.data.images import encode_png, read_image
from ustad.decisions import Prediction, decide
from ustad.image_batches import PREFETCH_BATCHES, check_batches, read_batches
from ustad.io import atomic_write
from ustad.metric_writer import progress
from ustad.overlays import overlay_panel

logger = logging.getLogger(__name__)

DECISION_COLUMNS = (
    "normalized_score", "threshold", "is_anomalous", "defect_area_px", "defect_regions", "map",
    "mask",
)  # fmt: skip
# Resizing an image by more than this factor along an axis gets a warning: a defect of a few
# pixels vanishes when shrunk 8×, and an image blown up 8× holds no detail at the model's size.
EXTREME_RESIZE = 8.0
MAP_DTYPES = ("float32", "float16")
# Batches of outputs queued for the writer thread (encoding the overlays' PNGs and compressing
# the maps costs as much as scoring at 256²).
WRITE_BEHIND_BATCHES = 2
# Threads that draw the overlays when they wait for the run's colour scale (no calibration).
DRAWING_THREADS = 4


class ScoredFiles(NamedTuple):
    """What :func:`score_files` did: a row per image (the CSV's fields), ``[N]`` scores and the
    overlays' colour scale."""

    rows: list[dict]
    scores: np.ndarray
    colour_scale: tuple[float, float]


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


def check_writable(out: str | os.PathLike) -> None:
    """Raise ``ValueError`` unless files can be created in ``out`` (or, if it does not exist
    yet, in its nearest existing parent), before anything is scored; creates nothing."""
    out = Path(out).absolute()
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, not a folder")
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".ustad-write-test.")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(f"cannot write to {existing} (--out {out}): {error.strerror}") from None


def scan_images(paths: Sequence[str | os.PathLike]) -> list[tuple[int, int]]:
    """Decode every image once (nothing kept) and return each one's ``(H, W)``.

    Raises:
        FileNotFoundError, ValueError: an unreadable image (named).
    """
    return [read_image(path).shape[:2] for path in paths]


def warn_extreme_resizes(sizes, paths, input_sizes, limit: float = EXTREME_RESIZE) -> str | None:
    """One warning when scoring resizes any image by more than ``limit``× along an axis.

    Args:
        sizes: each image's ``(H, W)``.
        paths: the images, for the example named.
        input_sizes: the ``(H, W)`` the models score at.

    Returns:
        The warning, or None.
    """
    factors = [
        max(max(a / b, b / a) for hw in input_sizes for a, b in zip(size, hw, strict=True))
        for size in sizes
    ]
    extreme = [i for i, f in enumerate(factors) if f > limit]
    if not extreme:
        return None
    worst = max(extreme, key=factors.__getitem__)
    (h, w), (th, tw) = sizes[worst], input_sizes[0]
    message = (
        f"{len(extreme)} of {len(sizes)} images are resized by more than {limit:g}× to the "
        f"model's {th}×{tw} (H×W), up to {factors[worst]:.0f}× (e.g. {paths[worst]}, {h}×{w}): "
        f"defects a few pixels wide vanish when shrunk, and a tiny image has no detail to score; "
        f"crop or tile large images, or train at a size closer to theirs"
    )
    logger.warning("%s", message)
    return message


def _npz_bytes(anomaly_map: np.ndarray, score: float, map_dtype: str) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, anomaly_map=anomaly_map.astype(map_dtype), score=np.float32(score))
    return buffer.getvalue()


def _row(path, name, prediction: Prediction, j: int) -> dict:
    row = {"path": str(path), "score": f"{prediction.scores[j]:.6g}"}
    if prediction.threshold is not None:
        row |= {
            "normalized_score": f"{prediction.normalized[j]:.4f}",
            "threshold": f"{prediction.threshold:.6g}",
            "is_anomalous": str(bool(prediction.is_anomalous[j])).lower(),
            "defect_area_px": int(prediction.defect_area[j]),
            "defect_regions": int(prediction.regions[j]),
            "map": f"{name}.npz",
            "mask": f"{name}.mask.png",
        }
    return row


def _write_one(out, name, image, prediction, j, scale, map_dtype) -> None:
    atomic_write(
        out / f"{name}.npz", _npz_bytes(prediction.maps[j], prediction.scores[j], map_dtype)
    )
    mask = None if prediction.masks is None else prediction.masks[j]
    if mask is not None:
        atomic_write(out / f"{name}.mask.png", encode_png(mask.astype(np.uint8) * 255))
    panel = overlay_panel(image, prediction.maps[j], *scale, mask, prediction.pixel_threshold)
    atomic_write(out / f"{name}.overlay.png", encode_png(panel))


def _write_csv(out: Path, rows: list[dict]) -> None:
    columns = ["path", "score"] + (list(DECISION_COLUMNS) if len(rows[0]) > 2 else [])
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "scores.csv", text.getvalue().encode())


def _batches(sizes, batch_size):
    """Index batches of images of one size, in input order of each size's first image."""
    by_size: dict[tuple, list[int]] = {}
    for i, size in enumerate(sizes):
        by_size.setdefault(tuple(size), []).append(i)
    for indices in by_size.values():
        for start in range(0, len(indices), batch_size):
            yield indices[start : start + batch_size]


class _WriteBehind:
    """Each image's files written by ``workers`` background threads, at most ``depth`` images
    queued (``depth=0``: written at once, in the caller's thread). With one worker the files
    are written in the order submitted.

    The first failed write stops the ones after it (their ``then`` callbacks do not run) and
    is raised by the next :meth:`submit` or on leaving the ``with`` block, so with one worker
    ``scores.csv`` lists exactly the images whose files were written.
    """

    def __init__(self, depth: int, workers: int = 1):
        self.depth, self.error = depth, None
        if depth:
            self.jobs: queue.Queue = queue.Queue(maxsize=depth)
            self.threads = [
                threading.Thread(target=self._run, name="ustad-write-outputs", daemon=True)
                for _ in range(workers)
            ]
            for thread in self.threads:
                thread.start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is None:
                try:
                    self._write(*job)
                except BaseException as error:  # raised in the caller's thread
                    self.error = self.error or error

    @staticmethod
    def _write(args, then) -> None:
        _write_one(*args)
        if then is not None:
            then()

    def submit(self, *args, then=None) -> None:
        """``_write_one(*args)``, in order after the writes before it, then ``then()`` (not
        run when the write fails)."""
        if self.error is not None:
            raise self.error
        if self.depth:
            self.jobs.put((args, then))
        else:
            self._write(args, then)

    def __enter__(self) -> _WriteBehind:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self.depth:
            for _ in self.threads:
                self.jobs.put(None)  # the writes queued still run: at most depth images
            for thread in self.threads:
                thread.join()
        if kind is None and self.error is not None:
            raise self.error


def score_files(
    detector,
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    calibration: Calibration | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    settings: dict | None = None,
    sizes: Sequence[tuple[int, int]] | None = None,
    map_dtype: str = "float32",
    prefetch: int = PREFETCH_BATCHES,
    write_behind: int = WRITE_BEHIND_BATCHES,
) -> ScoredFiles:
    """Score image files and write their maps, masks, overlays and ``scores.csv`` under ``out``.

    Args:
        detector: a family's detector or an exported model (anything with ``batch_size`` and
            ``score(images) -> (maps, scores)``).
        paths: image files (any size; images of one size are scored together).
        out: output folder.
        calibration: the thresholds (:mod:`ustad.calibration`); None writes scores only.
        vmin, vmax: the overlays' colour scale; default the calibration's, else the run's
            minimum and maximum (which needs every map first: the maps are then kept to the end).
        settings: JSON-ready facts written to ``<out>/scoring.json``; None writes none.
        sizes: each image's ``(H, W)`` from :func:`scan_images`; default: scanned here.
        map_dtype: ``"float32"`` (lossless) or ``"float16"`` (compressed) maps.
        prefetch: batches of images decoded ahead by a background thread while a batch is
            scored (:func:`ustad.image_batches.read_batches`); 0 reads each batch when it is
            scored.
        write_behind: batches of outputs written by a background thread, in order, while the
            next batches are scored; 0 writes each image's files before the next batch.

    Returns:
        :class:`ScoredFiles`.

    Raises:
        FileNotFoundError, ValueError: an unreadable image (named), clashing output names, an
            unwritable ``out``, or a write that failed (disk full: one line, what was done).
    """
    if map_dtype not in MAP_DTYPES:
        raise ValueError(f"map_dtype must be one of {MAP_DTYPES}, got {map_dtype!r}")
    check_batches("prefetch", prefetch)
    check_batches("write_behind", write_behind)
    names, out = output_names(paths), Path(out)
    sizes = scan_images(paths) if sizes is None else sizes
    if len(sizes) != len(paths):
        raise ValueError(f"sizes has {len(sizes)} (H, W) pairs for {len(paths)} images")
    check_writable(out)
    # Scored by tiles (--tile), images keep their size: nothing is resized to warn about.
    input_sizes = (
        None if getattr(detector, "tile", False) else getattr(detector, "input_sizes", None)
    )
    resize_warning = input_sizes and warn_extreme_resizes(sizes, paths, input_sizes)
    if calibration is not None and vmin is None and vmax is None:
        vmin, vmax = calibration.colour_scale()
    deferred = vmin is None or vmax is None  # the run's own scale: overlays wait for all maps
    rows: list[dict | None] = [None] * len(paths)
    kept: dict[int, tuple] = {}
    try:
        with _WriteBehind(write_behind * detector.batch_size) as writer:
            chunks = list(_batches(sizes, detector.batch_size))
            # closing(): an error while scoring ends the reader thread at once, not only when
            # the traceback that holds this frame is dropped.
            with (
                progress(len(paths), desc="scoring", unit="img") as bar,
                contextlib.closing(read_batches(paths, chunks, prefetch)) as batches,
            ):
                for chunk, images in batches:
                    prediction = decide(*detector.score(images), calibration)
                    for j, i in enumerate(chunk):
                        row = _row(paths[i], names[i], prediction, j)
                        if deferred:
                            kept[i], rows[i] = (prediction, j), row  # drawn when all are scored
                        else:
                            image, scale = images[j], (vmin, vmax)
                            writer.submit(
                                out, names[i], image, prediction, j, scale, map_dtype,
                                then=functools.partial(rows.__setitem__, i, row),  # written
                            )  # fmt: skip
                    bar.update(len(chunk))
        if deferred:
            low = min(float(p.maps[j].min()) for p, j in kept.values())
            high = max(float(p.maps[j].max()) for p, j in kept.values())
            vmin, vmax = (low if vmin is None else vmin), (high if vmax is None else vmax)
            redraw = [[i] for i in kept]  # read again one at a time: a batch per image held
            # Scoring is done: the overlays are drawn (PNG and deflate encoding release the GIL)
            # by several threads, in any order (every row is already in scores.csv's list).
            workers = min(os.cpu_count() or 1, DRAWING_THREADS) if write_behind else 1
            with (
                contextlib.closing(read_batches(paths, redraw, prefetch)) as batches,
                _WriteBehind(write_behind * detector.batch_size, workers) as drawer,
            ):
                for (i,), image in batches:
                    prediction, j = kept[i]
                    drawer.submit(out, names[i], image[0], prediction, j, (vmin, vmax), map_dtype)
        _write_csv(out, rows)
    except OSError as error:
        raise _write_failed(error, out, [r for r in rows if r is not None], len(paths)) from None
    if settings is not None:
        record = dict(settings, images=len(paths), vmin=vmin, vmax=vmax)
        if calibration is not None:
            record["calibration"] = {
                k: v
                for k, v in calibration.record().items()
                if k not in ("image_scores", "pixel_maxima")
            }
        if resize_warning:
            record["warnings"] = [resize_warning]
        atomic_write(out / "scoring.json", (json.dumps(record, indent=2) + "\n").encode())
    scores = np.array([float(r["score"]) for r in rows], np.float32)
    return ScoredFiles(rows, scores, (float(vmin), float(vmax)))


def _write_failed(error: OSError, out: Path, done: list[dict], total: int) -> ValueError:
    """The one-line error of a failed write; ``scores.csv`` of what was done when possible."""
    listed = ""
    if done:
        try:
            _write_csv(out, done)
            listed = f"; {out / 'scores.csv'} lists the {len(done)} scored"
        except OSError:
            listed = "; scores.csv could not be written either"
    what = "disk full" if error.errno == errno.ENOSPC else error.strerror or str(error)
    where = f" ({error.filename})" if error.filename else ""
    return ValueError(
        f"writing under {out} failed: {what}{where}, {len(done)} of {total} images scored{listed}"
    )
