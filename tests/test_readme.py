"""README.md's code blocks run as written (on tiny data), so the README stays true.

Each ```bash block's commands run through :func:`ustad.cli.main` in a scratch folder, each
```python block with ``exec``, in README order (later blocks use what earlier ones wrote).
A block that cannot run in a test (hours of training, several hosts, the test suite itself) is
listed in ``NOT_RUN`` with the reason, and the test fails when the README gains a block that is
neither run nor listed. Paths to a user's data are pointed at a tiny synthetic category.
"""

import re
import shlex
from pathlib import Path

import pytest

from ustad.cli import main as cli
from ustad.data.synthetic import make_synthetic_category

README = Path(__file__).parents[1] / "README.md"

# A block containing this text is not run here → why.
NOT_RUN = {
    "make demo": "builds a venv and runs the 3-minute demo and the whole test suite",
    "--workdir=runs/teacher_p33": "hours of teacher training on a user's photo folder",
    "--config.tfds_name=imagenet2012 --config.tfds_data_dir": "ImageNet and hours of training",
    "jax.distributed.initialize(": "needs several processes (tests/test_multiprocess.py)",
}
# Commands inside run blocks that are too long for a test → why.
SKIPPED_COMMANDS = {
    "ustad train-teacher --config=configs/teacher.py:p65": "hours of teacher training",
}
# The user's data in the README → a tiny synthetic category; the paper's configs → smoke.
SUBSTITUTIONS = {
    "/data/mvtec_ad": "{data}",
    "--config=configs/students.py:p65": "--config=configs/students.py:smoke",
    # The recipe's teacher is trained in a block not run here; smoke uses a random teacher.
    " --config.teacher_workdir=runs/teacher_p65": "",
    "--config=configs/stfpm.py:cpu": "--config=configs/stfpm.py:smoke",
}


def readme_blocks():
    """``[(language, code)]`` of every fenced block."""
    return re.findall(r"^```(\w+)\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def _commands(code: str) -> list[str]:
    joined = code.replace("\\\n", " ")
    lines = [line.split(" #")[0].strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _reason(code: str):
    return next((why for text, why in NOT_RUN.items() if text in code), None)


def test_every_block_is_run_or_listed_with_a_reason():
    blocks = readme_blocks()
    assert blocks, "no code blocks found in README.md"
    for language, code in blocks:
        assert language in ("bash", "python"), f"a ```{language} block cannot be run: {code}"
        if language == "bash" and not _reason(code):
            for command in _commands(code):
                assert command.startswith("ustad "), f"neither run nor listed: {command}"
    for text in NOT_RUN:
        assert any(text in code for _, code in blocks), f"NOT_RUN lists a gone block: {text}"


@pytest.mark.filterwarnings("ignore")
def test_readme_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "user_data"
    make_synthetic_category(
        data, "bottle", image_size=32, num_train=8, num_test_good=2, num_test_per_defect=1
    )
    ran = 0
    namespace: dict = {}
    for language, code in readme_blocks():
        if _reason(code):
            continue
        if language == "python":
            exec(compile(code, str(README), "exec"), namespace)
            ran += 1
            continue
        for command in _commands(code):
            if any(command.startswith(skip) for skip in SKIPPED_COMMANDS):
                continue
            for old, new in SUBSTITUTIONS.items():
                command = command.replace(old, new.format(data=data))
            argv = shlex.split(command)
            assert argv[0] == "ustad", f"README command not run by this test: {command}"
            assert cli.main(argv) == 0, command
            ran += 1
    assert ran >= 7
    assert namespace["maps"].shape == (2, 64, 64)
    assert (tmp_path / "runs" / "report" / "metrics.md").is_file()
