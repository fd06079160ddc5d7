"""Reproduce the paper's MVTec AD table: train and evaluate per category, write the table next
to the paper's numbers (paper.md §6).

    python -m benchmarks.paper_mvtec --data_dir ../shared/data/mvtec_ad --categories bottle \\
        --config configs/paper_mvtec.py:reduced --out runs/paper_mvtec

Writes ``<out>/<category>/report/`` per category and ``<out>/table.{md,json}`` with AU-PRO@0.3
(the paper's metric), pixel and image AUROC per scale and multi-scale, the schedule, the device
and the time each category took. The image score is the maximum of the anomaly map (the paper
defines none for MVTec AD).
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import ustad  # noqa: E402,F401  (fast CPU flags before JAX starts)
from benchmarks.common import device_name  # noqa: E402
from ustad.uninformed_students.experiment import run_experiment  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "MVTec AD root (holding <category>/train/good, ...)")
flags.DEFINE_list("categories", ["bottle"], "categories to run")
flags.DEFINE_string("out", "runs/paper_mvtec", "output folder (runs resume)")
config_flags.DEFINE_config_file("config", "configs/paper_mvtec.py:paper", "experiment config")
flags.mark_flag_as_required("data_dir")

# Paper (Bergmann et al. 2020, Table 1): AU-PRO@0.3 per category for p = 65, and means.
PAPER_P65 = {
    "carpet": 0.695, "grid": 0.819, "leather": 0.819, "tile": 0.912, "wood": 0.725,
    "bottle": 0.918, "cable": 0.865, "capsule": 0.916, "hazelnut": 0.937, "metal_nut": 0.895,
    "pill": 0.935, "screw": 0.928, "toothbrush": 0.863, "transistor": 0.701, "zipper": 0.933,
}  # fmt: skip
PAPER_MEAN = {"p17": 0.866, "p33": 0.900, "p65": 0.857, "multiscale": 0.914}


def describe_schedule(config) -> str:
    """One line naming what the run did (the table must say when it is not the paper's)."""
    from ustad.uninformed_students.schedule import scale_epochs

    teacher = config.teacher_workdir or f"trained here, {config.teacher.num_steps} steps"
    epochs = sorted({scale_epochs(config.students, p) for p in config.patch_sizes})
    if len(epochs) > 1:
        epochs = ", ".join(
            f"{scale_epochs(config.students, p)} (p = {p})" for p in config.patch_sizes
        )
    else:
        epochs = str(epochs[0])
    s = config.students
    recipe = f"lr {s.learning_rate:g} {s.get('lr_schedule', 'constant')}"
    if s.get("crop_size"):
        recipe += f", crops {s.crop_size}²"
    return (
        f"{config.schedule}: {config.image_size}×{config.image_size}, p = "
        f"{', '.join(str(p) for p in config.patch_sizes)}, M = {config.students.num_students}, "
        f"{epochs} epochs, batch {s.batch_size}, {recipe}, teacher: {teacher}"
    )


def table(rows: list[dict], schedule: str, device: str) -> str:
    lines = [
        f"Schedule: {schedule}. Device: {device}. Image score: max of the anomaly map.",
        "",
        "| category | scores | AU-PRO@0.3 | paper AU-PRO | pixel AUROC | image AUROC | minutes |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for name, metrics in row["metrics"].items():
            if name == "p65":
                paper = PAPER_P65.get(row["category"])
            else:
                paper = None
            paper_text = f"{paper:.3f}" if paper is not None else "–"
            lines.append(
                f"| {row['category']} | {name} | {metrics['au_pro']:.3f} | {paper_text} | "
                f"{metrics['pixel_auroc']:.3f} | {metrics['image_auroc']:.3f} | "
                f"{row['minutes']:.1f} |"
            )
    lines += [
        "",
        "Paper means over the 15 categories: "
        + ", ".join(f"{k} {v:.3f}" for k, v in PAPER_MEAN.items()),
    ]
    return "\n".join(lines)


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    device = device_name()
    rows = []
    for category in FLAGS.categories:
        config = FLAGS.config.copy_and_resolve_references()
        config.data_dir, config.category = FLAGS.data_dir, category
        start = time.perf_counter()
        summary = run_experiment(config, os.path.join(FLAGS.out, category))
        metrics = {k: v for k, v in summary.items() if isinstance(v, dict) and "au_pro" in v}
        rows.append(
            {
                "category": category,
                "metrics": metrics,
                "minutes": (time.perf_counter() - start) / 60,
                "seconds": summary["seconds"],
            }
        )
        print(
            json.dumps(
                {
                    "benchmark": "paper_mvtec",
                    "device": device,
                    "schedule": config.schedule,
                    "schedule_detail": describe_schedule(config),
                    **rows[-1],
                }
            ),
            flush=True,
        )
    text = table(rows, describe_schedule(FLAGS.config), device)
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(FLAGS.out, "table.json"), "w") as f:
        json.dump({"device": device, "schedule": FLAGS.config.schedule, "rows": rows}, f, indent=2)
    print(text)


if __name__ == "__main__":
    app.run(main)
