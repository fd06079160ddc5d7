"""The one run loop (ustad.training.run_loop) with tiny fake steps: when it checks, logs, saves
and calls hooks, and that a run stopped part-way and resumed equals an uninterrupted one."""

import math

import numpy as np
import pytest

from ustad.metric_writer import MetricWriter, read_metrics
from ustad.training import (
    Every,
    Hook,
    Log,
    Saves,
    check_member_losses,
    epoch_batches,
    member_losses,
    resume,
    run_loop,
)


def _step(events):
    """A fake step: the state is a running sum of the batches; the losses are [state, −state]."""

    def step(state, batch, step):
        events.append(("step", step))
        state = state + batch
        return state, np.array([state, -state], np.float32)

    return step


def _check(events, bad_at=None):
    def check(step, losses):
        events.append(("check", step))
        if step == bad_at:
            raise KeyboardInterrupt  # as if the job were killed
        check_member_losses(step, losses)

    return check


class FakeCheckpointer:
    def __init__(self):
        self.saved = {}

    def save(self, step, state, metadata):
        self.saved[step] = (state, metadata)

    def latest_intact(self):
        return (max(self.saved), self.saved[max(self.saved)][1]) if self.saved else None

    def restore_latest(self, target):
        if not self.saved:
            return None
        step = max(self.saved)
        return step, *self.saved[step]


def _log(writer=None, every=None, **kwargs):
    every = every or Every(2)
    return Log(writer, every, member_losses, {"img_per_s": 4}, "test", "img", 4, **kwargs)


def _run(batches, events, *, start=0, total=6, checkpointer=None, bad_at=None, hooks=(), **kw):
    saves = None
    if checkpointer is not None:
        saves = Saves(checkpointer, Every(2), lambda step: {"step": step})
    return run_loop(
        _step(events),
        np.float32(0) if start == 0 else checkpointer.restore_latest(None)[1],
        batches,
        start_step=start,
        total_steps=total,
        check=_check(events, bad_at),
        log=kw.pop("log", _log()),
        saves=saves,
        hooks=hooks,
        **kw,
    )


@pytest.mark.parametrize(
    "every, due",
    [
        (Every(2), [2, 4, 6]),
        (Every(4), [4]),
        (Every(4, final=True), [4, 7]),
        (Every(2, final=False), [2, 4, 6]),
        (Every(7), [7]),
        (Every(7, final=False), []),
        (Every(epochs=1), [3, 6]),
        (Every(epochs=2), [6]),
        (Every(5, epochs=1), [3, 5, 6]),
        (Every(epochs=3, final=True), [7]),
        (Every(), []),
    ],
)
def test_every(every, due):
    # 7 steps of 3 per epoch: the last epoch is cut short.
    assert [s for s in range(1, 8) if every.due(s, 7, steps_per_epoch=3)] == due


def test_every_step_is_checked_once_one_step_late_or_when_logged():
    events = []
    state = _run(iter(np.arange(1, 8, dtype=np.float32)), events, total=5, log=_log(every=Every(3)))
    assert state == 1 + 2 + 3 + 4 + 5
    assert events == [
        ("step", 0),
        ("step", 1),
        ("check", 0),  # after step 1 was dispatched
        ("step", 2),
        ("check", 1),
        ("check", 2),  # logged: checked at once
        ("step", 3),
        ("step", 4),
        ("check", 3),
        ("check", 4),  # the last, after the loop
    ]


def test_a_non_finite_loss_names_the_member_and_step():
    batches = np.array([1, 2, np.inf, 1, 1, 1], np.float32)
    with pytest.raises(FloatingPointError, match="student 0 became inf at step 2"):
        _run(iter(batches), [])
    with pytest.raises(FloatingPointError, match="student 1 became nan at step 3"):
        check_member_losses(3, np.array([1.0, math.nan]))


def test_metrics_lines_saves_and_hooks(tmp_path):
    checkpointer, events, seen = FakeCheckpointer(), [], []

    def double(step, state):
        events.append(("hook", step))
        return state * 2

    hooks = [
        Hook(Every(epochs=1, final=True), double),
        Hook.observer(Every(1), lambda step, state: seen.append((step, float(state))) or "x"),
    ]
    with MetricWriter(tmp_path) as writer:
        state = _run(
            iter(np.ones(6, np.float32)),
            events,
            checkpointer=checkpointer,
            hooks=hooks,
            log=_log(writer, Every(2, final=True)),
            steps_per_epoch=3,
        )
    # Sums doubled after steps 3 and 6: ((1 + 1 + 1)·2 + 1 + 1 + 1)·2.
    assert state == 18 and seen[-1] == (6, 18.0) and len(seen) == 6
    assert [e for e in events if e[0] == "hook"] == [("hook", 3), ("hook", 6)]
    # Saved after steps 2 and 4, never after the last; with the state of that moment.
    assert {s: (float(v[0]), v[1]) for s, v in checkpointer.saved.items()} == {
        2: (2.0, {"step": 2}),
        4: (7.0, {"step": 4}),
    }
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6]
    assert list(records[0])[2:] == ["epoch", "loss", "loss_0", "loss_1", "img_per_s"]
    assert [r["epoch"] for r in records] == [0, 1, 1]
    assert records[1]["loss_0"] == 7.0 and records[1]["loss"] == 0.0
    assert all(r["img_per_s"] > 0 for r in records)


def test_a_killed_run_resumes_to_the_same_state():
    batches = np.arange(1, 11, dtype=np.float32)
    whole = _run(iter(batches), [], total=10, checkpointer=FakeCheckpointer())

    checkpointer, events = FakeCheckpointer(), []
    with pytest.raises(KeyboardInterrupt):
        _run(iter(batches), events, total=10, checkpointer=checkpointer, bad_at=6)
    assert max(checkpointer.saved) == 6 and ("step", 8) not in events

    start, _, meta = resume(checkpointer, None, lambda meta: None)
    assert start == 6 and meta == {"step": 6}
    resumed = _run(iter(batches[start:]), [], start=start, total=10, checkpointer=checkpointer)
    assert resumed == whole == batches.sum()


def test_resume_checks_the_metadata_before_reading_arrays():
    checkpointer = FakeCheckpointer()
    assert resume(checkpointer, "fresh", lambda meta: 1 / 0) == (0, "fresh", {})
    checkpointer.save(4, "saved", {"lr": 1})

    def refuse(meta):
        raise ValueError(f"saved with lr={meta['lr']}")

    with pytest.raises(ValueError, match="lr=1"):
        resume(checkpointer, "fresh", refuse)
    assert resume(checkpointer, "fresh", lambda meta: None) == (4, "saved", {"lr": 1})


def test_too_few_batches_is_an_error():
    with pytest.raises(ValueError, match="ran out after step 4 of 6"):
        _run(iter(np.ones(4, np.float32)), [])


def test_nothing_to_do_returns_the_state():
    assert _run(iter([]), [], total=0) == 0


def test_epoch_batches_resume_mid_epoch_and_reshuffle_each_epoch():
    data = {"x": np.arange(10)}  # 3 steps of 3 per epoch, 1 example dropped
    batches = epoch_batches(data, 3, seed=0, sharding=None, start_step=0, total_steps=9)
    whole = [b["x"].tolist() for b in batches]
    assert len(whole) == 9 and all(len(b) == 3 for b in whole)
    epochs = [sorted(sum(whole[i : i + 3], [])) for i in (0, 3, 6)]
    assert all(len(set(e)) == 9 for e in epochs) and whole[:3] != whole[3:6]
    tail = epoch_batches(data, 3, seed=0, sharding=None, start_step=4, total_steps=9)
    assert [b["x"].tolist() for b in tail] == whole[4:]


def test_divergence_and_flattening_of_a_validation_history():
    from ustad.training_checks import check_not_diverged, flattened

    check_not_diverged([1.7, 1.8, 1.5], epoch=2)  # within 1.2× of the first
    with pytest.raises(FloatingPointError, match="diverged: validation loss 2.21 after epoch 5"):
        check_not_diverged([1.72, 1.83, 1.48, 0.52, 2.19, 2.21], epoch=5)
    with pytest.raises(FloatingPointError, match="validation loss nan"):
        check_not_diverged([1.0, float("nan")], epoch=1)
    assert flattened([1.0, 0.9]) is None  # too few to say
    assert flattened([1.6, 1.5, 1.4, 1.2, 1.0, 0.87, 0.7, 0.6]) is False  # still falling
    assert flattened([1.6, 1.0, 0.8, 0.7, 0.7, 0.699, 0.7, 0.698]) is True


def test_hold_out_keeps_a_minimum_of_validation_images():
    from ustad.data.split import split_validation

    assert len(split_validation(54, 0.1, 0)[1]) == 5  # the fraction alone
    assert len(split_validation(54, 0.1, 0, min_images=8)[1]) == 8
    assert len(split_validation(20, 0.1, 0, min_images=8)[1]) == 5  # at most a quarter
    assert len(split_validation(209, 0.1, 0, min_images=8)[1]) == 21  # the fraction is more
    train, val = split_validation(40, 0.1, 3, min_images=8)
    assert len(val) == 8 and sorted([*train, *val]) == list(range(40))
    with pytest.raises(ValueError, match="min_images must be >= 0"):
        split_validation(10, 0.1, 0, min_images=-1)


def test_settings_added_later_compare_against_what_old_runs_used():
    from ustad.training_checks import changed_settings

    old = {"config": {"val_fraction": 0.1}}  # written before val_min_images existed
    assert (
        changed_settings(old, {"val_fraction": 0.1, "val_min_images": 0}, ["val_min_images"]) == []
    )
    assert changed_settings(
        old, {"val_fraction": 0.1, "val_min_images": 8}, ["val_min_images"]
    ) == ["val_min_images=0 (now 8)"]
