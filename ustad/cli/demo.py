"""``ustad demo``: the whole method on one category, offline."""

from __future__ import annotations

import os

from absl import flags

from ustad.cli.common import Command, config_flag

DOC = """
The whole method on one category: teachers → students → anomaly maps → report.

Reads: nothing by default (it writes a synthetic defect dataset: a scikit-image texture with
procedural defects and exact masks); with --config.data_dir=/data/mvtec_ad
--config.category=bottle, that MVTec-layout category instead (train/good, test/, and
ground_truth/ if present).
Writes, under --out: data/ (synthetic data only), teacher_p17/ and teacher_p33/ (teacher
checkpoints; skipped with --config.teacher_workdir=<name or path with {p}>), students/p<p>/,
report/ (metrics.md/.json/.csv, pro_curves.png, roc_pixel.png, roc_image.png, examples/*.png)
and summary.json.
Time: ~10 minutes on 2 CPU cores with the default configs/demo.py (64×64 images, small nets);
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

    summary = run_experiment(fv["config"].value, fv["out"].value)
    print(format_summary(summary))
    print(f"\nReport: {os.path.abspath(summary['report_dir'])}")
    print(f"Stage times (s): {summary['seconds']}")


DEMO = Command("the whole method on one category, offline (~10 min on CPU)", DOC, define, run)
