"""STFPM on one MVTec AD category: train (or resume), score the test set, print one JSON line.

    nice -n 5 python benchmarks/stfpm_mvtec.py --data_dir ../shared/data/mvtec_ad \\
        --category bottle --config configs/stfpm.py:cpu --workdir runs/stfpm_bottle_cpu \\
        >> benchmarks/results/stfpm_cpu.jsonl

Scores every test image once and derives from the per-level maps
(:func:`ustad.stfpm.combinations.combination_maps`) the paper's product, the
sum (the mean ranks identically), and for M > 1 students the normalised error + variance
(mean over levels) and each student alone (its own product), so one trained model answers
"product or sum" and "ensemble or single student". Each set gets image AUROC (image score =
the map's max), pixel AUROC and the official AU-PRO@0.3 at the evaluation size. Speed: training
minutes (the trainer's own clock, compilation included), and scoring img/s of
:class:`ustad.stfpm.score.STFPMDetector` (resize, teacher + students, map, host transfer)
over the whole test set at batch 8 and at batch 1, after a warm-up call, with the device named.
"""

from __future__ import annotations

import datetime
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import ustad  # noqa: E402,F401  (fast CPU flags before JAX starts)
from benchmarks.common import device_name, emit  # noqa: E402
from ustad.evaluation.reports import evaluate_score_sets  # noqa: E402
from ustad.stfpm.combinations import combination_maps  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "MVTec AD root (holding <category>/train/good, ...)")
flags.DEFINE_string("category", "bottle", "category")
flags.DEFINE_string("workdir", None, "training workdir (a finished run is loaded)")
flags.DEFINE_integer("eval_batch_size", 8, "images per scoring call")
config_flags.DEFINE_config_file("config", "configs/stfpm.py:cpu", "STFPM config")
flags.mark_flags_as_required(["data_dir", "workdir"])


def _throughput(model, images, batch_size) -> float:
    from ustad.stfpm.score import STFPMDetector

    detector = STFPMDetector([model], batch_size=batch_size)
    detector.score(images[:batch_size])  # compile
    if batch_size == 1:
        times = []
        for image in images[:8]:
            t0 = time.perf_counter()
            detector.score(image[None])
            times.append(time.perf_counter() - t0)
        return 1.0 / statistics.median(times)
    t0 = time.perf_counter()
    detector.score(images)
    return len(images) / (time.perf_counter() - t0)


def main(argv):
    del argv
    from ustad.checkpointing import Checkpointer
    from ustad.data.mvtec import category_folder, load_mvtec_test
    from ustad.stfpm.train import train_and_evaluate

    config = FLAGS.config
    config.data_dir, config.category = FLAGS.data_dir, FLAGS.category
    t0 = time.perf_counter()
    model = train_and_evaluate(config, FLAGS.workdir)
    wall = time.perf_counter() - t0
    with Checkpointer(os.path.join(FLAGS.workdir, "checkpoints")) as checkpointer:
        meta = checkpointer.restore_metadata(checkpointer.latest_step())
    test = load_mvtec_test(
        category_folder(FLAGS.data_dir, FLAGS.category), image_size=config.image_size
    )
    sets = combination_maps(model, test.images, FLAGS.eval_batch_size)
    metrics = evaluate_score_sets(sets, test.masks, test.labels)
    emit(
        {
            "benchmark": "stfpm_mvtec",
            "date": datetime.date.today().isoformat(),
            "device": device_name(),
            "category": FLAGS.category,
            "backbone": config.backbone,
            "levels": meta["levels"],
            "teacher": meta["teacher_source"],
            "image_size": config.image_size,
            "num_students": config.num_students,
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "learning_rate": config.learning_rate,
            "steps": meta["total_steps"],
            "train_images": meta["train_images"],
            "selected_epochs": meta.get("selected_epochs"),
            "train_minutes": round(meta["train_seconds"] / 60, 2),
            "this_process_minutes": round(wall / 60, 2),
            "test_images": len(test.images),
            "scoring_img_per_s": round(_throughput(model, test.images, 8), 2),
            "scoring_img_per_s_batch1": round(_throughput(model, test.images, 1), 2),
            "metrics": {
                name: {k: round(v, 4) for k, v in row.items()} for name, row in metrics.items()
            },
        }
    )


if __name__ == "__main__":
    app.run(main)
