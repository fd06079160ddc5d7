"""Scoring reads only the parts of a checkpoint it needs (Checkpointer.restore(parts=...)): the
same arrays as a full restore, nothing else read, a missing part named, damaged steps still
skipped; and a workdir loads to the same model either way."""

from pathlib import Path

import jax
import numpy as np
import pytest

from ustad.checkpointing import Checkpointer, restore_workdir
from ustad.uninformed_students import checkpoints as us_checkpoints

DATA = Path(__file__).parent / "data"


def _state(offset=0.0):
    rng = np.random.default_rng(0)
    return {
        "teacher": {"w": rng.normal(size=(4, 3)).astype(np.float32) + offset},
        "students": {
            "params": {"w": rng.normal(size=(2, 4, 3)).astype(np.float32) + offset},
            "opt_state": {"mu": np.zeros((2, 4, 3), np.float32)},
        },
        "best": {"w": np.ones((2, 4, 3), np.float32)},
    }


def test_only_the_parts_asked_for_are_read_as_saved(tmp_path):
    state = _state()
    with Checkpointer(tmp_path, async_save=False) as checkpointer:
        checkpointer.save(3, state, {"step": 3})
    with Checkpointer(tmp_path) as checkpointer:
        restored, meta = checkpointer.restore(3, parts=("teacher", "students/params"))
    assert meta == {"step": 3}
    assert set(restored) == {"teacher", "students"} and set(restored["students"]) == {"params"}
    for got, saved in [
        (restored["teacher"]["w"], state["teacher"]["w"]),
        (restored["students"]["params"]["w"], state["students"]["params"]["w"]),
    ]:
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        np.testing.assert_array_equal(got, saved)


def test_a_missing_part_is_named(tmp_path):
    with Checkpointer(tmp_path, async_save=False) as checkpointer:
        checkpointer.save(1, _state(), {"step": 1})
    with Checkpointer(tmp_path) as checkpointer, pytest.raises(ValueError, match="students/x"):
        checkpointer.restore(1, parts=("teacher", "students/x"))


def test_a_damaged_newest_step_falls_back_when_reading_parts(tmp_path, caplog):
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(1, _state(), {"step": 1})
        checkpointer.save(2, _state(offset=1.0), {"step": 2})
    for data_file in (tmp_path / "2" / "state").rglob("d/*"):
        with open(data_file, "r+b") as f:
            f.truncate(10)
    with caplog.at_level("WARNING"), Checkpointer(tmp_path) as checkpointer:
        step, state, meta = checkpointer.restore_latest(parts=("teacher",))
    assert step == 1 and meta == {"step": 1}
    np.testing.assert_array_equal(state["teacher"]["w"], _state()["teacher"]["w"])
    assert "falling back to step 1" in caplog.text


def test_a_students_workdir_loads_the_same_from_its_parts():
    workdir = DATA / "workdir_students_v1"
    scale = us_checkpoints.load_scale(workdir)
    _, full, _ = restore_workdir(workdir, (us_checkpoints.FORMAT,))
    expected = {
        "teacher": full["teacher"],
        "students": full["students"]["params"],
        "mean": full["target_stats"]["mean"],
        "std": full["target_stats"]["std"],
    }
    assert jax.tree.structure(scale.params) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(scale.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(got, want)
