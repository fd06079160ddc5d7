"""What the decisions cost: ``ustad score`` with a calibration (normalised score, threshold,
masks, defect areas and 8-connected regions, mask PNGs, contours) against the same run without
(maps, overlays and ``scores.csv`` only), on tiny random students; issue 22 asks ≤ 5 %.

One JSON line: the median seconds of both runs of :func:`ustad.score_files.score_files` on
``--images`` PNGs, of ``Detector.score`` against ``Detector.predict`` in memory (timed in turn),
the decisions alone (:func:`ustad.decisions.decide`) and the ratios.
Random weights (the cost of the decisions does not depend on them); no data needed.

    python -m benchmarks.calibration_overhead --images=32 --size=256
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.common import device_name, emit, time_fn
from ustad.calibration import calibrate_detector
from ustad.data.images import to_uint8, write_png
from ustad.decisions import decide
from ustad.ensemble import ScoreNormalization
from ustad.score_files import score_files
from ustad.uninformed_students.checkpoints import ScaleModel
from ustad.uninformed_students.nets import patch_net
from ustad.uninformed_students.score import Detector

FLAGS = flags.FLAGS
flags.DEFINE_integer("images", 32, "images scored per timed run")
flags.DEFINE_integer("size", 128, "square image size (the students' training size too)")
flags.DEFINE_integer("batch", 8, "Detector batch size")
flags.DEFINE_integer("repeats", 3, "timed runs (median reported)")


def tiny_detector(size: int, batch: int) -> Detector:
    """p = 17 at ⅛ width, d = 16, M = 3 random students."""
    network = patch_net(17, widths=1 / 8, out_dim=16)
    sample = jnp.zeros((1, 17, 17, 3))
    keys = jax.random.split(jax.random.key(0), 4)
    params = {
        "teacher": network.init(keys[0], sample),
        "students": jax.vmap(lambda key: network.init(key, sample))(keys[1:]),
        "mean": jnp.zeros(16),
        "std": jnp.ones(16),
    }
    params = jax.tree.map(np.asarray, params)
    scale = ScaleModel(network, params, ScoreNormalization(0.0, 1.0, 0.0, 1.0), (size, size), 3)
    return Detector([scale], batch_size=batch)


def interleaved(plain, decided) -> tuple[float, float]:
    """Median seconds of each, timed in turn (A B A B …) so that a load that comes and goes on
    a shared machine falls on both alike."""
    plain(), decided()  # compile, and fill the caches
    times = ([], [])
    for _ in range(FLAGS.repeats):
        for fn, spent in zip((plain, decided), times, strict=True):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main(argv) -> None:
    del argv
    rng = np.random.default_rng(0)
    size, count = FLAGS.size, FLAGS.images
    detector = tiny_detector(size, FLAGS.batch)
    images = rng.uniform(size=(count, size, size, 3)).astype(np.float32)
    good = rng.uniform(size=(24, size, size, 3)).astype(np.float32)
    calibration = calibrate_detector(detector, good, max_fpr=0.05)
    with tempfile.TemporaryDirectory() as folder:
        paths = [Path(folder) / "in" / f"{i:03d}.png" for i in range(count)]
        for path, image in zip(paths, images, strict=True):
            write_png(path, to_uint8(image))
        scale = calibration.colour_scale()

        def files(with_calibration):
            out = Path(folder) / ("with" if with_calibration else "without")
            return score_files(detector, paths, out, calibration=calibration if with_calibration
                               else None, vmin=scale[0], vmax=scale[1]).scores  # fmt: skip

        plain_files, decided_files = interleaved(lambda: files(False), lambda: files(True))
    plain, decided = interleaved(
        lambda: detector.score(images)[1], lambda: detector.predict(images, calibration).scores
    )
    maps, scores = detector.score(images)
    decisions = time_fn(lambda: decide(maps, scores, calibration).regions, repeats=FLAGS.repeats)
    emit({
        "benchmark": "calibration_overhead",
        "device": device_name(),
        "images": count,
        "size": size,
        "score_files_s": plain_files,
        "score_files_with_decisions_s": decided_files,
        "score_files_ratio": decided_files / plain_files,
        "score_s": plain,
        "predict_s": decided,
        "predict_ratio": decided / plain,
        "decisions_s": decisions,
        "decisions_share_of_score": decisions / plain,
    })  # fmt: skip


if __name__ == "__main__":
    app.run(main)
