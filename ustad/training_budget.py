"""Time budgets of training (``--config.max_minutes``) and floors of updates, shared by the three
trainers; :func:`ustad.training.run_loop` stops at a spent :class:`Budget`.
"""

from __future__ import annotations

import math
import time


class Budget:
    """A time budget for training (``--config.max_minutes``; 0 or less: none).

    What it counts, the *training clock*: the wall time inside :func:`ustad.training.run_loop`
    (steps, validations, checkpoint saves), less the first step's call in each process (its
    tracing and compilation: the step itself runs asynchronously after the call returns), plus
    ``spent_before_s``, the training clock of the runs this one resumes (each checkpoint
    records it as ``budget_seconds``). A resumed run therefore gets what is left of the budget,
    not a fresh one; the steps redone after a kill are counted twice (the time between the last
    checkpoint and the kill is lost), and a run resumed with its budget spent still makes one
    update (its first step boundary). Data loading, the teacher's cache and the score
    normalisation after training are outside the clock.

    Attributes:
      limit_s: the budget in seconds (inf: none).
      spent_before_s: the clock of the earlier runs of the same workdir.
      stopped_at: the step :func:`ustad.training.run_loop` stopped at because the budget was
        spent, or None.
      clock: the time source (seconds), replaceable in tests.
    """

    def __init__(self, max_minutes: float = 0.0, spent_before_s: float = 0.0, clock=None):
        minutes = float(max_minutes or 0.0)
        self.max_minutes = minutes
        self.limit_s = minutes * 60.0 if minutes > 0 else math.inf
        self.spent_before_s = float(spent_before_s)
        self.stopped_at: int | None = None
        self.clock = clock or time.perf_counter
        self._started: float | None = None
        self._excluded = 0.0

    def start(self) -> None:
        """Start this process's part of the clock (:func:`ustad.training.run_loop` calls it)."""
        self._started, self._excluded = self.clock(), 0.0

    def exclude(self, seconds: float) -> None:
        """Take ``seconds`` (a compilation) off this process's part of the clock."""
        self._excluded += seconds

    def seconds(self) -> float:
        """The training clock now, earlier runs included."""
        if self._started is None:
            return self.spent_before_s
        return self.spent_before_s + max(self.clock() - self._started - self._excluded, 0.0)

    def spent(self) -> bool:
        """Whether the training clock has reached the budget."""
        return self.seconds() >= self.limit_s


def check_max_minutes(config) -> None:
    """Refuse a ``--config.max_minutes`` that is not a finite number ≥ 0, in one line."""
    value = config.get("max_minutes", 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise ValueError(f"--config.max_minutes={value!r}: must be a number ≥ 0 (0 = no limit)")


def run_budget(config, meta: dict) -> Budget:
    """The run's :class:`Budget`: ``config.max_minutes`` less what the checkpoint ``meta`` it
    resumes from already spent (``meta["budget_seconds"]``)."""
    return Budget(config.get("max_minutes", 0.0), float(meta.get("budget_seconds", 0.0)))


def finished(meta: dict, start_step: int, total_steps: int) -> bool:
    """Whether the newest checkpoint (``meta``, at ``start_step``) is a finished run: trained to
    its last step, or stopped by its time budget, and its score normalised."""
    done = start_step == total_steps or meta.get("stopped_by") == "max_minutes"
    return bool(meta.get("score_normalization")) and done


def scheduled_steps(epochs: int, steps_per_epoch: int, min_steps: int = 0) -> int:
    """``epochs`` whole epochs, or the fewest whole epochs that reach the floor ``min_steps``
    when that is more (a floor of updates that does not shrink with a category's size)."""
    return max(int(epochs), -(-int(min_steps) // steps_per_epoch)) * steps_per_epoch
