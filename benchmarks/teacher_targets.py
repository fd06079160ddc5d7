"""How alive a distillation target is (issue 23): per (target, window, P input scale), the
dead (all-zero) and near-constant dimensions and the total variance of P's features on a fixed
sample of photo crops, measured as the teacher trainer measures them before training
(:mod:`ustad.uninformed_students.teacher.targets`). One JSON line per setting::

    python -m benchmarks.teacher_targets --photos_dir ../shared/data/photos \\
        --windows 17,32 --scales 1,2,4 --targets head,3+4,3+4+5 \\
        --out benchmarks/results/teacher_targets_cpu.jsonl

Cost: P (EfficientNet-Lite0) on ``--crops`` crops per line, seconds each on 2 CPU cores.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags

import ustad  # noqa: F401  (sets the fast CPU flag before JAX starts)
from benchmarks.common import device_name, emit
from ustad.uninformed_students.teacher import targets
from ustad.uninformed_students.teacher.distillation import photo_patches
from ustad.uninformed_students.teacher.steps import backbone_inputs

FLAGS = flags.FLAGS
flags.DEFINE_string("photos_dir", None, "photo folder (its train split); default bundled photos")
flags.DEFINE_list("windows", ["17", "32"], "T̂'s window sides R (17: p = 17, 32: p = 33)")
flags.DEFINE_list("scales", ["1", "2", "4"], "P's input side as a factor of R")
flags.DEFINE_list("targets", ["head", "3+4", "3+4+5"], "head, or stages joined by +")
flags.DEFINE_integer("crops", 1024, "photo crops in the sample")
flags.DEFINE_integer("seed", 0, "crop stream")
flags.DEFINE_string("backbone", "efficientnet_lite0", "P")
flags.DEFINE_string("out", None, "also append the lines to this .jsonl file")


def _spec(name: str) -> targets.TargetSpec:
    if name == "head":
        return targets.TargetSpec()
    return targets.TargetSpec(tuple(int(s) for s in name.split("+")), True)


def main(argv):
    del argv
    from ustad.models.pretrained import load_pretrained
    from ustad.uninformed_students.teacher import sources

    if FLAGS.photos_dir:
        photos = sources.photo_folder(FLAGS.photos_dir, split="train")
        corpus = f"{FLAGS.photos_dir} (train split, {len(photos)} photos)"
    else:
        photos, corpus = sources.natural_photos(), "bundled natural photos"
    backbone = load_pretrained(FLAGS.backbone)
    device = device_name()
    for window in (int(w) for w in FLAGS.windows):
        crops = photo_patches(photos, window, FLAGS.crops, FLAGS.seed)
        for scale in (float(s) for s in FLAGS.scales):
            size = None if scale == 1 else round(window * scale)
            prepare = jax.jit(lambda x, size=size: backbone_inputs(x, 3, size))
            inputs = np.concatenate(
                [np.asarray(prepare(crops[i : i + 256])) for i in range(0, len(crops), 256)]
            )
            for name in FLAGS.targets:
                spec = _spec(name)
                start = time.perf_counter()
                statistics = targets.target_statistics(targets.raw_features(backbone, spec, inputs))
                record = {
                    "benchmark": "teacher_targets",
                    "device": device,
                    "target": spec.name,
                    "window": window,
                    "scale": scale,
                    "p_input": size or window,
                    "crops": FLAGS.crops,
                    "corpus": corpus,
                    **{
                        k: statistics[k]
                        for k in ("dim", "dead_dims", "constant_dims", "near_constant_dims")
                    },
                    "total_variance": round(statistics["total_variance"], 4),
                    "seconds": round(time.perf_counter() - start, 2),
                }
                emit(record, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
