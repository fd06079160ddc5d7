"""Train the students of one or several scales (paper §4); resumes an interrupted run.

    python scripts/train_students.py --config configs/students.py:p65 --workdir runs/students_p65

Multi-host: start the same command in every process with ``--coordinator host:port
--num_processes P --process_id i`` (see :mod:`ustad.sharding`).
"""

from __future__ import annotations

import logging
import os

from absl import app, flags
from ml_collections import config_flags

import ustad  # noqa: F401  (sets XLA flags before JAX starts a backend)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/students.py:<name>", lock_config=True)
flags.DEFINE_string("workdir", None, "folder for checkpoints and metrics (resumed if present)")
flags.DEFINE_string("coordinator", None, "multi-host: host:port of process 0")
flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.getLogger("ustad").setLevel(logging.INFO)
    from ustad import sharding
    from ustad.train.students import train_and_evaluate

    if FLAGS.coordinator:
        sharding.initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    config = FLAGS.config
    if config.synthetic_data:
        from ustad.data.synthetic import make_synthetic_category

        if not os.path.isdir(os.path.join(config.data_dir, config.category)):
            make_synthetic_category(
                config.data_dir, config.category, image_size=config.image_size, num_train=12
            )
    scales = train_and_evaluate(config, FLAGS.workdir)
    for scale in scales:
        print(
            f"p={scale.patch_size}: {scale.num_students} students trained, score normalisation "
            f"{scale.normalization.as_dict()}"
        )


if __name__ == "__main__":
    app.run(main)
