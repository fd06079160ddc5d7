"""Pretrain one teacher T̂ (paper §3); resumes an interrupted run.

    python scripts/train_teacher.py --config configs/teacher.py:p65 --workdir runs/teacher_p65
"""

from __future__ import annotations

import logging

from absl import app, flags
from ml_collections import config_flags

import ustad  # noqa: F401  (sets XLA flags before JAX starts a backend)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/teacher.py:<name>", lock_config=True)
flags.DEFINE_string("workdir", None, "folder for checkpoints and metrics (resumed if present)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.getLogger("ustad").setLevel(logging.INFO)
    from ustad.train.teacher import train_and_evaluate

    module, _, meta = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    logging.getLogger("ustad").info(
        "teacher p=%d (%s input, P=%s: %s) saved in %s at step %d",
        module.patch_size,
        meta["channels"],
        meta["backbone"],
        meta["backbone_input"],
        FLAGS.workdir,
        meta["step"],
    )


if __name__ == "__main__":
    app.run(main)
