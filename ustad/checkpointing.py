"""Checkpoints through Orbax (the only module that imports it).

A run's state (a pytree of arrays) and a small JSON dict of metadata (config, statistics, step)
are saved together under ``<directory>/<step>``; saves are asynchronous and atomic (Orbax writes to
a temporary folder and renames), so a killed run never leaves a half-written step, and
:meth:`Checkpointer.restore_latest` resumes from the newest finished one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any


class Checkpointer:
    """Save and restore ``(state, metadata)`` pairs by step.

    Args:
      directory: folder for the checkpoints (created if missing).
      max_to_keep: how many recent steps to keep.
      async_save: write in a background thread (call :meth:`wait` before reading files).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2, async_save=True):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete step, or ``None``."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: PyTree, metadata: dict | None = None) -> None:
        """Save ``state`` (arrays) and ``metadata`` (JSON-serialisable) as ``step``."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                metadata=ocp.args.JsonSave(metadata or {}),
            ),
            force=True,
        )

    def restore(self, step: int, target: PyTree | None = None) -> tuple[PyTree, dict]:
        """Restore ``step``.

        Args:
          step: which step.
          target: a pytree of arrays (or ``jax.ShapeDtypeStruct``) with the state's structure,
            shapes, dtypes and shardings; ``None`` restores as saved (host arrays).

        Returns:
          ``(state, metadata)``.
        """
        if step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}"
            )
        if target is not None:
            target = jax.tree.map(_abstract, target)
            state_args = ocp.args.StandardRestore(target)
        else:
            state_args = ocp.args.StandardRestore()
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=state_args, metadata=ocp.args.JsonRestore())
        )
        return restored["state"], dict(restored["metadata"] or {})

    def restore_latest(self, target: PyTree | None = None) -> tuple[int, PyTree, dict] | None:
        """``(step, state, metadata)`` of the newest checkpoint, or ``None`` if there is none."""
        step = self.latest_step()
        if step is None:
            return None
        state, metadata = self.restore(step, target)
        return step, state, metadata

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
