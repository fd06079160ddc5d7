"""Checkpoints through Orbax (the only module that imports it).

A run's state (a pytree of arrays) and a small JSON dict of metadata (config, statistics, step)
are saved together under ``<directory>/<step>``; saves are asynchronous and atomic (Orbax writes to
a temporary folder and renames), so a killed run never leaves a half-written step, and
:meth:`Checkpointer.restore_latest` resumes from the newest finished one. A step whose files
were damaged afterwards (a truncated file, a disk error) is skipped with a warning in favour of
the newest one that reads back; a run resumed from that older step saves over the damaged one
(moved aside to ``<step>.damaged`` first, with a warning), so it can finish.

Orbax logs ~45 INFO lines per save through absl; they are dropped unless ``USTAD_ORBAX_LOGS=1``
(warnings and errors always pass). A checkpointer that never saved removes the empty folder it
created, so a run that fails early leaves no empty ``checkpoints/`` behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

PyTree = Any
logger = logging.getLogger(__name__)
# Every workdir (teacher, students, STFPM) keeps its checkpoints in this sub-folder.
CHECKPOINT_SUBDIR = "checkpoints"


class _QuietOrbax(logging.Filter):
    """Drops Orbax's INFO/DEBUG records (one per handler, thread and file of every save)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or os.environ.get("USTAD_ORBAX_LOGS") == "1":
            return True
        return f"{os.sep}orbax{os.sep}" not in record.pathname


def quiet_orbax_logs() -> None:
    """Install the filter on the ``absl`` logger that Orbax logs through (idempotent)."""
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _QuietOrbax) for f in absl_logger.filters):
        absl_logger.addFilter(_QuietOrbax())


quiet_orbax_logs()


def _drop_closed_loop_errors(previous):
    """An ``sys.unraisablehook`` that drops TensorStore's "Event loop is closed" callbacks:
    when one read of a damaged checkpoint fails, Orbax closes its event loop and every other
    pending read reports this from its thread (200 lines of tracebacks for one damaged step,
    which :meth:`Checkpointer.restore_latest` already reports in one line)."""

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        previous(unraisable)

    hook.ustad_filter = True
    return hook


if not getattr(sys.unraisablehook, "ustad_filter", False):
    sys.unraisablehook = _drop_closed_loop_errors(sys.unraisablehook)


class Checkpointer:
    """Save and restore ``(state, metadata)`` pairs by step.

    Args:
      directory: folder for the checkpoints (created if missing).
      max_to_keep: how many recent steps to keep.
      async_save: write in a background thread (call :meth:`wait` before reading files).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2, async_save=True):
        self.directory = os.path.abspath(os.fspath(directory))
        self._created = not os.path.isdir(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._damaged: set[int] = set()  # steps found damaged by this checkpointer

    def latest_step(self) -> int | None:
        """The newest complete step, or ``None``."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: PyTree, metadata: dict | None = None) -> None:
        """Save ``state`` (arrays) and ``metadata`` (JSON-serialisable) as ``step``.

        A step found damaged on restoring (a resumed run fell back to an older one) is moved
        aside to ``<step>.damaged`` first; saving over an intact step is an error.
        """
        if step in self._damaged and step in self._manager.all_steps():
            self._move_aside(step)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                metadata=ocp.args.JsonSave(metadata or {}),
            ),
            force=True,
        )

    def restore(
        self, step: int, target: PyTree | None = None, *, parts: tuple[str, ...] | None = None
    ) -> tuple[PyTree, dict]:
        """Restore ``step``.

        Args:
          step: which step.
          target: a pytree of arrays (or ``jax.ShapeDtypeStruct``) with the state's structure,
            shapes, dtypes and shardings; ``None`` restores as saved (host arrays).
          parts: read only these subtrees of the state, as host arrays (``"teacher"``,
            ``"students/params"``: key paths joined by ``/``), e.g. what scoring needs without
            the optimizer state; ``None`` reads everything.

        Returns:
          ``(state, metadata)``.
        """
        self._check_step(step)
        if parts is not None:
            return self._restore_parts(step, tuple(parts)), self.restore_metadata(step)
        if target is not None:
            target = jax.tree.map(_abstract, target)
            state_args = ocp.args.StandardRestore(target)
        else:
            state_args = ocp.args.StandardRestore()
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=state_args, metadata=ocp.args.JsonRestore())
        )
        return restored["state"], dict(restored["metadata"] or {})

    def _restore_parts(self, step: int, parts: tuple[str, ...]) -> PyTree:
        """The subtrees ``parts`` of ``step``'s state as NumPy arrays; the other arrays (the
        optimizer state: a third or more of a training checkpoint) are not read."""
        path = epath.Path(self.directory) / str(step) / "state"
        handler = ocp.PyTreeCheckpointHandler()
        try:
            item = _select(handler.metadata(path).tree, parts, str(path))
            abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), item)
            as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
            return handler.restore(
                path,
                args=ocp.args.PyTreeRestore(
                    item=abstract, restore_args=as_numpy, partial_restore=True
                ),
            )
        finally:
            handler.close()

    def restore_metadata(self, step: int) -> dict:
        """Only the JSON metadata of ``step`` (cheap; no arrays are read)."""
        self._check_step(step)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())
        )
        return dict(restored["metadata"] or {})

    def _check_step(self, step: int) -> None:
        if step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}"
            )

    def latest_intact(self) -> tuple[int, dict] | None:
        """``(step, metadata)`` of the newest step whose metadata reads back, or ``None``."""
        steps = sorted(self.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            try:
                return step, self.restore_metadata(step)
            except Exception as error:  # any damage: fall back, say so
                self._warn_damaged(step, error, steps[i + 1 :])
        if steps:
            raise ValueError(f"no checkpoint in {self.directory} reads back ({steps=})")
        return None

    def restore_latest(
        self, target: PyTree | None = None, *, parts: tuple[str, ...] | None = None
    ) -> tuple[int, PyTree, dict] | None:
        """``(step, state, metadata)`` of the newest checkpoint that reads back, or ``None`` if
        there is none (``target``, ``parts``: as :meth:`restore`).

        A damaged step (truncated or missing file) is skipped with a warning that names it; if
        no step reads back, the newest step's error is raised with the directory named.
        """
        steps = sorted(self.all_steps(), reverse=True)
        first_error = None
        for i, step in enumerate(steps):
            try:
                state, metadata = self.restore(step, target, parts=parts)
                return step, state, metadata
            except Exception as error:  # any damage: fall back, say so
                first_error = first_error or error
                self._warn_damaged(step, error, steps[i + 1 :])
        if first_error is not None:
            raise ValueError(
                f"no checkpoint in {self.directory} reads back (steps {steps}); the newest "
                f"failed with: {_first_line(first_error)}"
            ) from first_error
        return None

    def _warn_damaged(self, step: int, error: Exception, older: list[int]) -> None:
        if step in self._damaged:
            return  # said once per checkpointer (latest_intact and restore_latest both look)
        self._damaged.add(step)
        fallback = f"falling back to step {older[0]}" if older else "no older step to fall back to"
        logger.warning(
            "checkpoint %s is damaged (%s): %s",
            os.path.join(self.directory, str(step)),
            describe_damage(error),
            fallback,
        )

    def _move_aside(self, step: int) -> None:
        """Rename the damaged ``<step>`` folder to ``<step>.damaged`` (``.damaged.<i>`` if taken)
        so that a resumed run can save that step again."""
        source = os.path.join(self.directory, str(step))
        target, i = f"{source}.damaged", 1
        while os.path.exists(target):
            target, i = f"{source}.damaged.{i}", i + 1
        os.rename(source, target)
        self._manager.reload()
        self._damaged.discard(step)
        logger.warning(
            "saving step %d again: the damaged checkpoint was moved to %s (delete it when done)",
            step,
            target,
        )

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
        if self._created:
            with contextlib.suppress(OSError):  # not empty: a step was saved, keep it
                os.rmdir(self.directory)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def restore_workdir(
    workdir, formats: tuple[str, ...] = (), *, hint: str = "", parts: tuple[str, ...] | None = None
):
    """The newest checkpoint of a workdir that reads back: the one loader of every family.

    Args:
      workdir: a training workdir (its checkpoints in ``<workdir>/checkpoints``).
      formats: the metadata ``"format"`` values the caller reads; empty = any.
      hint: appended to the error when there is no checkpoint (e.g. how to train one).
      parts: read only these subtrees of the state (:meth:`Checkpointer.restore`).

    Returns:
      ``(step, state, metadata)``, the state as saved (host arrays).

    Raises:
      FileNotFoundError: no checkpoint; ValueError: another format, or none reads back.
    """
    directory = os.path.join(os.fspath(workdir), CHECKPOINT_SUBDIR)
    with Checkpointer(directory) as checkpointer:
        restored = checkpointer.restore_latest(parts=parts)
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {directory}" + (f"; {hint}" if hint else ""))
    step, state, meta = restored
    if formats and meta.get("format") not in formats:
        expected = " or ".join(formats)
        raise ValueError(f"{directory} holds a {meta.get('format')!r} checkpoint, not {expected}")
    return step, state, meta


def workdir_metadata(workdir) -> dict | None:
    """The metadata of a workdir's newest intact checkpoint (no arrays read), or ``None`` when
    it has none."""
    directory = os.path.join(os.fspath(workdir), CHECKPOINT_SUBDIR)
    if not os.path.isdir(directory):
        return None
    with Checkpointer(directory) as checkpointer:
        intact = checkpointer.latest_intact()
    return None if intact is None else intact[1]


def _select(tree: PyTree, parts: tuple[str, ...], where: str) -> dict:
    """The subtrees of a nested-dict ``tree`` at the ``/``-joined key paths ``parts``.

    Raises:
      ValueError: a part the tree does not have (named, with ``where``).
    """
    selected: dict = {}
    for part in parts:
        source, target, keys = tree, selected, part.split("/")
        for i, key in enumerate(keys):
            if not isinstance(source, dict) or key not in source:
                raise ValueError(f"{where} has no {'/'.join(keys[: i + 1])!r} (reading {part!r})")
            source = source[key]
            target = target.setdefault(key, {}) if i < len(keys) - 1 else target
        target[keys[-1]] = source
    return selected


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def describe_damage(error: Exception) -> str:
    """One short line for a checkpoint that failed to read: the file and the last two clauses
    of a TensorStore status (``DATA_LOSS: …``), without the spec, source locations or array
    indices that follow them."""
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    for marker in (" See full TensorStore details", " [", " {", "<bound method"):
        line = line.split(marker)[0]
    line = re.sub(r"array index: \(.*", "an array", line).strip().rstrip(":")
    status = re.match(r"([A-Z_]{4,}): ", line)
    files = re.findall(r'local file "([^"]+)"', line)
    if status and files:
        clauses = [c for c in line.split(": ") if '"' not in c][-2:]
        line = f"{status.group(1)} in {files[-1]}: {': '.join(clauses)}"
    line = line or type(error).__name__
    return line if len(line) <= 240 else line[:240] + " …"


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= 300 else line[:300] + " …"
