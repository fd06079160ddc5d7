"""``ustad demo``: the whole method on one category, offline."""

from __future__ import annotations

import os

from absl import flags

from ustad.cli.common import Command, config_flag

DOC = """
Both families on one category: Uninformed Students (teachers → students → anomaly maps →
report) and STFPM's CPU preset beside it on the same data, one table.

Reads: nothing by default (it writes a synthetic defect dataset: a scikit-image texture with
procedural defects and exact masks); with --config.data_dir=/data/mvtec_ad
--config.category=bottle, that MVTec-layout category instead (train/good, test/, and
ground_truth/ if present).
Writes, under --out: data/ (synthetic data only), teacher_p17/ and teacher_p33/ (teacher
checkpoints; skipped with --config.teacher_workdir=<name or path with {p}>), students/p<p>/,
report/ (metrics.md/.json/.csv, pro_curves.png, roc_pixel.png, roc_image.png, examples/*.png),
summary.json and stfpm/ (the STFPM workdir; --config.stfpm_beside=False skips it).
Time: ~3 minutes on 2 CPU cores with the default configs/demo.py (64×64 images, small nets);
an interrupted demo resumes where it stopped when run again with the same flags.
"""


def define(fv: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_string(
        "out", "demo_out", "output folder (an interrupted demo resumes)", flag_values=fv
    )
    config_flag(fv, argv, "configs/demo.py", "experiment config (configs/demo.py)")


def run(fv: flags.FlagValues) -> None:
    from ustad.evaluation.test_report import format_summary
    from ustad.uninformed_students.experiment import run_experiment

    config, out = fv["config"].value, fv["out"].value
    summary = run_experiment(config, out)
    seconds = summary["seconds"]
    rows = {f"Uninformed Students {k}": v for k, v in summary.items() if isinstance(v, dict)}
    rows.pop("Uninformed Students seconds", None)
    student_s = sum(v for k, v in seconds.items() if k.startswith(("teacher_", "students_")))
    times = [f"Uninformed Students {student_s:.0f} s (teachers and students)"]
    if config.get("stfpm_beside", False):
        metrics, train_s = _stfpm_beside(config, out)
        rows["STFPM (EfficientNet-Lite0, 60 updates)"] = metrics
        times.append(f"STFPM {train_s:.0f} s")
    print(format_summary(rows))
    print(f"\nTraining: {'; '.join(times)}. Report: {os.path.abspath(summary['report_dir'])}")


def _stfpm_beside(config, out: str) -> tuple[dict, float]:
    """STFPM's ``config.stfpm`` preset trained and evaluated on the demo's own data (the same
    test set): ``(metrics, training seconds)``."""
    import time
    from pathlib import Path

    import ml_collections

    from ustad import families
    from ustad.data.mvtec import load_mvtec_test
    from ustad.evaluation.metrics import image_auroc
    from ustad.evaluation.reports import category_metrics

    data_dir = config.data_dir or os.path.join(out, "data")  # where run_experiment put it
    stfpm = ml_collections.ConfigDict(config.stfpm.to_dict())
    stfpm.data_dir, stfpm.category, stfpm.image_size = data_dir, config.category, config.image_size
    t0 = time.perf_counter()
    model = families.train(stfpm, os.path.join(out, "stfpm"))
    train_s = time.perf_counter() - t0
    test = load_mvtec_test(Path(data_dir) / config.category, image_size=config.image_size)
    maps, scores = families.score_sets(families.STFPM, [model], test.images)
    name = next(iter(maps))
    if test.masks is None:
        return {"image_auroc": image_auroc(scores[name], test.labels)}, train_s
    return category_metrics(maps[name], test.masks, test.labels, scores[name]), train_s


DEMO = Command("both families on one category, offline (~3 min on CPU)", DOC, define, run)
