"""What tests/test_decisions.py and tests/test_html_report.py start from: a synthetic category
and a copy of the committed students workdir calibrated on good images it never trained on."""

import shutil
from pathlib import Path

from ustad.cli import main as cli
from ustad.data.synthetic import make_synthetic_category

DATA = Path(__file__).parent / "data"


def run(*args):
    return cli.main(["ustad", *args])


def calibrated_students(root: Path, num_train: int, *calibrate_flags: str) -> Path:
    """``root/data/synthetic`` (32², ``num_train`` good training images, 4 good and 2 per defect
    type in test), ``root/good`` (its training images from the 31st on: the committed workdirs
    were trained on 30 others), ``root/students`` (the committed workdir) calibrated on them at
    a 5 % false-reject rate; returns the category folder."""
    category = make_synthetic_category(
        root / "data", "synthetic", image_size=32, num_train=num_train, num_test_good=4,
        num_test_per_defect=2,
    )  # fmt: skip
    good = root / "good"
    good.mkdir()
    for path in sorted((category / "train" / "good").glob("*.png"))[30:]:
        shutil.copy(path, good / path.name)
    shutil.copytree(DATA / "workdir_students_v1", root / "students")
    flags = (f"--workdirs={root / 'students'}", f"--good={good}", "--max_fpr=0.05")
    assert run("calibrate", *flags, *calibrate_flags) == 0
    return category
