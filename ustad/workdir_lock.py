"""One training per workdir at a time: ``<workdir>/.lock``.

Two trainings into one workdir would interleave their ``metrics.jsonl`` lines and overwrite
each other's checkpoints. :func:`workdir_lock` holds an exclusive ``flock`` on
``<workdir>/.lock`` while a run writes there; the file records the holder's pid, host and start
time for the message a second run gets. The kernel drops the lock when its process dies
(``SIGKILL`` included), so a lock file left by a dead run is simply taken over. Nested use in
one process (the CLI and the trainer both taking it) is allowed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOCK_NAME", "WorkdirLockedError", "read_lock", "workdir_lock"]

LOCK_NAME = ".lock"
logger = logging.getLogger(__name__)
# Locks this process holds: resolved lock path → [open file descriptor, nesting depth].
_HELD: dict[str, list[int]] = {}


class WorkdirLockedError(BlockingIOError):
    """Another live process trains into the workdir (a ``BlockingIOError``, so the CLI prints
    it as one line)."""


def read_lock(workdir: str | os.PathLike) -> dict | None:
    """What ``<workdir>/.lock`` records (``pid``, ``host``, ``started``), or ``None`` when there
    is no lock file or it cannot be read."""
    try:
        return json.loads((Path(workdir) / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike) -> Iterator[Path]:
    """Hold ``<workdir>/.lock`` (the workdir is created if missing) for the ``with`` block.

    Yields:
      The lock file's path. It is removed on exit, and so is the workdir when the lock made it
      and nothing else was written there.

    Raises:
      WorkdirLockedError: another process holds it; the message names its pid and host.
    """
    workdir = Path(workdir)
    created = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_NAME
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield path
        finally:
            _HELD[key][1] -= 1
        return
    fd = _acquire(path)
    _HELD[key] = [fd, 1]
    try:
        yield path
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)  # closing releases the flock
        if created:
            with contextlib.suppress(OSError):  # not empty: the run wrote there, keep it
                workdir.rmdir()


def _acquire(path: Path) -> int:
    """An open descriptor of ``path`` holding its exclusive flock, with this process's record
    written into it."""
    while True:
        previous = _read(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkdirLockedError(_busy_message(path, _read(path))) from None
        # The holder before us may have removed the file between our open and our flock: then
        # we hold a lock on a file no longer at ``path``; try again on the current one.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        if previous and previous.get("pid") != os.getpid():
            logger.warning(
                "taking over the lock %s left by pid %s on %s (that run ended without releasing "
                "it)",
                path,
                previous.get("pid"),
                previous.get("host"),
            )
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        return fd


def _read(path: Path) -> dict | None:
    return read_lock(path.parent)


def _busy_message(path: Path, holder: dict | None) -> str:
    who = "another process"
    if holder:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
        who = f"pid {holder.get('pid')} on {holder.get('host')} (since {started})"
    return (
        f"{path.parent} is in use: {who} is training into it ({path} is locked); wait for it "
        f"to finish, or use another --workdir"
    )
