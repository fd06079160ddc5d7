"""``python -m ustad <command> [flags]``: the same as the ``ustad`` command."""

import sys

from ustad.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["ustad", *sys.argv[1:]]))
