"""The ``ustad`` command: help texts, flag errors, and train → score → evaluate on tiny data."""

import ast
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from ustad.cli import main as cli
from ustad.cli.common import resolve_config_arg
from ustad.cli.main import COMMANDS
from ustad.data.synthetic import make_synthetic_category
from ustad.evaluation.test_report import format_summary

REPO = Path(__file__).parents[1]
SIZE = 16


def run(*args):
    return cli.main(["ustad", *args])


def test_overview_lists_every_command(capsys):
    assert run() == 0 and run("--help") == 0
    out = capsys.readouterr().out
    for name in ("demo", "train-teacher", "train-students", "score", "evaluate", "teachers"):
        assert f"  {name}" in out


ALL_COMMANDS = sorted(
    [name, *(f"{name} {sub}" for sub in command.subcommands)] for name, command in COMMANDS.items()
)


@pytest.mark.parametrize("name", sum(ALL_COMMANDS, []))
def test_every_command_help_says_what_it_reads_writes_and_how_long(name, capsys):
    assert run(*name.split(), "--help") == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: ustad {name}")
    for word in ("Reads", "Write", "Time"):
        assert word in out, f"`ustad {name} --help` does not say {word}"


def _in_another_process(args, cwd, pythonpath=None) -> subprocess.CompletedProcess:
    """``args`` run in ``cwd`` on the CPU; asserts it succeeded."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def test_installed_entry_point_runs_outside_the_checkout(tmp_path):
    ustad = Path(sys.executable).with_name("ustad")
    if not ustad.exists():
        pytest.skip("the package is not installed with its console script")
    result = _in_another_process([str(ustad), "train-students", "--help"], tmp_path)
    assert "train/good" in result.stdout


def test_unknown_command_and_missing_flags_are_usage_errors(capsys):
    assert run("trian") == 2
    assert "unknown command 'trian'" in capsys.readouterr().err
    assert run("score", "--images", "x") == 2
    assert "missing --out" in capsys.readouterr().err
    # --workdirs and --model (an exported detector) are alternatives: exactly one is needed.
    assert run("score", "--images", "x", "--out", "o") == 1
    assert "either --workdirs" in capsys.readouterr().err
    assert run("score", "--no_such_flag=1") == 2


def test_config_paths_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    resolved = resolve_config_arg("configs/students.py:smoke")
    assert Path(resolved.split(":")[0]).is_file() and resolved.endswith(":smoke")


def test_demo_synthetic_none_is_not_a_flag_error_and_asks_for_data(tmp_path, capsys):
    assert run("demo", "--out", str(tmp_path / "out"), "--config.synthetic=None") == 1
    err = capsys.readouterr().err
    assert "error: no data: set --config.data_dir" in err
    assert not (tmp_path / "out" / "data").exists()


def test_demo_reads_the_users_category_and_lists_the_ones_that_exist(tmp_path, capsys):
    (tmp_path / "data" / "bottle" / "train" / "good").mkdir(parents=True)
    (tmp_path / "data" / "cable" / "test").mkdir(parents=True)
    args = ["--out", str(tmp_path / "out"), f"--config.data_dir={tmp_path / 'data'}"]
    assert run("demo", *args, "--config.category=screw") == 1
    err = capsys.readouterr().err
    assert "Category 'screw' not found" in err and "it holds: bottle, cable" in err
    assert not (tmp_path / "out" / "data").exists()  # no synthetic data made up


def _train_args(workdir, data_dir):
    return [
        "train-students",
        "--config=configs/students.py:smoke",
        f"--workdir={workdir}",
        f"--config.data_dir={data_dir}",
        "--config.category=tiny",
        f"--config.image_size={SIZE}",
        "--config.out_dim=8",
        "--config.num_students=2",
        "--config.epochs=1",
        "--config.batch_size=2",
        "--config.prng_impl=rbg",
        "--config.stats_batch_size=8",
        "--config.eval_batch_size=8",
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_synthetic_category(
        root / "data", "tiny", image_size=SIZE, num_train=8, num_test_good=2, num_test_per_defect=1
    )
    assert run(*_train_args(root / "run", root / "data")) == 0
    return root


def test_train_students_then_evaluate_writes_the_full_report(trained, tmp_path, capsys):
    assert (trained / "run" / "checkpoints").is_dir()
    out = tmp_path / "report"
    data = trained / "data" / "tiny"
    assert run("evaluate", f"--workdirs={trained / 'run'}", f"--data={data}", f"--out={out}") == 0
    assert "| p17 |" in capsys.readouterr().out
    for name in ("metrics.md", "metrics.json", "metrics.csv", "pro_curves.png", "roc_pixel.png"):
        assert (out / name).is_file(), name
    assert list((out / "examples").glob("*.png"))
    assert oct((out / "metrics.md").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_evaluate_without_masks_reports_image_level_metrics(trained, tmp_path, capsys):
    data = tmp_path / "labelled_only"
    shutil.copytree(trained / "data" / "tiny" / "test", data / "test")
    out = tmp_path / "report"
    assert run("evaluate", f"--workdirs={trained / 'run'}", f"--data={data}", f"--out={out}") == 0
    printed = capsys.readouterr().out
    assert "pixel AUROC and AU-PRO need masks" in printed and "(needs masks)" in printed
    markdown = (out / "metrics.md").read_text()
    assert "image_auroc" in markdown and "mean_score_good" in markdown
    assert "au_pro" not in markdown and (out / "score_histograms.png").is_file()


def test_score_keeps_extensions_so_same_stem_images_stay_apart(trained, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for suffix in ("png", "jpg"):
        pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"x.{suffix}")
    out = tmp_path / "out"
    assert run("score", f"--workdirs={trained / 'run'}", f"--images={folder}", f"--out={out}") == 0
    assert "scored 2 images" in capsys.readouterr().out
    assert (out / "x.png.npz").is_file() and (out / "x.jpg.npz").is_file()
    assert (out / "x.png.overlay.png").is_file() and (out / "x.jpg.overlay.png").is_file()
    assert len((out / "scores.csv").read_text().splitlines()) == 3


def test_score_names_the_unreadable_image_and_writes_nothing(trained, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    assert run("score", f"--workdirs={trained / 'run'}", f"--images={folder}", f"--out={out}") == 1
    assert f"Cannot read image file {folder / 'empty.png'}" in capsys.readouterr().err
    assert not out.exists()
    (folder / "empty.png").unlink()
    assert run("score", f"--workdirs={trained / 'run'}", f"--images={folder}", f"--out={out}") == 1
    assert "No image files" in capsys.readouterr().err


def test_changing_num_students_on_resume_says_so(trained, capsys):
    args = _train_args(trained / "run", trained / "data")
    assert run(*args, "--config.num_students=3") == 1
    err = capsys.readouterr().err
    assert "num_students=2, but this run has 3" in err
    assert "Event loop" not in err and "Traceback" not in err


def test_orbax_info_lines_are_off_by_default(tmp_path, caplog):
    from ustad.checkpointing import Checkpointer

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("absl").addHandler(handler)
    try:
        with caplog.at_level(logging.INFO), Checkpointer(tmp_path / "ck") as checkpointer:
            logging.getLogger("absl").setLevel(logging.INFO)
            checkpointer.save(1, {"x": np.zeros(3)}, {"step": 1})
    finally:
        logging.getLogger("absl").removeHandler(handler)
    assert not [r for r in records if "orbax" in r.pathname]


def test_teachers_lists_what_list_teachers_returns(monkeypatch, capsys):
    from ustad.uninformed_students.teacher import catalog

    fake = [
        {
            "name": "p33",
            "patch_size": 33,
            "out_dim": 128,
            "widths": None,
            "bytes": 6_500_000,
            "path": "/somewhere/p33.teacher.npz",
            "origin": "installed",
        }
    ]
    monkeypatch.setattr(catalog, "list_teachers", lambda: fake)
    assert run("teachers") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "p", "d", "widths", "size", "origin", "loads", "path"]
    assert lines[1].split() == ["p33", "33", "128", "None", "6.5", "MB", "installed", "yes"] + [
        "/somewhere/p33.teacher.npz"
    ]


def test_teachers_runs_against_the_real_listing(tmp_path, monkeypatch, capsys):
    from ustad.uninformed_students.teacher import catalog

    monkeypatch.setenv("USTAD_TEACHERS", str(tmp_path))
    (tmp_path / f"broken{catalog.SUFFIX}").write_bytes(b"not a teacher")
    assert run("teachers") == 0
    table = capsys.readouterr().out
    assert "broken" in table and "installed" in table and "(unreadable:" in table
    assert run("teachers", "--json") == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {"name": "broken", "origin": "installed"}.items() <= listed[0].items()


def test_python_m_ustad_is_the_ustad_command(tmp_path):
    result = _in_another_process([sys.executable, "-m", "ustad", "--help"], tmp_path, REPO)
    assert result.stdout.startswith("usage: ustad <command>") and "  teachers" in result.stdout


def test_teachers_subcommand_errors_are_usage_errors(tmp_path, capsys):
    assert run("teachers", "instal") == 2
    assert "unknown subcommand 'instal'" in capsys.readouterr().err
    assert run("teachers", "export", f"--workdir={tmp_path}") == 2
    assert "missing --out" in capsys.readouterr().err
    assert run("teachers", "install", "--name=x") == 2
    assert "missing --file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def teacher_workdir(tmp_path_factory):
    """A tiny finished teacher run (4 steps, random stand-in for P)."""
    from test_teacher import _config, _train

    workdir = tmp_path_factory.mktemp("teacher")
    _train(workdir, _config(num_steps=4, checkpoint_every_steps=4))
    return workdir


def test_teachers_export_install_and_ship(teacher_workdir, tmp_path, monkeypatch, capsys):
    from ustad.uninformed_students.teacher import catalog

    monkeypatch.setenv("USTAD_TEACHERS", str(tmp_path / "installed"))
    monkeypatch.setattr(catalog, "shipped_dir", lambda: tmp_path / "shipped")
    out = tmp_path / "t.teacher.npz"
    args = [f"--workdir={teacher_workdir}", f"--out={out}", "--dtype=float16", "--install=mine"]
    assert run("teachers", "export", *args) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["bytes"] == out.stat().st_size and len(record["sha256"]) == 64
    assert record["installed"] == str(tmp_path / "installed" / f"mine{catalog.SUFFIX}")

    assert run("teachers", "install", f"--file={out}", "--name=again") == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "installed" / f"again{catalog.SUFFIX}")
    assert run("teachers", "--json") == 0
    listed = {t["name"]: t for t in map(json.loads, capsys.readouterr().out.splitlines())}
    assert listed["mine"]["origin"] == listed["again"]["origin"] == "installed"
    assert listed["mine"]["patch_size"] == 17 and "error" not in listed["again"]
    module, _, _ = catalog.load_teacher("again")
    assert module.patch_size == 17

    extra = '{"device": "test"}'
    assert (
        run("teachers", "ship", f"--workdir={teacher_workdir}", "--name=p17_t", f"--extra={extra}")
        == 0
    )
    entry = json.loads(capsys.readouterr().out)
    assert entry["name"] == "p17_t" and entry["device"] == "test"
    manifest = json.loads((tmp_path / "shipped" / catalog.MANIFEST).read_text())
    assert [e["name"] for e in manifest["teachers"]] == ["p17_t"]


def test_teachers_install_and_export_name_what_is_wrong(
    teacher_workdir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("USTAD_TEACHERS", str(tmp_path / "installed"))
    bad = tmp_path / "bad.teacher.npz"
    bad.write_bytes(b"not a teacher")
    assert run("teachers", "install", f"--file={bad}", "--name=bad") == 1
    assert capsys.readouterr().err.startswith("ustad: error: ")
    assert not (tmp_path / "installed").exists()
    out = tmp_path / "t.teacher.npz"
    assert run("teachers", "export", f"--workdir={tmp_path}", f"--out={out}") == 1
    assert "is not a teacher workdir" in capsys.readouterr().err and not out.exists()
    args = [f"--workdir={teacher_workdir}", f"--out={out}", "--install=../up"]
    assert run("teachers", "export", *args) == 1
    assert "a teacher name is a plain file stem" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.py")), ids=lambda p: p.name)
def test_config_files_import_only_ustad_and_load_without_sys_path(path):
    """configs/ never import each other (their shared bases live in the library), so the CLI
    loads any of them by path alone."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if not node.level else ["<relative>"]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            assert name.split(".")[0] not in ("configs", "<relative>"), (
                f"{path.name} imports {name}"
            )
    spec = importlib.util.spec_from_file_location(f"ustad_test_cli_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if path.stem != "__init__":
        assert isinstance(module.get_config(), ml_collections.ConfigDict)


def test_the_demo_pipeline_on_a_users_category_without_masks(trained, tmp_path, monkeypatch):
    """run_experiment (what `ustad demo` runs) on the user's data: nothing synthetic is made, and
    a test set without ground_truth/ gets the image-level report."""
    from ustad.uninformed_students import experiment

    shutil.copytree(trained / "data" / "tiny", tmp_path / "data" / "mine")
    shutil.rmtree(tmp_path / "data" / "mine" / "ground_truth")
    monkeypatch.setattr(experiment, "_ensure_teacher", lambda *args: "random")
    students = resolve_config_arg("configs/students.py:smoke")
    spec = importlib.util.spec_from_file_location("ustad_test_cli_students", students[:-6])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    students = module.get_config("smoke")
    students.update(num_students=2, epochs=1, batch_size=2, prng_impl="rbg", image_size=SIZE)
    students.update(stats_batch_size=8, eval_batch_size=8)
    config = ml_collections.ConfigDict(
        {
            "data_dir": str(tmp_path / "data"),
            "category": "mine",
            "image_size": SIZE,
            "grayscale": False,
            "synthetic": "grass",
            "patch_sizes": (17,),
            "students": students,
            "report": {"examples_per_type": 1},
        }
    )
    summary = experiment.run_experiment(config, tmp_path / "out")
    assert not (tmp_path / "out" / "data").exists()
    assert set(summary["p17"]) >= {"image_auroc", "mean_score_good"}
    assert "(needs masks)" in format_summary(summary)
    assert (tmp_path / "out" / "report" / "score_histograms.png").is_file()
