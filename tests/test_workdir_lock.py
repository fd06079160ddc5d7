"""``ustad.workdir_lock``: one training per workdir (issue 25 item 15)."""

import json
import os
import subprocess
import sys
import time

import pytest

from ustad.workdir_lock import LOCK_NAME, WorkdirLockedError, read_lock, workdir_lock


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    workdir = tmp_path / "run"
    with workdir_lock(workdir) as path:
        assert path == workdir / LOCK_NAME
        assert read_lock(workdir)["pid"] == os.getpid()
        # A second open file description (what another process would have) is refused.
        from ustad import workdir_lock as module

        held = module._HELD.pop(str(path.resolve()))
        try:
            with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()} on") as error:
                with workdir_lock(workdir):
                    pass
            assert "\n" not in str(error.value) and "use another --workdir" in str(error.value)
        finally:
            module._HELD[str(path.resolve())] = held
    assert not (workdir / LOCK_NAME).exists()
    assert not workdir.exists()  # made by the lock and left empty: removed


def test_nested_use_in_one_process_is_allowed_and_files_are_kept(tmp_path):
    with workdir_lock(tmp_path) as outer, workdir_lock(tmp_path) as inner:
        assert outer == inner
        (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert not (tmp_path / LOCK_NAME).exists() and (tmp_path / "metrics.jsonl").exists()


def test_another_process_holding_it_is_refused_and_its_death_frees_it(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from ustad.workdir_lock import workdir_lock\n"
            f"with workdir_lock({str(tmp_path)!r}):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirLockedError, match=f"pid {holder.pid} on"):
            with workdir_lock(tmp_path):
                pass
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the lock file stays behind
        holder.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid
    with workdir_lock(tmp_path):
        assert read_lock(tmp_path)["pid"] == os.getpid()


def test_a_stale_lock_file_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    record = {"pid": int(dead.stdout), "host": "elsewhere", "started": time.time() - 60}
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))
    with workdir_lock(tmp_path):
        assert read_lock(tmp_path)["pid"] == os.getpid()
    (warning,) = [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()]
    assert f"left by pid {record['pid']} on elsewhere" in warning
