"""Maintainers: ship trained teachers into ``ustad/teachers/`` with their record.

    python -m benchmarks.ship_teachers --probes benchmarks/results/teacher_probes_cpu.jsonl \\
        --ship p33_small=runs/small/p33_small:<probed snapshot file>

For each ``NAME=WORKDIR[:PROBED[+PROBED…]]`` this writes the workdir's teacher as a float16 shipped file
(:func:`ustad.uninformed_students.teacher.shipping.ship_teacher`) and records in the manifest:
the device, the wall time of its training (``shipping.training_minutes``), and the figures of
every probe line whose teacher source is one of the ``PROBED`` (default: the workdir; several
when one teacher was probed under several paths, e.g. its snapshot for the grid probe and a
copy for the students' verdict), per dataset (``shipping.probe_summary``). Prints the manifest entries as JSON lines.

``--recipes_only`` adds to every manifest entry that lacks one the recipe of its shipped file
(target, P's input, D's initialisation, learning rate, loss weights, steps), read from the
file's header; no file changes.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags

import ustad  # noqa: F401  (sets XLA flags before JAX starts)
from benchmarks.common import device_name

FLAGS = flags.FLAGS
flags.DEFINE_list("ship", None, "NAME=WORKDIR[:PROBED_SOURCE[+PROBED_SOURCE…]] items")
flags.DEFINE_list("probes", [], "teacher_quality JSON-line files")
flags.DEFINE_bool("allow_unfinished", False, "ship runs stopped before their last step")
flags.DEFINE_bool("recipes_only", False, "only add missing recipes to the manifest's entries")


def main(argv):
    del argv
    from ustad.uninformed_students.teacher import shipping

    if FLAGS.recipes_only:
        print(json.dumps({"recipes_added": shipping.add_recipes()}))
        return
    if not FLAGS.ship:
        raise app.UsageError("--ship NAME=WORKDIR[:PROBED],… (or --recipes_only)")
    lines = []
    for path in FLAGS.probes:
        lines += [json.loads(text) for text in Path(path).read_text().splitlines() if text.strip()]
    for item in FLAGS.ship:
        name, spec = item.split("=", 1)
        workdir, _, probed = spec.partition(":")
        extra = {
            "device": device_name(),
            "wall_time_min": shipping.training_minutes(workdir),
            "probes": shipping.probe_summary(lines, (probed or workdir).split("+")),
            "probe_settings": "benchmarks/teacher_quality.py: 128², σ = 4 smoothing; student "
            "probe M = 3, batch 2: 2 epochs at lr 1e-3 by default, the `cpu` preset's scale "
            "(student_probe_updates, Adam 3e-3) with --student_preset cpu",
        }
        entry = shipping.ship_teacher(
            workdir, name, allow_unfinished=FLAGS.allow_unfinished, extra=extra
        )
        print(json.dumps(entry))


if __name__ == "__main__":
    app.run(main)
