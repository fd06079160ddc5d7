"""Alias of ``ustad score`` (``ustad score --help`` says what it reads and writes).

For a checkout without the package installed: ``python scripts/score.py [flags]``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ustad.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["ustad", "score", *sys.argv[1:]]))
