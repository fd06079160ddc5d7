"""How many epochs of a students run fit in a wall-time box, from a timed step probe.

A time-boxed run (``benchmarks/gpu_paper.py``) times a few steps of each scale first, then plans:
the epochs E that fit are (time left − the scoring and evaluation reserve − per-scale overheads)
÷ Σ over scales of (steps per epoch × step time), at least 1 and at most the paper's. After each
scale the plan is redone from the time actually spent, with the scales still to train.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

__all__ = [
    "StepTiming",
    "epochs_that_fit",
    "plan_epochs",
    "scale_overhead_s",
    "scoring_reserve_s",
]


@dataclasses.dataclass(frozen=True)
class StepTiming:
    """What the step probe measured for one scale.

    Attributes:
      step_s: median seconds of one train step of the M students.
      compile_s: seconds to compile that step and the teacher's dense pass.
      teacher_s: median seconds of the teacher's dense pass over one image.
    """

    step_s: float
    compile_s: float
    teacher_s: float


def plan_epochs(remaining_s: float, per_epoch_s: float, max_epochs: int) -> int:
    """The whole epochs of ``per_epoch_s`` that fit in ``remaining_s``, in [1, max_epochs]
    (``max_epochs`` when an epoch costs nothing)."""
    if per_epoch_s <= 0:
        return max_epochs
    return int(max(1, min(max_epochs, remaining_s // per_epoch_s)))


def scale_overhead_s(timing: StepTiming, num_train: int) -> float:
    """A scale's time outside its steps: compiling (the trainer recompiles what the probe
    compiled, half of it from the cache) and three teacher passes over the training images
    (target statistics, cached targets, validation), plus 5 s of margin."""
    return 1.5 * timing.compile_s + 3 * num_train * timing.teacher_s + 5.0


def scoring_reserve_s(
    timings: Sequence[StepTiming],
    *,
    num_students: int,
    num_test: int,
    score_batches: Sequence[int],
    repeats: int,
) -> float:
    """Time kept for after training: scoring the test set (every scale, then the multi-scale
    set), compiling one scorer per (set, batch size), the timed scoring repeats, and 15 s for
    the metrics on the host, the figures and margin."""
    per_image = sum((1 + num_students) * t.teacher_s for t in timings)
    sets = len(timings) + (len(timings) > 1)
    return (
        2 * per_image * num_test
        + sets * len(score_batches) * max(t.compile_s for t in timings)
        + repeats * per_image * 2 * sum(score_batches)
        + 15.0
    )


def epochs_that_fit(
    left_s: float,
    timings: Sequence[StepTiming],
    steps_per_epoch: int,
    *,
    reserve_s: float,
    num_train: int,
    max_epochs: int,
) -> int:
    """The epochs every scale of ``timings`` (those still to train) can get in ``left_s``.

    Args:
      left_s: seconds left in the box.
      timings: the probe of each scale still to train.
      steps_per_epoch: steps of one epoch (the same for every scale).
      reserve_s: :func:`scoring_reserve_s`.
      num_train: training images (for :func:`scale_overhead_s`).
      max_epochs: the paper's epochs.
    """
    remaining = left_s - reserve_s - sum(scale_overhead_s(t, num_train) for t in timings)
    per_epoch = sum(steps_per_epoch * t.step_s for t in timings)
    return plan_epochs(remaining, per_epoch, max_epochs)
