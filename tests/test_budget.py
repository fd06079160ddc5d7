"""The time-box plan of a students run (benchmarks/gpu_paper.py): epochs that fit."""

import pytest

from ustad.uninformed_students.budget import (
    StepTiming,
    epochs_that_fit,
    plan_epochs,
    scale_overhead_s,
    scoring_reserve_s,
)


def test_plan_epochs_is_whole_epochs_between_one_and_the_paper():
    assert plan_epochs(100.0, 30.0, 100) == 3
    assert plan_epochs(10.0, 30.0, 100) == 1  # never none
    assert plan_epochs(1e6, 1.0, 100) == 100
    assert plan_epochs(-5.0, 0.0, 7) == 7  # an epoch that costs nothing


def test_epochs_that_fit_subtract_the_reserve_and_every_scale_overhead():
    timings = [StepTiming(step_s=0.5, compile_s=10.0, teacher_s=0.1)] * 2
    overhead = scale_overhead_s(timings[0], num_train=20)
    assert overhead == pytest.approx(1.5 * 10 + 3 * 20 * 0.1 + 5)
    reserve = scoring_reserve_s(
        timings, num_students=3, num_test=10, score_batches=[1, 16], repeats=5
    )
    per_image = 2 * 4 * 0.1  # two scales, teacher and 3 students each
    sets = 3  # each scale and the multi-scale average
    expected = 2 * per_image * 10 + sets * 2 * 10.0 + 5 * per_image * 2 * 17 + 15
    assert reserve == pytest.approx(expected)
    left = reserve + 2 * overhead + 7 * (2 * 18 * 0.5) + 1.0
    fit = {"steps_per_epoch": 18, "reserve_s": reserve, "num_train": 20}
    assert epochs_that_fit(left, timings, **fit, max_epochs=100) == 7
    # The last scale alone gets the time the first one left.
    assert epochs_that_fit(left, timings[1:], **fit, max_epochs=100) > 7
