"""Students' quality as a function of updates and of wall-clock minutes, from one training run.

Trains the M students of one scale on an MVTec-AD-layout category (``train/good``, the paper's
validation hold-out for the score normalisation) and, every ``--eval_every`` steps, pauses the
clock, normalises the scores on the held-out images with the current students, scores the whole
test set and prints one JSON line: AU-PRO@0.3, pixel and image AUROC (image score: the map's max)
of the raw maps and of the maps smoothed by a Gaussian of ``--sigma`` pixels, the step, the epochs
and pixels seen and the training seconds so far (teacher statistics, target cache and compilation
included; evaluation excluded). No retraining per point: the curve is the run. The paper
presets floor their updates (``min_train_steps``, 18,800): ``--config.min_train_steps=0`` keeps
``--config.epochs`` as given.

    python -m benchmarks.convergence --mvtec_dir ../shared/data/mvtec_ad --category bottle \\
        --config configs/students.py:p17_small --config.image_size=128 --config.epochs=10 \\
        --config.min_train_steps=0 --eval_every 200 --label p17s_paper --out runs/convergence \\
        --jsonl benchmarks/results/convergence_cpu.jsonl

    python -m benchmarks.convergence --plot benchmarks/results/convergence_cpu.jsonl \\
        --png benchmarks/results/convergence_cpu.png
    python -m benchmarks.convergence --table benchmarks/results/convergence_cpu.jsonl

The test masks are resized to the training size (nearest neighbour), so figures at 128² are
128²-resolution figures. ``--plot`` draws AU-PRO (raw and smoothed maps) against updates and
against minutes for every label in a JSON-lines file; ``--table`` prints the Markdown table.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import ustad  # noqa: E402,F401  (fast CPU flags before JAX starts)
from benchmarks.common import device_name  # noqa: E402
from ustad.evaluation.tables import convergence_table, plot_convergence  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("mvtec_dir", None, "folder holding <category>/train/good, test/, ground_truth/")
flags.DEFINE_string("category", "bottle", "category under --mvtec_dir")
config_flags.DEFINE_config_file("config", "configs/students.py:p17_small", "students config")
flags.DEFINE_integer("eval_every", 100, "evaluate after every this many steps (and at the end)")
flags.DEFINE_float("sigma", 4.0, "also report maps smoothed by this Gaussian (pixels; 0 = not)")
flags.DEFINE_string("label", None, "name of this run in the JSON lines (default: from the flags)")
flags.DEFINE_string("out", "runs/convergence", "students go to <out>/<label> (replaced)")
flags.DEFINE_string("jsonl", None, "also append the JSON lines to this file")
flags.DEFINE_float(
    "max_minutes",
    0.0,
    "stop after the first evaluation past this many training minutes (0 = the whole schedule)",
)
flags.DEFINE_string("plot", None, "draw the curves of this JSON-lines file instead of training")
flags.DEFINE_string("png", None, "where --plot writes its figure (default: next to the file)")
flags.DEFINE_list("labels", [], "with --plot / --table: only these labels (default: all)")
flags.DEFINE_string("table", None, "print the Markdown table of this JSON-lines file instead")
flags.DEFINE_list("minutes", ["3", "6", "10"], "with --table: AU-PRO columns at these minutes")


class _Stop(Exception):
    """Raised by the evaluation callback once ``--max_minutes`` of training have passed."""


def _load_avg() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return -1.0


def _settings(config) -> dict:
    names = (
        "patch_sizes", "teacher_workdir", "num_students", "epochs", "batch_size", "learning_rate",
        "weight_decay", "lr_schedule", "warmup_steps", "crop_size", "compute_dtype", "padding",
        "member_strategy", "seed", "val_fraction",
    )  # fmt: skip
    return {name: config.get(name) for name in names}


def train_with_curve(config, data, *, eval_every, sigma, label, workdir, max_minutes=0.0):
    """Train one scale on ``data`` (an :class:`ustad.data.mvtec.MVTecCategory`), yielding the
    curve's records (dicts) as they are measured."""
    from ustad.data.split import split_validation
    from ustad.uninformed_students.checkpoints import score_params as score_params
    from ustad.uninformed_students.schedule import scale_epochs
    from ustad.uninformed_students.train import train_students
    from ustad.uninformed_students.training_curve import (
        scale_figures,
        state_figures,
        steps_per_epoch,
    )

    records = []
    device = device_name()
    clock = {"start": time.perf_counter(), "eval_s": 0.0}
    train_idx, val_idx = split_validation(len(data.train_images), config.val_fraction, config.seed)
    val_images = data.train_images[val_idx]
    pixels_per_step = config.batch_size * (
        config.crop_size**2 if config.crop_size else int(np.prod(data.train_images.shape[1:3]))
    )
    base = {
        "benchmark": "convergence",
        "label": label,
        "device": device,
        "category": FLAGS.category if FLAGS.is_parsed() else None,
        "image_size": list(data.train_images.shape[1:3]),
        "train_images": int(len(train_idx)),
        "val_images": int(len(val_idx)),
        "test_images": int(len(data.test_images)),
        "settings": _settings(config),
    }
    epoch_pixels = len(train_idx) * int(np.prod(data.train_images.shape[1:3]))

    def record(step, state_or_scale, module=None, final=False):
        train_s = time.perf_counter() - clock["start"] - clock["eval_s"]
        begin = time.perf_counter()
        test = (data.test_images, data.test_masks, data.test_labels)
        if final:
            figures = scale_figures(state_or_scale, *test, sigma)
        else:
            figures = state_figures(
                module,
                score_params(state_or_scale),
                val_images,
                *test,
                padding=config.padding,
                batch_size=config.eval_batch_size,
                member_strategy=config.get("member_strategy", "auto"),
                sigma=sigma,
            )
        clock["eval_s"] += time.perf_counter() - begin
        line = dict(
            base,
            step=int(step),
            epochs_seen=round(step * pixels_per_step / epoch_pixels, 3),
            train_s=round(train_s, 1),
            eval_s=round(time.perf_counter() - begin, 1),
            final=final,
            load_avg=_load_avg(),
            figures=figures,
        )
        records.append(line)
        print(json.dumps(line), flush=True)
        if max_minutes and train_s > 60 * max_minutes and not final:
            raise _Stop

    import jax

    from ustad.uninformed_students.targets import teacher_from_config

    p = config.patch_sizes[0]
    key = jax.random.key(config.seed, impl=config.get("prng_impl", "threefry2x32"))
    module, variables, source = teacher_from_config(
        config, p, data.train_images.shape[-1], jax.random.fold_in(key, 2)
    )
    base["teacher"] = source

    def on_step(step, state):
        record(step, state, module)

    try:
        scale = train_students(
            config,
            workdir,
            data.train_images,
            patch_size=p,
            teacher=(module, variables),
            on_step=on_step,
            on_step_every=eval_every,
        )
    except _Stop:
        return records
    per_epoch = steps_per_epoch(
        len(train_idx), data.train_images.shape[1:3], config.crop_size, config.batch_size
    )
    total = scale_epochs(config, p) * per_epoch
    record(total, scale, final=True)
    return records


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    if FLAGS.plot:
        print(plot_convergence(FLAGS.plot, FLAGS.png, FLAGS.labels))
        return
    if FLAGS.table:
        minutes = [float(m) for m in FLAGS.minutes]
        print(convergence_table(FLAGS.table, FLAGS.labels, minutes))
        return
    if not FLAGS.mvtec_dir:
        raise app.UsageError("--mvtec_dir is required (or --plot)")
    from ustad.data.mvtec import load_mvtec_category
    from ustad.uninformed_students.inputs import size_multiple

    config = FLAGS.config
    if len(config.patch_sizes) != 1:
        raise app.UsageError(f"one scale per run; got patch_sizes={tuple(config.patch_sizes)}")
    data = load_mvtec_category(
        FLAGS.mvtec_dir,
        FLAGS.category,
        image_size=config.image_size,
        grayscale=config.grayscale,
        multiple=size_multiple(config.patch_sizes),
    )
    label = FLAGS.label or (
        f"p{config.patch_sizes[0]}_{config.teacher_workdir}_b{config.batch_size}"
        f"_lr{config.learning_rate:g}_{config.lr_schedule}_c{config.crop_size}"
    )
    workdir = os.path.join(FLAGS.out, label)
    if os.path.exists(workdir):
        shutil.rmtree(workdir)  # a resumed run would restart the clock mid-curve
    records = train_with_curve(
        config,
        data,
        eval_every=FLAGS.eval_every,
        sigma=FLAGS.sigma,
        label=label,
        workdir=workdir,
        max_minutes=FLAGS.max_minutes,
    )
    if FLAGS.jsonl:
        os.makedirs(os.path.dirname(FLAGS.jsonl) or ".", exist_ok=True)
        with open(FLAGS.jsonl, "a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    app.run(main)
