"""Export a trained teacher to one file, and optionally install it under a name.

    python scripts/export_teacher.py --workdir runs/teacher_p33 --out teacher_p33.teacher.npz
    python scripts/export_teacher.py --workdir runs/teacher_p33 --out t.teacher.npz --install p33

An installed teacher is then found by name wherever ustad takes a teacher, e.g.
``--config.teacher_workdir=p33`` (see ``ustad/train/teacher_files.py``).
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
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    del argv
    from ustad.train import teacher_files

    record = teacher_files.export_teacher(FLAGS.workdir, FLAGS.out, dtype=FLAGS.dtype)
    if FLAGS.install:
        record["installed"] = str(teacher_files.install_teacher(FLAGS.out, FLAGS.install))
    print(json.dumps(record))


if __name__ == "__main__":
    app.run(main)
