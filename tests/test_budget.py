"""Budgets of a training run (issue 21): the time-box plan of a students run
(benchmarks/gpu_paper.py); ``--config.max_minutes`` in the one run loop and both trainers (stop,
save, record, resume with the remainder); the floor of updates on a tiny category; the students
of lowest validation loss kept by both families; ``keep_aspect="auto"``."""

import functools
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_training import FakeCheckpointer

from ustad.selection import (
    keep_best_fn,
)
from ustad.training import (
    Every,
    Hook,
    Log,
    Saves,
    check_member_losses,
    member_losses,
    resume,
    run_loop,
)
from ustad.training_budget import Budget, finished, scheduled_steps
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


# --------------------------------------------------------------------- the run loop's budget


class _Clock:
    """A fake clock the fake step advances: 100 s for the first call of a process (its
    compilation), then 10 s a step."""

    def __init__(self):
        self.now, self.calls = 0.0, 0

    def __call__(self):
        return self.now


def _budget_run(clock, budget, *, start=0, state=0.0, total=10, saved=None, events=None):
    events = [] if events is None else events
    first = [True]

    def step(state, batch, step):
        clock.now += 100.0 if first[0] else 10.0
        first[0] = False
        events.append(("step", step + 1))
        return state + batch, np.array([state + batch], np.float32)

    def hook(step, state):
        events.append(("final", step))
        return state

    saved = FakeCheckpointer() if saved is None else saved
    state = run_loop(
        step,
        state,
        iter(np.ones(total, np.float32)),
        start_step=start,
        total_steps=total,
        check=check_member_losses,
        log=Log(None, Every(1), member_losses, {}, "test"),
        saves=Saves(saved, Every(2), lambda s: {"budget_seconds": budget.seconds()}),
        hooks=[Hook(Every(epochs=100, final=True), hook)],
        steps_per_epoch=2,
        budget=budget,
    )
    return state, saved, events


def test_a_budget_stops_at_the_first_step_past_it_without_counting_compilation():
    clock = _Clock()
    budget = Budget(0.5, clock=clock)  # 30 s
    state, saved, events = _budget_run(clock, budget)
    # Step 1 (100 s) is compilation; steps 2, 3, 4 spend 10 s each: 30 s after step 4.
    assert budget.stopped_at == 4 and state == 4.0
    assert [e for e in events if e[0] == "final"] == [("final", 4)]  # the last step's hooks
    assert sorted(saved.saved) == [2]  # no periodic save at the stop: the trainer saves it
    assert saved.saved[2][1]["budget_seconds"] == 10.0
    assert budget.seconds() == 30.0

    # No budget (0 minutes): the whole schedule.
    clock = _Clock()
    budget = Budget(0.0, clock=clock)
    state, _, _ = _budget_run(clock, budget)
    assert budget.stopped_at is None and state == 10.0 and budget.limit_s == float("inf")


def test_a_resumed_run_gets_the_remainder_of_its_budget():
    # Killed after the checkpoint of step 2 (10 s spent): 20 s are left, i.e. the compilation
    # of the resumed process (free) and two more steps.
    clock, saved = _Clock(), FakeCheckpointer()
    saved.save(2, 2.0, {"budget_seconds": 10.0})
    start, state, meta = resume(saved, None, lambda meta: None)
    budget = Budget(0.5, meta["budget_seconds"], clock=clock)
    state, saved, events = _budget_run(clock, budget, start=start, state=state, saved=saved)
    assert budget.stopped_at == 5 and state == 5.0 and budget.seconds() == 30.0
    # A budget already spent: one step (the first boundary), then the final hooks.
    clock = _Clock()
    budget = Budget(0.5, 31.0, clock=clock)
    state, _, events = _budget_run(clock, budget, start=2, state=2.0, saved=FakeCheckpointer())
    assert budget.stopped_at == 3 and state == 3.0 and events == [("step", 3), ("final", 3)]


def test_a_stopped_run_with_its_normalisation_is_finished():
    assert finished({"score_normalization": [1]}, 10, 10)
    assert finished({"score_normalization": [1], "stopped_by": "max_minutes"}, 4, 10)
    assert not finished({"stopped_by": "max_minutes"}, 4, 10)  # killed before its normalisation
    assert not finished({"score_normalization": [1]}, 4, 10)


@pytest.mark.parametrize("value", [-1.0, float("inf"), float("nan")])
def test_bad_max_minutes_are_refused_in_one_line(value):
    from ustad.stfpm.config import stfpm_config, validate

    config = stfpm_config("smoke")
    config.max_minutes = value
    with pytest.raises(ValueError, match=r"--config.max_minutes=.* must be a number ≥ 0"):
        validate(config)


# --------------------------------------------------------------------------- floors of updates


def test_no_preset_trains_fewer_than_its_floor_on_a_40_image_category():
    from ustad.data.split import split_validation
    from ustad.stfpm.config import stfpm_config
    from ustad.stfpm.run import schedule
    from ustad.uninformed_students.config import students_config
    from ustad.uninformed_students.schedule import scale_schedule

    def trained(config):  # bottle with 40 images: what the hold-out leaves to train on
        train, _ = split_validation(40, config.val_fraction, config.seed, config.val_min_images)
        return len(train)

    for name, floor in [("cpu", 60), ("cpu_ensemble", 60), ("lite0", 500), ("resnet18", 500)]:
        config = stfpm_config(name)
        spe = trained(config) // config.batch_size
        total, got_floor = schedule(config, spe)
        assert got_floor == floor and floor <= total < floor + spe, name
        assert total % spe == 0  # whole epochs
    assert trained(stfpm_config("cpu")) == 32  # 8 held out: 4 updates an epoch, 15 epochs

    for name, p, floor in [("cpu", 17, 940), ("cpu", 33, 1128), ("p65", 65, 18_800),
                           ("multiscale_small", 17, 18_800)]:  # fmt: skip
        config = students_config(name)
        spe = trained(config) // config.batch_size
        total, got_floor = scale_schedule(config, p, spe)
        assert got_floor == floor and floor <= total < floor + spe, (name, p)
    # cpu with a scale it has no count for: epochs (100), but never fewer than 940 updates.
    config = students_config("cpu")
    assert scale_schedule(config, 65, 1) == (940, 940)
    assert scale_schedule(config, 65, 16) == (1600, 940)
    # The smoke presets count epochs only; an explicit floor still raises them.
    config = students_config("smoke")
    assert scale_schedule(config, 17, 3) == (6, 0)
    config.min_train_steps = 10
    assert scale_schedule(config, 17, 3) == (12, 10)
    assert scheduled_steps(2, 3, 0) == 6 and scheduled_steps(2, 3, 7) == 9


@pytest.mark.parametrize(
    "name, images, steps",
    [("cpu_small", 400, 360), ("cpu_tiny", 20, 18), ("cpu", 150, 135), ("reduced", 1000, 4500)],
)
def test_one_class_schedules_count_their_epochs_not_the_category_floor(name, images, steps):
    """The one-class presets train a fixed number of images per class for their epochs (the
    category floor once made cpu_small's 360 steps 18,900: 50 minutes a class instead of 1)."""
    import importlib.util
    from pathlib import Path

    from ustad.data.split import split_validation
    from ustad.uninformed_students.schedule import scale_schedule

    path = Path(__file__).parents[1] / "configs" / "paper_one_class.py"
    spec = importlib.util.spec_from_file_location("paper_one_class_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(name)
    students = config.students
    train, _ = split_validation(images, students.val_fraction, 0, students.val_min_images)
    spe = len(train) // students.batch_size
    assert scale_schedule(students, config.patch_size, spe)[0] == steps


def test_the_demo_counts_its_epochs_not_the_category_floor():
    """`make demo` trains 12 epochs per scale; the category floor once made them 18,804
    updates (25 minutes instead of one)."""
    import importlib.util
    from pathlib import Path

    from ustad.uninformed_students.schedule import scale_schedule

    path = Path(__file__).parents[1] / "configs" / "demo.py"
    spec = importlib.util.spec_from_file_location("demo_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    students = module.get_config().students
    for patch_size in (17, 33):
        assert scale_schedule(students, patch_size, 12)[0] == 144


@pytest.mark.parametrize("name, epochs", [("reduced", 20), ("cpu_p33", 2), ("smoke", 1)])
def test_reduced_paper_schedules_count_their_epochs(name, epochs):
    """configs/paper_mvtec.py's reduced schedules once inherited the paper's 18,800 updates as a
    floor (smoke: 1 epoch became 18,800 updates)."""
    import importlib.util
    from pathlib import Path

    from ustad.uninformed_students.schedule import scale_schedule

    path = Path(__file__).parents[1] / "configs" / "paper_mvtec.py"
    spec = importlib.util.spec_from_file_location("paper_mvtec_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(name)
    for patch_size in config.patch_sizes:
        assert scale_schedule(config.students, patch_size, 10)[0] == 10 * epochs


# --------------------------------------------------------------------- the best students kept


def test_keep_best_keeps_each_members_variables_of_lowest_loss():
    keep = keep_best_fn("step")
    members = {"params": {"w": jnp.zeros((2, 3))}}
    best = {
        "params": {"w": jnp.zeros((2, 3))},
        "val_loss": jnp.full(2, jnp.inf),
        "step": -jnp.ones(2, jnp.int32),
    }
    best = keep(best, {"params": {"w": jnp.ones((2, 3))}}, jnp.array([2.0, 3.0]), 5)
    best = keep(best, {"params": {"w": 2 * jnp.ones((2, 3))}}, jnp.array([1.0, 4.0]), 9)
    np.testing.assert_array_equal(best["params"]["w"], [[2, 2, 2], [1, 1, 1]])
    np.testing.assert_array_equal(best["step"], [9, 5])
    np.testing.assert_array_equal(best["val_loss"], [1.0, 3.0])
    assert members["params"]["w"].sum() == 0


# ------------------------------------------------------------------------ STFPM, end to end


def _stfpm_config(**overrides):
    from ustad.stfpm.config import stfpm_config

    config = stfpm_config("smoke")
    config.prng_impl = "rbg"  # fast to compile on XLA:CPU
    config.image_size = 16
    config.epochs = 2
    config.batch_size = 4
    config.eval_batch_size = 4
    config.val_min_images = 2
    for field, value in overrides.items():
        config[field] = value
    return config


def _stfpm_images(n=12, size=(16, 16), seed=0):
    return np.random.default_rng(seed).uniform(size=(n, *size, 3)).astype(np.float32)


def _meta(workdir):
    from ustad.checkpointing import workdir_metadata

    return workdir_metadata(workdir)


def _same(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_stfpm_budget_stop_kill_and_resume(tmp_path, monkeypatch, caplog):
    import ustad.stfpm.train as stfpm_train

    images = _stfpm_images()  # 9 trained (3 held out), batch 4: 2 updates an epoch, 4 in all
    whole = stfpm_train.train_stfpm(_stfpm_config(), tmp_path / "whole", images)
    meta = _meta(tmp_path / "whole")
    assert meta["stopped_by"] == "schedule" and meta["updates"] == 4 and meta["step"] == 4
    assert len(meta["selected_steps"]) == 1 and meta["selected_steps"][0] in (2, 4)
    assert meta["selected_val_loss"][0] == pytest.approx(min(meta["val_history"]), rel=1e-6)

    # Killed in step 3 (after the checkpoint of step 2), resumed: the same students as whole.
    original = stfpm_train.check_member_losses

    def killed(step, losses):
        if step == 2:
            raise KeyboardInterrupt
        original(step, losses)

    monkeypatch.setattr(stfpm_train, "check_member_losses", killed)
    with pytest.raises(KeyboardInterrupt):
        stfpm_train.train_stfpm(_stfpm_config(), tmp_path / "resumed", images)
    monkeypatch.setattr(stfpm_train, "check_member_losses", original)
    shutil.copytree(tmp_path / "resumed", tmp_path / "spent")
    assert _meta(tmp_path / "resumed")["step"] == 2
    assert _meta(tmp_path / "resumed")["budget_seconds"] > 0
    # A budget of hours leaves the resumed run its schedule: bit-identical to the whole run.
    resumed = stfpm_train.train_stfpm(
        _stfpm_config(max_minutes=600.0), tmp_path / "resumed", images
    )
    _same(resumed.params, whole.params)
    assert _meta(tmp_path / "resumed")["val_history"] == meta["val_history"]

    # A budget the killed run had already spent: the resumed run stops after one update.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ustad"):
        stopped = stfpm_train.train_stfpm(
            _stfpm_config(max_minutes=1e-9), tmp_path / "spent", images
        )
    spent = _meta(tmp_path / "spent")
    assert spent["stopped_by"] == "max_minutes" and spent["updates"] == 3 and spent["step"] == 3
    assert spent["val_loss_flattened"] is None  # 2 validations: too few to judge
    assert len(spent["val_history"]) == 2  # after epoch 1, and at the stop
    assert "max_minutes=1e-09 stopped training after 3 of 4 updates" in caplog.text
    assert "cannot be judged yet" in caplog.text
    # Finished: asked again, the same model comes back without training.
    again = stfpm_train.train_stfpm(_stfpm_config(max_minutes=1e-9), tmp_path / "spent", images)
    _same(again.params, stopped.params)
    assert _meta(tmp_path / "spent")["step"] == 3


def test_stfpm_tiny_budget_trains_one_update_and_says_so(tmp_path, caplog):
    from ustad.stfpm.train import train_stfpm

    with caplog.at_level(logging.WARNING, logger="ustad"):
        train_stfpm(_stfpm_config(max_minutes=1e-9), tmp_path, _stfpm_images())
    meta = _meta(tmp_path)
    # The first step's compilation is not counted; the first boundary after the budget is 1.
    assert meta["stopped_by"] == "max_minutes" and meta["updates"] == 1 and meta["step"] == 1
    assert meta["selected_steps"] == [1] and len(meta["val_history"]) == 1
    assert meta["max_minutes"] == 1e-9 and "stopped training after 1 of 4 updates" in caplog.text


# ------------------------------------------------------------- Uninformed Students, end to end

US_P, US_SIZE = 17, 16


@pytest.fixture(scope="module")
def us_data():
    from ustad.uninformed_students.nets import patch_net

    images = np.random.default_rng(5).uniform(size=(8, US_SIZE, US_SIZE, 3)).astype(np.float32)
    teacher = patch_net(US_P, widths=1 / 16, out_dim=8)
    key = jax.random.key(6, impl="rbg")
    teacher_vars = jax.jit(teacher.init)(key, jnp.zeros((1, US_P, US_P, 3)))
    return images, (teacher, teacher_vars)


def _us_config(**overrides):
    from ustad.uninformed_students.config import students_config

    config = students_config("smoke")
    config.image_size = US_SIZE
    config.num_students = 2
    config.learning_rate, config.weight_decay = 1e-3, 1e-2
    config.epochs = 3
    config.batch_size = 2
    config.val_fraction = 0.25  # 2 held out, 6 trained: 3 updates an epoch
    config.num_devices = 1
    config.stats_batch_size = config.eval_batch_size = 8
    config.prng_impl = "rbg"
    for field, value in overrides.items():
        config[field] = value
    return config


def test_students_keep_their_variables_of_lowest_validation_loss(us_data, tmp_path):
    from ustad.metric_writer import read_metrics
    from ustad.selection import validation_losses
    from ustad.uninformed_students.train import train_students
    from ustad.uninformed_students.validation import validation_loss_fn

    images, teacher = us_data
    # lr 0.03: student 1 overshoots after step 6 (validation loss 7.3, 7.3, 684), so its best
    # step is not the last one; student 0's is (10.4, 9.2, 8.0).
    config = _us_config(learning_rate=0.03, weight_decay=0.0)
    scale = train_students(config, tmp_path / "best", images, teacher=teacher)
    meta = _meta(tmp_path / "best")
    history, steps, losses = meta["val_history"], meta["selected_steps"], meta["selected_val_loss"]
    assert len(history) == 3 and meta["stopped_by"] == "schedule" and meta["updates"] == 9
    assert steps == [9, 6]
    # Each student's kept loss is its own lowest, and its kept params score it.
    per_student = [
        r for r in read_metrics(tmp_path / "best" / "metrics.jsonl") if "val_loss_0" in r
    ]
    assert [r["step"] for r in per_student] == [3, 6, 9]
    for i in range(2):
        lowest = min(per_student, key=lambda r: r[f"val_loss_{i}"])
        assert steps[i] == lowest["step"]
        assert losses[i] == pytest.approx(lowest[f"val_loss_{i}"], rel=1e-6)
    from ustad.training import hold_out

    _, val = hold_out(images, None, config.val_fraction, config.seed, config.val_min_images)
    fn = validation_loss_fn(teacher[0], teacher[0], config.padding, "sequential")
    params = scale.params
    stats = {"mean": params["mean"], "std": params["std"]}
    again = validation_losses(
        functools.partial(fn, params["teacher"], stats, params["students"]),
        val, batch_size=8, put=jnp.asarray,
    )  # fmt: skip
    np.testing.assert_allclose(again, losses, rtol=1e-5)

    # "last" keeps the last step's students: other params, the record says the last step.
    last = train_students(
        _us_config(learning_rate=0.03, weight_decay=0.0, select="last"),
        tmp_path / "last", images, teacher=teacher,
    )  # fmt: skip
    assert _meta(tmp_path / "last")["selected_steps"] is None
    differs = jax.tree.map(
        lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
        last.params["students"], scale.params["students"],
    )  # fmt: skip
    assert any(jax.tree.leaves(differs))


def test_students_stop_at_their_budget(us_data, tmp_path, caplog):
    from ustad.uninformed_students.score import Detector
    from ustad.uninformed_students.train import train_students

    images, teacher = us_data
    with caplog.at_level(logging.WARNING, logger="ustad"):
        train_students(_us_config(max_minutes=1e-9), tmp_path, images, teacher=teacher)
    meta = _meta(tmp_path)
    assert meta["stopped_by"] == "max_minutes" and meta["updates"] == 1 and meta["step"] == 1
    assert meta["selected_steps"] == [1, 1] and meta["score_normalization"]
    assert "students p17: --config.max_minutes=1e-09 stopped training after 1 of 9" in caplog.text
    assert Detector.load(tmp_path).scales[0].num_students == 2


# ------------------------------------------------------------------------ keep_aspect="auto"


def test_auto_keeps_the_aspect_of_non_square_images_only():
    from ustad.data.mvtec import resolve_keep_aspect

    assert resolve_keep_aspect("auto", (460, 1130), 256)  # ball screws
    assert resolve_keep_aspect("auto", (300, 400), 256)  # 4:3
    assert not resolve_keep_aspect("auto", (900, 900), 256)
    assert not resolve_keep_aspect("auto", (100, 109), 256)  # within the 1.1 tolerance
    assert not resolve_keep_aspect("auto", (460, 1130), (256, 256))  # an explicit (H, W)
    assert resolve_keep_aspect(True, (900, 900), 256)
    assert not resolve_keep_aspect(False, (460, 1130), 256)
    with pytest.raises(ValueError, match="--config.keep_aspect='yes': choose True, False or"):
        resolve_keep_aspect("yes", (460, 1130), 256)


def test_both_families_default_to_auto_and_refuse_other_values():
    from ustad.stfpm.config import stfpm_config
    from ustad.stfpm.config import validate as validate_stfpm
    from ustad.uninformed_students.config import students_config
    from ustad.uninformed_students.config import validate as validate_students

    assert stfpm_config("cpu").keep_aspect == "auto" == students_config("cpu").keep_aspect
    for config, validate in ((stfpm_config("smoke"), validate_stfpm),
                             (students_config("smoke"), validate_students)):  # fmt: skip
        config.keep_aspect = "sometimes"
        with pytest.raises(ValueError, match="--config.keep_aspect='sometimes': choose one of"):
            validate(config)


def test_stfpm_trains_non_square_images_at_their_aspect_and_scores_at_theirs(tmp_path):
    from ustad import load_detector
    from ustad.data.synthetic import make_synthetic_category
    from ustad.families import train
    from ustad.stfpm.run import training_images
    from ustad.stfpm.train import held_out_images

    make_synthetic_category(
        tmp_path / "data", "wide", image_size=(24, 36), num_train=20, num_test_good=1,
        num_test_per_defect=1,
    )  # fmt: skip
    config = _stfpm_config(data_dir=str(tmp_path / "data"), category="wide", epochs=1)
    config.val_min_images = 5  # 5 held out: enough good images for a (coarse) calibration
    # The short side 16, the long one 24 rounded to the tiny ResNet's stride 16: 16 × 32.
    assert training_images(config).shape[1:3] == (16, 32)
    assert held_out_images(config).shape[1:3] == (16, 32)
    square = _stfpm_config(data_dir=str(tmp_path / "data"), category="wide", keep_aspect=False)
    assert training_images(square).shape[1:3] == (16, 16)

    train(config, tmp_path / "run")
    assert _meta(tmp_path / "run")["image_size"] == [16, 32]
    # Calibrated after training on the held-out images at the training size.
    assert (tmp_path / "run" / "calibration.json").is_file()
    detector = load_detector(tmp_path / "run")
    assert detector.input_sizes == [(16, 32)]
    native = np.random.default_rng(1).uniform(size=(2, 24, 36, 3)).astype(np.float32)
    maps, scores = detector.score(native)
    assert maps.shape == (2, 24, 36) and np.isfinite(maps).all() and scores.shape == (2,)
