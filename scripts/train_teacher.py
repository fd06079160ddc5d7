"""Alias of ``ustad train-teacher`` (``ustad train-teacher --help`` says what it reads and writes).

For a checkout without the package installed: ``python scripts/train_teacher.py [flags]``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ustad.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["ustad", "train-teacher", *sys.argv[1:]]))
