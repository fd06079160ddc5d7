"""Scoring throughput: images per second of ``Detector.score`` for one scale and multi-scale.

One JSON line per (scales, image size, batch): the median seconds to score ``--images`` images
(teacher and M students by dense extraction, the normalised error and variance, the average over
scales, the image score), and images per second. Weights are random (throughput does not depend
on them); the networks are the paper's full-size ones.

    python -m benchmarks.scoring                                    # p = 17, 33, 65, multi; 256²
    python -m benchmarks.scoring --sizes=128 --images=8 --batch=4

Reference (PyTorch re-implementation, 2-core CPU, p = 65, 256², 3 students): teacher dense
inference 2.2 s per image plus ~3 × 2.2 s for the students ≈ 8.8 s per image.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import app, flags

from benchmarks.common import device_name, emit, time_fn
from ustad.ensemble import ScoreNormalization
from ustad.uninformed_students.checkpoints import ScaleModel
from ustad.uninformed_students.nets import patch_net
from ustad.uninformed_students.score import Detector
from ustad.uninformed_students.steps import init_students, make_optimizer

FLAGS = flags.FLAGS
flags.DEFINE_list("patch_sizes", ["17", "33", "65"], "single scales to time")
flags.DEFINE_bool("multiscale", True, "also time all --patch_sizes together")
flags.DEFINE_list("sizes", ["256"], "square image sizes")
flags.DEFINE_integer("num_students", 3, "M")
flags.DEFINE_integer("images", 8, "images scored per timed call")
flags.DEFINE_integer("batch", 4, "Detector batch size")
flags.DEFINE_integer("repeats", 3, "timed calls (median reported)")
flags.DEFINE_float("budget_s", 120.0, "stop a configuration after this long once 2 calls ran")


def random_scale(p: int, size: int, num_students: int, seed: int = 0) -> ScaleModel:
    """A full-size scale with random teacher and students (for timing only)."""
    network = patch_net(p)
    key = jax.random.key(seed)
    sample = np.zeros((1, p, p, 3), np.float32)
    teacher = network.init(jax.random.fold_in(key, 0), sample)
    students = init_students(network, make_optimizer(1e-4, 1e-5), key, num_students, 3)
    params = {
        "teacher": teacher,
        "students": students["params"],
        "mean": np.zeros(network.out_dim, np.float32),
        "std": np.ones(network.out_dim, np.float32),
    }
    return ScaleModel(
        network=network,
        params=jax.tree.map(np.asarray, params),
        normalization=ScoreNormalization(0.0, 1.0, 0.0, 1.0),
        image_size=(size, size),
        channels=3,
    )


def main(argv):
    del argv
    device = device_name()
    patch_sizes = [int(p) for p in FLAGS.patch_sizes]
    for size in (int(s) for s in FLAGS.sizes):
        scales = {p: random_scale(p, size, FLAGS.num_students, seed=p) for p in patch_sizes}
        images = np.random.default_rng(0).random((FLAGS.images, size, size, 3), np.float32)
        runs = [(f"p{p}", [scales[p]]) for p in patch_sizes]
        if FLAGS.multiscale and len(patch_sizes) > 1:
            runs.append(("multiscale", [scales[p] for p in patch_sizes]))
        for name, members in runs:
            detector = Detector(members, batch_size=FLAGS.batch)
            seconds = time_fn(
                lambda d=detector, x=images: d.score(x)[0],
                repeats=FLAGS.repeats,
                min_repeats=2,
                budget_s=FLAGS.budget_s,
            )
            emit(
                {
                    "benchmark": "scoring",
                    "device": device,
                    "load_avg_1min": round(os.getloadavg()[0], 2),
                    "scales": name,
                    "image_size": size,
                    "num_students": FLAGS.num_students,
                    "images": FLAGS.images,
                    "batch": FLAGS.batch,
                    "median_s": round(seconds, 3),
                    "img_per_s": round(FLAGS.images / seconds, 3),
                    "ms_per_image": round(1000 * seconds / FLAGS.images, 1),
                }
            )


if __name__ == "__main__":
    app.run(main)
