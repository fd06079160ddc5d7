"""Alias of ``ustad train-students`` (``ustad train-students --help``: what it reads, writes).

For a checkout without the package installed: ``python scripts/train_students.py [flags]``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ustad.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["ustad", "train-students", *sys.argv[1:]]))
