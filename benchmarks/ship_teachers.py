"""Maintainers: ship trained teachers into ``ustad/teachers/`` with their record.

    python -m benchmarks.ship_teachers --probes benchmarks/results/teacher_probes_cpu.jsonl \\
        --ship p33_small=runs/small/p33_small:<probed snapshot file>

For each ``NAME=WORKDIR[:PROBED]`` this writes the workdir's teacher as a float16 shipped file
(:func:`ustad.train.teacher_files.ship_teacher`) and records in the manifest: the device, the
wall time of its training (from the run's ``metrics.jsonl``: the first record's interval plus the
span of the records), and the figures of every probe line whose teacher source is ``PROBED``
(default: the workdir), per dataset. Prints the manifest entries as JSON lines.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags

import ustad  # noqa: F401  (sets XLA flags before JAX starts)
from benchmarks.common import device_name

FLAGS = flags.FLAGS
flags.DEFINE_list("ship", None, "NAME=WORKDIR[:PROBED_SOURCE] items")
flags.DEFINE_list("probes", [], "teacher_quality JSON-line files")
flags.DEFINE_bool("allow_unfinished", False, "ship runs stopped before their last step")


def wall_minutes(workdir: Path) -> float:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    first = records[0]
    # Runs resumed after a stop are counted by their steps' rates, not the gap between them.
    seconds = first["step"] / first["steps_per_s"]
    for before, after in zip(records, records[1:], strict=False):
        seconds += (after["step"] - before["step"]) / after["steps_per_s"]
    return round(seconds / 60, 1)


def probe_figures(lines: list[dict], source: str) -> dict:
    out = {}
    for line in lines:
        if line["teacher"]["source"] != source:
            continue
        entry = {}
        for probe in ("descriptor", "student"):
            if probe in line:
                figures = line[probe]["figures"]["smoothed_sigma4"]
                entry[f"{probe}_probe"] = {
                    k: figures[k] for k in ("au_pro", "pixel_auroc", "image_auroc")
                }
        if "distill" in line:
            figures = line["distill"]["figures"]
            entry["r2_decoder"] = figures["r2_decoder"]
            entry["mean_abs_offdiag_corr"] = figures["mean_abs_offdiag_corr"]
        out[line["dataset"]] = entry
    return out


def main(argv):
    del argv
    from ustad.train import teacher_files

    lines = []
    for path in FLAGS.probes:
        lines += [json.loads(text) for text in Path(path).read_text().splitlines() if text.strip()]
    for item in FLAGS.ship:
        name, spec = item.split("=", 1)
        workdir, _, probed = spec.partition(":")
        extra = {
            "device": device_name(),
            "wall_time_min": wall_minutes(Path(workdir)),
            "probes": probe_figures(lines, probed or workdir),
            "probe_settings": "benchmarks/teacher_quality.py defaults: 128², σ = 4 smoothing; "
            "student probe M = 3, 2 epochs, batch 2, lr 1e-3",
        }
        entry = teacher_files.ship_teacher(
            workdir, name, allow_unfinished=FLAGS.allow_unfinished, extra=extra
        )
        print(json.dumps(entry))


if __name__ == "__main__":
    flags.mark_flags_as_required(["ship"])
    app.run(main)
