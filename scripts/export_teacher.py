"""Export a trained teacher to one file, and optionally install it under a name.

    python scripts/export_teacher.py --workdir runs/teacher_p33 --out teacher_p33.teacher.npz
    python scripts/export_teacher.py --workdir runs/teacher_p33 --out t.teacher.npz --install p33

An installed teacher is then found by name wherever ustad takes a teacher, e.g.
``--config.teacher_workdir=p33`` (see ``ustad/train/teacher_files.py``).

Maintainers ship a teacher inside the package (float16, recorded with its SHA-256 and figures in
``ustad/teachers/MANIFEST.json``)::

    python scripts/export_teacher.py --workdir runs/teachers/p33 --ship p33 \
        --extra '{"wall_time_min": 52, "device": "cpu: AMD EPYC (2 cores)"}'
"""

from __future__ import annotations

import json

from absl import app, flags

import ustad  # noqa: F401  (sets XLA flags before JAX starts a backend)

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "a finished teacher workdir")
flags.DEFINE_string("out", None, "the file to write (<name>.teacher.npz)")
flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "stored parameter type")
flags.DEFINE_string("install", "", "also install the file under this name")
flags.DEFINE_string("ship", "", "maintainers: write it into ustad/teachers/ under this name")
flags.DEFINE_string("extra", "{}", "with --ship: JSON object of more manifest fields")
flags.DEFINE_bool("allow_unfinished", False, "export a run that stopped before its last step")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    from ustad.train import teacher_files

    if FLAGS.ship:
        entry = teacher_files.ship_teacher(
            FLAGS.workdir,
            FLAGS.ship,
            allow_unfinished=FLAGS.allow_unfinished,
            extra=json.loads(FLAGS.extra),
        )
        print(json.dumps(entry))
        return
    if not FLAGS.out:
        raise app.UsageError("--out is required (or --ship NAME)")
    record = teacher_files.export_teacher(
        FLAGS.workdir, FLAGS.out, dtype=FLAGS.dtype, allow_unfinished=FLAGS.allow_unfinished
    )
    if FLAGS.install:
        record["installed"] = str(teacher_files.install_teacher(FLAGS.out, FLAGS.install))
    print(json.dumps(record))


if __name__ == "__main__":
    app.run(main)
