"""Exported detectors against ``Detector.score``: JAX jit, JAX exported, ONNX Runtime (CPU).

One JSON line per (runtime, scales, batch): the median seconds of one call on ``batch`` images
(latency), images per second, the ratio of ``Detector.score``'s time in the same run to the
runtime's (> 1: faster than the Detector) and the largest |map − Detector's map| on those images.
Weights are random (speed does not depend on them); the networks are the paper's full-width
ones at 256², M = 3.

* ``detector``: :meth:`ustad.uninformed_students.score.Detector.score` (``batch_size`` = the batch,
  or ``--detector_batch``; one warm-up call on one chunk compiles it).
* ``jax_jit``: the exported scorer (:func:`ustad.uninformed_students.export_graph.make_scorer`)
  under ``jax.jit``, compiled ahead of time.
* ``jax_exported``: the ``.jaxexport`` file through :func:`ustad.deploy.load` (deserialized,
  compiled ahead of time).
* ``onnxruntime_cpu``: the ``.onnx`` file through :func:`ustad.deploy.load` (ONNX Runtime's CPU
  provider, default threads; one warm-up call at batch 1 per model).

    python -m benchmarks.export                        # p65 and p17+p33+p65; 256², batch 1 and 8
    python -m benchmarks.export --runs=256:1,128:1,128:8          # what fits 2 loaded CPU cores
    python -m benchmarks.export --multiscale=false --runs=256:8 --detector_batch=2  # < 8 GB
    python -m benchmarks.export --patch_sizes=17 --multiscale=false --runs=32:1,32:2
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from benchmarks.common import device_name, emit
from ustad import deploy
from ustad.ensemble import ScoreNormalization
from ustad.uninformed_students.checkpoints import ScaleModel
from ustad.uninformed_students.export_graph import make_scorer, scale_weights
from ustad.uninformed_students.nets import patch_net
from ustad.uninformed_students.score import Detector

FLAGS = flags.FLAGS
flags.DEFINE_list("patch_sizes", ["65"], "the single scale(s) to time, each on its own")
flags.DEFINE_bool("multiscale", True, "also time p17+p33+p65 together")
flags.DEFINE_list(
    "runs", ["256:1", "256:8"], "SIZE:BATCH pairs: square image size and images per call"
)
flags.DEFINE_integer(
    "detector_batch",
    0,
    "Detector.score's batch_size (0: the batch). Under 8 keeps the reference's memory down: at "
    "256², p = 65, its batch of 8 passed 12.6 GB, against ~4 GB for the exported scorer's",
)
flags.DEFINE_integer("num_students", 3, "M")
flags.DEFINE_integer("repeats", 1, "timed calls per configuration (median reported)")
flags.DEFINE_enum("method", deploy.DEFAULT_METHOD, ["multipool", "atrous"], "dense extraction")
flags.DEFINE_list(
    "runtimes", ["detector", "jax_jit", "jax_exported", "onnxruntime_cpu"], "what to time"
)


def random_scale(p: int, size: int, num_students: int, seed: int = 0) -> ScaleModel:
    """A full-width scale with random teacher and students (for timing only)."""
    network = patch_net(p)
    sample = np.zeros((1, p, p, 3), np.float32)
    keys = jax.random.split(jax.random.key(seed), num_students + 1)
    params = {
        "teacher": network.init(keys[0], sample),
        "students": jax.vmap(lambda key: network.init(key, sample))(keys[1:]),
        "mean": np.zeros(network.out_dim, np.float32),
        "std": np.ones(network.out_dim, np.float32),
    }
    normalization = ScoreNormalization(0.0, 1.0, 0.0, 1.0)
    return ScaleModel(network, jax.tree.map(np.asarray, params), normalization, (size, size), 3)


def _timed(fn, *args, repeats: int):
    """Median wall time (s) of ``repeats`` calls (blocking) and the anomaly maps they return."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), np.asarray(outputs[0])


def _record(base, runtime, seconds, batch, reference_s, maps, reference_maps):
    diff = None if reference_maps is None else float(np.abs(maps - reference_maps).max())
    return {
        **base,
        "runtime": runtime,
        "batch": batch,
        "median_s": round(seconds, 3),
        "latency_ms": round(1000 * seconds, 1),
        "img_per_s": round(batch / seconds, 4),
        "ratio_to_detector": None if reference_s is None else round(reference_s / seconds, 3),
        "max_abs_map_diff": diff,
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }


def _time_config(make_scales, label, side, batches, folder):
    size = (side, side)
    scales = make_scales(side)
    base = {
        "benchmark": "export",
        "device": device_name(),
        "scales": label,
        "image_size": side,
        "num_students": FLAGS.num_students,
        "method": FLAGS.method,
        "repeats": FLAGS.repeats,
    }
    files, extra = {}, {}
    for runtime, suffix in (("jax_exported", ".jaxexport"), ("onnxruntime_cpu", ".onnx")):
        if runtime in FLAGS.runtimes:
            path = os.path.join(folder, f"{label}_{side}{suffix}")
            start = time.perf_counter()
            deploy.export(scales, path, method=FLAGS.method, check=False)
            extra[runtime] = {
                "export_s": round(time.perf_counter() - start, 1),
                "file_mb": round(os.path.getsize(path) / 1e6, 1),
            }
            files[runtime] = deploy.load(path)
    if "onnxruntime_cpu" in files:
        warm = np.zeros((1, *size, 3), np.float32)
        files["onnxruntime_cpu"](warm)
    score = jax.jit(make_scorer(scales, size=size, method=FLAGS.method))
    weights = jax.device_put([scale_weights(scale) for scale in scales])
    rng = np.random.default_rng(0)
    for batch in batches:
        images = rng.uniform(size=(batch, *size, 3)).astype(np.float32)
        reference_s = reference_maps = None
        if "detector" in FLAGS.runtimes:
            chunk = min(FLAGS.detector_batch or batch, batch)
            detector = Detector(scales, batch_size=chunk)
            detector.score(images[:chunk])  # compiles (every call runs chunks of this size)
            reference_s, reference_maps = _timed(detector.score, images, repeats=FLAGS.repeats)
            record = _record(base, "detector", reference_s, batch, None, reference_maps, None)
            emit({**record, "detector_batch": chunk})
        if "jax_jit" in FLAGS.runtimes:
            compiled = score.lower(weights, images).compile()
            seconds, maps = _timed(compiled, weights, images, repeats=FLAGS.repeats)
            emit(_record(base, "jax_jit", seconds, batch, reference_s, maps, reference_maps))
        for runtime, model in files.items():
            model.compile(batch)
            seconds, maps = _timed(model, images, repeats=FLAGS.repeats)
            record = _record(base, runtime, seconds, batch, reference_s, maps, reference_maps)
            emit({**record, **extra[runtime]})


def main(argv):
    del argv
    runs: dict[int, list[int]] = {}
    for pair in FLAGS.runs:
        side, batch = (int(x) for x in pair.split(":"))
        runs.setdefault(side, []).append(batch)
    configs = [
        (f"p{p}", lambda side, p=int(p): [random_scale(p, side, FLAGS.num_students)])
        for p in FLAGS.patch_sizes
    ]
    if FLAGS.multiscale:
        configs.append(
            (
                "p17+p33+p65",
                lambda side: [random_scale(p, side, FLAGS.num_students, p) for p in (17, 33, 65)],
            )
        )
    for label, make_scales in configs:
        for side, batches in runs.items():
            # A fresh folder (and models) per size: ONNX Runtime keeps its peak memory.
            with tempfile.TemporaryDirectory() as folder:
                _time_config(make_scales, label, side, batches, folder)


if __name__ == "__main__":
    app.run(main)
