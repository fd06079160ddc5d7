"""The end of one scale's students run: validation after epochs (and the students kept with
``config.select = "best_val"``), the record of how training ended, and the score normalisation
and pseudo-anomaly check saved with the last checkpoint (used by
:mod:`ustad.uninformed_students.train`)."""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np

from ustad import sharding as shd
from ustad.ensemble import check_normalization, resolve_member_strategy
from ustad.metric_writer import progress
from ustad.selection import end_record, selection_record, validation_hook, validation_losses
from ustad.tiling import image_tiles
from ustad.training import Hook
from ustad.training_budget import Budget
from ustad.uninformed_students.checkpoints import ScaleModel, scale_model, score_params
from ustad.uninformed_students.maps import compute_score_statistics, pseudo_anomaly_auroc
from ustad.uninformed_students.run_setup import ScaleRun
from ustad.uninformed_students.validation import validation_loss_fn

__all__ = ["finish_scale", "kept_state", "students_validation"]

PyTree = Any
logger = logging.getLogger(__name__)


def students_validation(config, run: ScaleRun, writer) -> Hook:
    """After every ``config.eval_every_epochs``-th epoch and the last step: each student's loss
    on the held-out images (:mod:`ustad.uninformed_students.validation`), written, and with
    ``config.select = "best_val"`` each student's variables of lowest loss kept."""
    strategy = resolve_member_strategy(
        config.get("member_strategy", "auto"), sharded=run.shard_members
    )
    loss_fn = validation_loss_fn(run.module, run.student, config.padding, strategy)
    put = functools.partial(shd.shard_batch, mesh=run.mesh)

    def losses(state: PyTree) -> np.ndarray:
        students = state["students"]["params"]
        fn = functools.partial(loss_fn, state["teacher"], state["target_stats"], students)
        return validation_losses(fn, run.val_images, batch_size=config.eval_batch_size, put=put)

    def check(history: list, epoch: int) -> None:
        if not np.isfinite(history[-1]):
            raise FloatingPointError(
                f"the students p{run.module.patch_size}: validation loss {history[-1]} after "
                f"epoch {epoch}; lower --config.learning_rate and use a new workdir"
            )

    return validation_hook(
        losses=losses,
        members=(lambda state: {"params": state["students"]["params"]})
        if run.select_best
        else None,
        history=run.val_history,
        writer=writer,
        steps_per_epoch=run.steps_per_epoch,
        every_epochs=config.get("eval_every_epochs", 1),
        check=check,
        mark="step",
    )


def kept_state(
    config, run: ScaleRun, state, budget: Budget, done: int, writer
) -> tuple[PyTree, dict]:
    """The state to save and score (with ``select_best`` the students' params of lowest
    validation loss in place of the last ones) and the record of how training ended and what
    was kept, for the final checkpoint's metadata and the metrics."""
    record = end_record(
        f"the students p{run.module.patch_size}",
        history=run.val_history,
        budget=budget,
        done=done,
        total_steps=run.total_steps,
        floor=run.floor,
    )
    best = state.get("best") if run.select_best else None
    record.update(selection_record(best, run.steps_per_epoch, done))
    record["val_history"] = list(run.val_history)
    if best is not None:
        state = dict(state, students=dict(state["students"], params=best["params"]))
    if writer:
        writer.write(
            done,
            stopped_by=record["stopped_by"],
            val_loss_flattened=str(record["val_loss_flattened"]),
            selected_steps=str(record["selected_steps"]),
            selected_val_loss=str(record["selected_val_loss"]),
        )
    return state, record


def finish_scale(
    config, run: ScaleRun, state, checkpointer, writer, base_meta, workdir
) -> ScaleModel:
    """Score normalisation (paper §5; by default the robust kind, see
    :func:`compute_score_statistics`) on held-out good images and the pseudo-anomaly check of
    the scale (:func:`pseudo_anomaly_auroc`), saved with the trained students as the run's last
    checkpoint."""
    module, total_steps, val_images = run.module, run.total_steps, run.val_images
    norm_images = val_images if len(val_images) else run.train_images
    if not len(val_images) and run.tiles:
        norm_images = image_tiles(run.train_images, run.image_size)
    if not len(val_images):
        logger.warning("no validation images: normalising scores on the training images")
    common = dict(
        batch_size=config.eval_batch_size,
        padding=config.padding,
        put=functools.partial(shd.shard_batch, mesh=run.mesh),
        member_strategy=config.get("member_strategy", "auto"),
    )
    with progress(len(norm_images), desc="score normalisation", unit="img") as bar:
        statistics = compute_score_statistics(
            module, module, score_params(state), norm_images,
            kind=config.get("score_normalization", "quantile"), seed=config.seed,
            progress=bar.update, **common,
        )  # fmt: skip
    normalization = statistics.normalization
    check_normalization(normalization, module.out_dim, f"the students in {workdir}")
    check = pseudo_anomaly_auroc(
        module, module, score_params(state), normalization, norm_images, seed=config.seed, **common
    )
    logger.info(
        "students p%d: pseudo-defect image AUROC %.3f on %d held-out good images and the same "
        "with planted defects%s", module.patch_size, check["image_auroc"], check["good_images"],
        " (worse than chance: a multi-scale detector leaves this scale out)"
        if check["image_auroc"] < 0.5 else "",
    )  # fmt: skip
    meta = dict(
        base_meta,
        step=total_steps,
        score_normalization=normalization.as_dict(),
        score_statistics=statistics.record(),
        pseudo_anomaly=check,
        normalization_images=len(norm_images),
        normalization_source="validation" if len(val_images) else "train",
    )
    checkpointer.save(total_steps, state, meta)
    if writer:
        values = {f"val_{k}": v for k, v in statistics.moments.as_dict().items()}
        if statistics.kind == "quantile":
            values.update({f"val_robust_{k}": v for k, v in normalization.as_dict().items()})
        writer.write(total_steps, pseudo_auroc=check["image_auroc"], **values)
    return scale_model(module, state, normalization, run.image_size, run.channels, config, meta)
