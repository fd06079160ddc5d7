"""The trainers' shared ground floor: hold-out, resumption, batches and the one run loop (input
and setting checks: :mod:`ustad.training_checks`; time budgets: :mod:`ustad.training_budget`;
validation and the selection of the best students: :mod:`ustad.selection`).

The three trainers (teacher, students, STFPM) differ in their step, their batches and what
they do after it; :func:`run_loop` is the rest, the same for all: steps ``start_step …
total_steps − 1`` over a batch source, each step's losses checked for NaN/inf one step late (so
the host never waits for the step it just dispatched), metrics lines with throughput, a
progress bar, periodic checkpoints and hooks (validation, snapshots, a caller's callback).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from ustad import sharding as shd
from ustad.metric_writer import MetricWriter, check_finite, progress

if TYPE_CHECKING:
    from ustad.checkpointing import Checkpointer
    from ustad.training_budget import Budget

PyTree = Any
logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------- setting up


def run_key(seed: int, impl: str = "threefry2x32") -> jax.Array:
    """The run's typed PRNG key; each use folds in its own number (init 0, data 1, teacher 2).

    threefry (JAX's default) draws the same numbers on any mesh; ``"rbg"`` compiles much faster
    on CPU (seconds per run, which matters for tests) but may depend on the sharding.
    """
    return jax.random.key(seed, impl=impl)


def hold_out(
    images: np.ndarray,
    val_images: np.ndarray | None,
    fraction: float,
    seed: int,
    min_images: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """``(train, validation)`` images: ``val_images`` when given, else ``fraction`` of
    ``images`` (at least ``min_images``, at most a quarter) held out (split by ``seed``,
    :func:`ustad.data.split.split_validation`).

    Args:
      images: ``[N, H, W, C]``.
      val_images: ``[V, H, W, C]`` or ``None``.
    """
    if val_images is not None:
        return images, val_images
    # Imported here: ustad.data pulls in TensorFlow Datasets, which the steps do without.
    from ustad.data.split import split_validation

    train_idx, val_idx = split_validation(len(images), fraction, seed, min_images)
    return images[train_idx], images[val_idx]


def resume(
    checkpointer: Checkpointer, state: PyTree, check: Callable[[dict], None]
) -> tuple[int, PyTree, dict]:
    """``(start_step, state, metadata)`` of the newest checkpoint that reads back, or
    ``(0, state, {})`` for a fresh run.

    ``check(metadata)`` runs (and may raise) before any array is read: restoring into another
    architecture would fail with a shape error that does not say which setting changed.
    """
    latest = checkpointer.latest_intact()
    if latest is None:
        return 0, state, {}
    check(latest[1])
    restored = checkpointer.restore_latest(state)
    return (0, state, {}) if restored is None else restored


def process_writer(workdir) -> contextlib.AbstractContextManager[MetricWriter | None]:
    """The run's metrics file on process 0, ``None`` on the others (which write no metrics);
    either as a context manager that closes it."""
    return MetricWriter(workdir) if jax.process_index() == 0 else contextlib.nullcontext()


def epoch_batches(
    data: PyTree,
    batch_size: int,
    *,
    seed: int,
    sharding: jax.sharding.NamedSharding | None,
    start_step: int,
    total_steps: int,
) -> Iterator[PyTree]:
    """The batches of steps ``start_step … total_steps − 1``, epoch after epoch, each epoch a
    fresh permutation of ``data`` (by ``seed`` and the epoch), the first resumed mid-epoch.

    Args:
      data: a pytree of arrays sharing the leading dimension N, e.g. ``{"image": [N, H, W, C]}``.
      batch_size: examples per step; an epoch is ``N // batch_size`` steps.
      sharding: where each batch goes (see :func:`ustad.data.pipeline.iterate_batches`).
    """
    from ustad.data.pipeline import iterate_batches, num_batches

    steps_per_epoch = num_batches(len(jax.tree.leaves(data)[0]), batch_size)
    for epoch in range(start_step // steps_per_epoch, -(-total_steps // steps_per_epoch)):
        yield from iterate_batches(
            data,
            batch_size,
            seed=seed,
            epoch=epoch,
            sharding=sharding,
            start_batch=max(start_step - epoch * steps_per_epoch, 0),
        )


def member_losses(losses: np.ndarray) -> dict[str, float]:
    """The metrics of an ensemble's losses ``[M]``: their mean ``loss`` and ``loss_<i>``."""
    return {
        "loss": float(np.mean(losses)),
        **{f"loss_{i}": float(v) for i, v in enumerate(losses)},
    }


def check_member_losses(step: int, losses: np.ndarray) -> None:
    """``FloatingPointError`` naming the member and step when a loss of ``[M]`` is NaN or inf."""
    for i, value in enumerate(np.asarray(losses).reshape(-1)):
        check_finite(f"the loss of student {i}", float(value), step)


# --------------------------------------------------------------------------------- the loop


@dataclasses.dataclass(frozen=True)
class Every:
    """When something in :func:`run_loop` happens, after ``step`` steps (counted from 1).

    Attributes:
      steps: after every ``steps``-th step (0: not by steps).
      epochs: after every ``epochs``-th epoch's last step (0: not by epochs).
      final: after the run's last step: True always, False never, None when due as above.
    """

    steps: int = 0
    epochs: int = 0
    final: bool | None = None

    def due(self, step: int, total_steps: int, steps_per_epoch: int = 0) -> bool:
        if step == total_steps and self.final is not None:
            return self.final
        if self.steps and step % self.steps == 0:
            return True
        if not (self.epochs and steps_per_epoch) or step % steps_per_epoch:
            return False
        return (step // steps_per_epoch) % self.epochs == 0


@dataclasses.dataclass(frozen=True)
class Hook:
    """``fn(step, state) -> state`` after the steps ``when`` says (``step`` counted from 1).

    The state is the step's output; its buffers are donated to the next step, so a hook that
    keeps arrays copies them."""

    when: Every
    fn: Callable[[int, PyTree], PyTree]

    @classmethod
    def observer(cls, when: Every, fn: Callable[[int, PyTree], Any]) -> Hook:
        """A hook that only looks at the state (a callback, a snapshot): ``fn``'s result is
        ignored, the state passes on unchanged."""

        def observe(step: int, state: PyTree) -> PyTree:
            fn(step, state)
            return state

        return cls(when, observe)


@dataclasses.dataclass(frozen=True)
class Log:
    """What :func:`run_loop` reports, and when.

    Attributes:
      writer: the run's metrics file; ``None`` on the processes that write none (they show no
        progress bar either, but still fetch the losses: that may be a collective).
      every: the steps whose losses are written (``{"epoch": …}`` first when the run has
        epochs, then ``values(losses)``, then ``rates``).
      values: host losses → named scalars, e.g. :func:`member_losses`.
      rates: throughput names → items per step, e.g. ``{"img_per_s": batch_size}``.
      desc: the progress bar's label.
      unit: what the bar counts, ``unit_per_step`` of them per step.
    """

    writer: MetricWriter | None
    every: Every
    values: Callable[[PyTree], dict[str, float]]
    rates: Mapping[str, int]
    desc: str
    unit: str = "step"
    unit_per_step: int = 1

    @classmethod
    def images(cls, writer, every: Every, desc: str, batch_size: int, values=member_losses) -> Log:
        """A run that counts images: the bar in images, ``img_per_s`` in the metrics."""
        return cls(writer, every, values, {"img_per_s": batch_size}, desc, "img", batch_size)


@dataclasses.dataclass(frozen=True)
class Saves:
    """The checkpoints :func:`run_loop` saves: ``(step, state, metadata(step))`` after the steps
    ``every`` says, never after the last (the trainer saves the finished state with what it
    computes after training)."""

    checkpointer: Checkpointer
    every: Every
    metadata: Callable[[int], dict]


def run_loop(
    step_fn: Callable[[PyTree, Any, int], tuple[PyTree, PyTree]],
    state: PyTree,
    batches: Iterable[Any],
    *,
    start_step: int,
    total_steps: int,
    steps_per_epoch: int = 0,
    check: Callable[[int, PyTree], None],
    log: Log,
    saves: Saves | None = None,
    hooks: Sequence[Hook] = (),
    budget: Budget | None = None,
) -> PyTree:
    """Run steps ``start_step … total_steps − 1``; returns the final state.

    After each step, in this order: its losses are written if ``log.every`` is due, the due
    hooks run, a checkpoint is saved if due. Every step's losses pass ``check`` exactly once:
    one step late (after the next step is dispatched, so the device never idles on the host)
    or at once on a logged step.

    With a ``budget``, the run ends at the first step boundary after the budget is spent: that
    step counts as the last one (hooks with ``Every.final`` run, no periodic checkpoint, the
    caller saves), and ``budget.stopped_at`` says which it was (None: the run went to
    ``total_steps``). Every call runs at least one step: a resumed run whose budget was
    already spent stops after its first.

    Args:
      step_fn: ``(state, batch, step) -> (state, losses)``, ``step`` counted from 0; usually
        the jitted step with its state donated.
      state: the state at ``start_step``.
      batches: one batch per step from ``start_step`` on; too few is an error.
      steps_per_epoch: for ``Every.epochs`` and the ``epoch`` of metrics lines (0: no epochs).
      check: ``(step, host losses)``, raises on a bad loss (e.g. :func:`check_member_losses`).
      log: what is written and shown.
      saves: the periodic checkpoints, if any.
      hooks: what else runs between steps (validation, snapshots, a caller's callback).
      budget: a time budget (:class:`Budget`), or None.
    """
    if budget is not None:
        budget.start()
    bar = None
    if log.writer is not None:
        per_step = log.unit_per_step
        bar = progress(
            total_steps * per_step, initial=start_step * per_step, desc=log.desc, unit=log.unit
        )
    pending = None  # (step, losses) of the step whose check waits for the next dispatch
    clock = (time.perf_counter(), start_step)  # the last metrics line's time and step
    done = start_step
    try:
        # Not strict: a source may be endless; one that runs short is caught below.
        for step, batch in zip(range(start_step, total_steps), batches, strict=False):
            dispatched = budget.clock() if budget is not None else 0.0
            state, losses = step_fn(state, batch, step)
            if budget is not None and step == start_step:
                # The first call traces and compiles; the step itself runs asynchronously.
                budget.exclude(budget.clock() - dispatched)
            if pending is not None:
                check(pending[0], shd.to_host(pending[1]))
            pending, done = (step, losses), step + 1
            if bar is not None:
                bar.update(log.unit_per_step)
            stop = budget is not None and done < total_steps and budget.spent()
            end = done if stop else total_steps  # a budget's last step is the run's last
            if log.every.due(done, end, steps_per_epoch):
                pending = None
                clock = _log(log, bar, check, step, losses, clock, steps_per_epoch)
            for hook in hooks:
                if hook.when.due(done, end, steps_per_epoch):
                    state = hook.fn(done, state)
            if saves and done < end and saves.every.due(done, end, steps_per_epoch):
                saves.checkpointer.save(done, state, saves.metadata(done))
            if stop:
                budget.stopped_at = done
                break
        if pending is not None:
            check(pending[0], shd.to_host(pending[1]))
    finally:
        if bar is not None:
            bar.close()
    if done < total_steps and (budget is None or budget.stopped_at is None):
        raise ValueError(f"the batches ran out after step {done} of {total_steps}")
    return state


def _log(log: Log, bar, check, step: int, losses: PyTree, clock, steps_per_epoch: int):
    """Check and write the losses of ``step`` (counted from 0); returns the new clock."""
    values = shd.to_host(losses)  # on every process: this may be a collective
    check(step, values)
    now, done = time.perf_counter(), step + 1
    seconds = max(now - clock[0], 1e-9)
    if log.writer is not None:
        record = log.values(values)
        epoch = {"epoch": step // steps_per_epoch} if steps_per_epoch else {}
        rates = {name: (done - clock[1]) * n / seconds for name, n in log.rates.items()}
        log.writer.write(done, **epoch, **record, **rates)
        if bar is not None and "loss" in record:
            bar.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)
    return now, done
