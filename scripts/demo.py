"""The demo: synthetic defects → teacher → students → anomaly maps → report, offline on CPU.

python scripts/demo.py --out demo_out
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import ustad  # noqa: E402,F401  (fast CPU flags before JAX starts)
from ustad.experiment import format_summary, run_experiment  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "demo_out", "output folder (an interrupted demo resumes there)")
config_flags.DEFINE_config_file("config", "configs/demo.py", "experiment config")


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
    summary = run_experiment(FLAGS.config, FLAGS.out)
    print(format_summary(summary))
    print(f"\nReport: {os.path.abspath(summary['report_dir'])}")
    print(f"Stage times (s): {summary['seconds']}")


if __name__ == "__main__":
    app.run(main)
