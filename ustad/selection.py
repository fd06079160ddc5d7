"""Validation on held-out good images, shared by the trainers of both families: each member's
loss there after every epoch (and at the run's last step), the variables of lowest validation
loss kept per member (``config.select = "best_val"``; STFPM's authors keep their best epoch),
and the record of how training ended (stopped by the schedule or a time budget, whether the
validation loss had flattened, what was kept).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ustad import sharding as shd
from ustad.training import Every, Hook
from ustad.training_budget import Budget
from ustad.training_checks import flattened

PyTree = Any
logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def keep_best_fn(mark: str = "epoch"):
    """Jitted ``(best, members, val_losses [M], at) -> best``: each member keeps its variables
    of lowest validation loss so far (STFPM's authors keep their best epoch).

    ``members`` maps names to stacked ``[M, ...]`` pytrees (e.g. ``{"params": …,
    "batch_stats": …}``); ``best`` holds the same names plus ``"val_loss"`` ``[M]`` float32 and
    ``mark`` ``[M]`` int32 (the epoch or step each member's variables come from, ``at``).
    """

    def fn(best, members, val_losses, at):
        improved = val_losses < best["val_loss"]

        def choose(old, new):
            return jnp.where(improved.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

        kept = {name: jax.tree.map(choose, best[name], tree) for name, tree in members.items()}
        return {
            **kept,
            "val_loss": jnp.where(improved, val_losses, best["val_loss"]),
            mark: jnp.where(improved, at, best[mark]),
        }

    return jax.jit(fn)


def initial_best(members: dict, num_members: int, mesh, mark: str = "epoch") -> dict:
    """The best-so-far record before any validation (see :func:`keep_best_fn`): copies of
    ``members`` (the step donates their buffers), validation loss inf, ``mark`` −1."""
    return {
        **{name: jax.tree.map(jnp.copy, tree) for name, tree in members.items()},
        "val_loss": shd.put_replicated(np.full(num_members, np.inf, np.float32), mesh),
        mark: shd.put_replicated(np.full(num_members, -1, np.int32), mesh),
    }


def validation_losses(fn, images: np.ndarray, *, batch_size: int, put) -> np.ndarray:
    """``[M]`` float64 mean loss of each member over ``images``.

    Args:
      fn: ``(batch [B, H, W, C] on the devices) -> [M, B]`` each member's loss on each image.
      images: ``[V, H, W, C]`` host array.
      batch_size: B; the last chunk is padded with its last image, so nothing recompiles.
      put: places a host batch on the devices.
    """
    total = 0.0
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        real = len(chunk)
        if real < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - real, axis=0)])
        per_image = shd.to_host(fn(put(chunk)))
        total = total + per_image[:, :real].sum(axis=1)
    return np.asarray(total / len(images), np.float64)


def validation_hook(
    *,
    losses: Callable[[PyTree], np.ndarray],
    members: Callable[[PyTree], dict] | None,
    history: list,
    writer,
    steps_per_epoch: int,
    every_epochs: int = 1,
    check: Callable[[list, int], None] | None = None,
    mark: str = "epoch",
) -> Hook:
    """After every ``every_epochs``-th epoch and the run's last step (a budget's included): each
    member's validation loss (``losses(state)`` → ``[M]``), written as ``val_loss`` and
    ``val_loss_<i>``, appended (mean) to ``history`` and passed to ``check(history, epoch)``;
    with ``members`` (``state`` → the trees to keep), ``state["best"]`` keeps each member's
    variables of lowest validation loss (:func:`keep_best_fn`; ``mark`` "epoch" or "step")."""
    keep = keep_best_fn(mark)

    def validate(step: int, state: PyTree) -> PyTree:
        epoch = (step - 1) // steps_per_epoch
        val = np.asarray(losses(state), np.float64)
        if members is not None:
            at = epoch if mark == "epoch" else step
            best = keep(state["best"], members(state), jnp.asarray(val, jnp.float32), at)
            state = dict(state, best=best)
        if writer:
            per_member = {f"val_loss_{i}": float(v) for i, v in enumerate(val)}
            writer.write(step, epoch=epoch, val_loss=float(val.mean()), **per_member)
        history.append(float(val.mean()))
        if check is not None:
            check(history, epoch)
        return state

    return Hook(Every(epochs=every_epochs, final=True), validate)


def end_record(
    what: str,
    *,
    history: Sequence[float],
    budget: Budget,
    done: int,
    total_steps: int,
    floor: int = 0,
) -> dict:
    """How training ended, for the final checkpoint's metadata and the log: ``stopped_by``
    (``"max_minutes"`` or ``"schedule"``), ``updates`` done, ``budget_seconds`` (the training
    clock, :class:`Budget`) and ``val_loss_flattened`` (:func:`flattened`; None: too few
    validations to say). A run stopped by its budget, or whose validation loss was still
    falling, says so in a warning."""
    flat = flattened(list(history))
    by_budget = budget.stopped_at is not None
    record = {
        "stopped_by": "max_minutes" if by_budget else "schedule",
        "updates": int(done),
        "budget_seconds": budget.seconds(),
        "val_loss_flattened": flat,
    }
    if by_budget:
        record["max_minutes"] = budget.max_minutes
        below = f", below the floor of {floor} updates" if done < floor else ""
        state = {
            True: "had flattened",
            False: "was still falling",
            None: f"cannot be judged yet ({len(history)} validations)",
        }[flat]
        logger.warning(
            "%s: --config.max_minutes=%g stopped training after %d of %d updates%s; the "
            "validation loss %s",
            what, budget.max_minutes, done, total_steps, below, state,
        )  # fmt: skip
    elif flat is False:
        logger.warning(
            "%s: the validation loss was still falling at the end of training (%s): more "
            "updates would likely help (--config.train_steps)",
            what, " → ".join(f"{v:.4g}" for v in history[-4:]),
        )  # fmt: skip
    elif flat is None and history:
        logger.info(
            "%s: %d validations are too few to judge whether the validation loss flattened "
            "(4 needed; one every --config.eval_every_epochs epochs and one at the end)",
            what, len(history),
        )  # fmt: skip
    return record


def selection_record(best: dict | None, steps_per_epoch: int, last_step: int) -> dict:
    """What :func:`keep_best_fn` kept, for the record and the log: ``selected_steps`` (the step
    each member's variables come from; a member never validated counts as ``last_step``) and
    ``selected_val_loss`` (their validation loss); both None without a selection (``best``
    None)."""
    if best is None:
        return {"selected_steps": None, "selected_val_loss": None}
    host = shd.to_host({k: v for k, v in best.items() if k in ("val_loss", "epoch", "step")})
    if "step" in host:
        steps = [int(s) for s in host["step"]]
    else:  # validations run at each epoch's end, or at the run's last step
        steps = [min((int(e) + 1) * steps_per_epoch, last_step) if e >= 0 else -1
                 for e in host["epoch"]]  # fmt: skip
    steps = [last_step if s < 0 else s for s in steps]  # never validated: the last
    losses = [float(v) if np.isfinite(v) else None for v in host["val_loss"]]
    logger.info("kept each student's variables of lowest validation loss: steps %s, loss %s",
                steps, [None if v is None else round(v, 6) for v in losses])  # fmt: skip
    return {"selected_steps": steps, "selected_val_loss": losses}
