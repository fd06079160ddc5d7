"""Students' quality as a function of updates and of wall-clock minutes, from one training run.

Trains the M students of one scale on an MVTec-AD-layout category (``train/good``, the paper's
validation hold-out for the score normalisation) and, every ``--eval_every`` steps, pauses the
clock, normalises the scores on the held-out images with the current students, scores the whole
test set and prints one JSON line: AU-PRO@0.3, pixel and image AUROC (image score: the map's max)
of the raw maps and of the maps smoothed by a Gaussian of ``--sigma`` pixels, the step, the epochs
and pixels seen and the training seconds so far (teacher statistics, target cache and compilation
included; evaluation excluded). No retraining per point: the curve is the run.

    python -m benchmarks.convergence --mvtec_dir ../shared/data/mvtec_ad --category bottle \\
        --config configs/students.py:p17_small --config.image_size=128 --config.epochs=10 \\
        --eval_every 200 --label p17s_paper --out runs/convergence \\
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


def _evaluate(module, state, config, val_images, data, sigma):
    from ustad.evaluate import category_metrics
    from ustad.probes import smooth_maps
    from ustad.scoring import Detector, compute_normalization
    from ustad.train.student_checkpoints import _scale_model, _score_params

    normalization = compute_normalization(
        module,
        module,
        _score_params(state),
        val_images,
        batch_size=config.eval_batch_size,
        padding=config.padding,
        member_strategy=config.get("member_strategy", "auto"),
    )
    scale = _scale_model(
        module, state, normalization, data.test_images.shape[1:3], data.test_images.shape[-1],
        config,
    )  # fmt: skip
    maps, _ = Detector([scale]).score(data.test_images)
    out = {"raw": category_metrics(maps, data.test_masks, data.test_labels)}
    if sigma:
        smoothed = smooth_maps(maps, sigma)
        out[f"smoothed_sigma{sigma:g}"] = category_metrics(
            smoothed, data.test_masks, data.test_labels
        )
    return {k: {m: round(float(v), 4) for m, v in f.items()} for k, f in out.items()}


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
    from ustad.train.students import scale_epochs, train_students

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
        if final:
            figures = _evaluate_scale(state_or_scale, data, sigma)
        else:
            figures = _evaluate(module, state_or_scale, config, val_images, data, sigma)
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

    from ustad.train.student_targets import _teacher_from_config

    p = config.patch_sizes[0]
    key = jax.random.key(config.seed, impl=config.get("prng_impl", "threefry2x32"))
    module, variables, source = _teacher_from_config(
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
    total = scale_epochs(config, p) * _steps_per_epoch(config, len(train_idx), data)
    record(total, scale, final=True)
    return records


def _steps_per_epoch(config, num_train, data) -> int:
    from ustad.data.pipeline import num_batches
    from ustad.train.student_crops import crop_steps_per_epoch

    if config.crop_size:
        return crop_steps_per_epoch(
            num_train, tuple(data.train_images.shape[1:3]), config.crop_size, config.batch_size
        )
    return num_batches(num_train, config.batch_size)


def _evaluate_scale(scale, data, sigma):
    from ustad.evaluate import category_metrics
    from ustad.probes import smooth_maps
    from ustad.scoring import Detector

    maps, _ = Detector([scale]).score(data.test_images)
    out = {"raw": category_metrics(maps, data.test_masks, data.test_labels)}
    if sigma:
        out[f"smoothed_sigma{sigma:g}"] = category_metrics(
            smooth_maps(maps, sigma), data.test_masks, data.test_labels
        )
    return {k: {m: round(float(v), 4) for m, v in f.items()} for k, f in out.items()}


def read_runs(path, labels=()) -> dict[str, list[dict]]:
    """The convergence lines of a JSON-lines file by label, each sorted by step."""
    runs: dict[str, list[dict]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                if rec.get("benchmark") == "convergence" and (not labels or rec["label"] in labels):
                    runs.setdefault(rec["label"], []).append(rec)
    if not runs:
        which = f" for {labels}" if labels else ""
        raise SystemExit(f"{path} holds no convergence lines{which}")
    return {k: sorted(v, key=lambda r: r["step"]) for k, v in runs.items()}


def _recipe(settings: dict) -> str:
    if settings.get("crop_size"):
        data = f"crops {settings['crop_size']}² × {settings['batch_size']}"
    else:
        data = f"whole images × {settings['batch_size']}"
    rate = f"lr {settings['learning_rate']:g} {settings.get('lr_schedule') or 'constant'}"
    if settings.get("warmup_steps"):
        rate += f" (warm-up {settings['warmup_steps']})"
    return f"{data}, {rate}"


def table(path, labels=(), minutes=(3, 6, 10)) -> str:
    """One row per run: its recipe, AU-PRO (raw maps) at the given training minutes (the last
    evaluation before each), and the last point's figures, raw and smoothed."""
    runs = read_runs(path, labels)
    head = (
        "| run | teacher | size | recipe | "
        + " | ".join(f"AU-PRO @{m:g} min" for m in minutes)
        + " | last: steps | epochs | min | AU-PRO | AU-PRO σ4 | pixel AUROC | image AUROC | load |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label, recs in runs.items():
        last = recs[-1]
        at = []
        for m in minutes:
            before = [r for r in recs if r["train_s"] <= 60 * m]
            reached = last["train_s"] >= 60 * m  # a shorter run has no figure at m minutes
            at.append(
                f"{before[-1]['figures']['raw']['au_pro']:.3f}" if before and reached else "–"
            )
        smoothed = next((v for k, v in last["figures"].items() if k.startswith("smoothed")), None)
        teacher = os.path.basename(str(last.get("teacher", ""))).replace(".teacher.npz", "")
        loads = [r["load_avg"] for r in recs if r.get("load_avg", -1) >= 0]
        lines.append(
            f"| {label} | {teacher} | {last['image_size'][0]}² | {_recipe(last['settings'])} | "
            + " | ".join(at)
            + f" | {last['step']} | {last['epochs_seen']:g} | {last['train_s'] / 60:.1f} | "
            f"{last['figures']['raw']['au_pro']:.3f} | "
            f"{smoothed['au_pro'] if smoothed else float('nan'):.3f} | "
            f"{last['figures']['raw']['pixel_auroc']:.3f} | "
            f"{last['figures']['raw']['image_auroc']:.3f} | "
            f"{min(loads):.1f}–{max(loads):.1f} |"
        )
    return "\n".join(lines)


def plot(path, png, labels=()):
    """AU-PRO of the raw and the smoothed maps against updates and minutes, one line per
    label."""
    from matplotlib.figure import Figure

    from ustad.io import atomic_write

    runs = read_runs(path, labels)
    figure = Figure(figsize=(12, 8))
    axes = figure.subplots(2, 2)
    for label, recs in sorted(runs.items()):
        recs = sorted(recs, key=lambda r: r["step"])
        key = next(k for k in recs[-1]["figures"] if k.startswith("smoothed")) if any(
            k.startswith("smoothed") for k in recs[-1]["figures"]) else "raw"  # fmt: skip
        steps = [r["step"] for r in recs]
        minutes = [r["train_s"] / 60 for r in recs]
        for col, x in enumerate((steps, minutes)):
            axes[0, col].plot(x, [r["figures"]["raw"]["au_pro"] for r in recs], "o-", label=label)
            axes[1, col].plot(
                x, [r["figures"][key]["au_pro"] for r in recs], "o-", label=f"{label} ({key})"
            )
    for col, name in enumerate(("student updates (steps)", "training minutes")):
        axes[0, col].set_title(f"AU-PRO@0.3 (raw maps) vs {name}")
        axes[1, col].set_title(f"AU-PRO@0.3 (smoothed maps) vs {name}")
        for row in range(2):
            axes[row, col].set_xlabel(name)
            axes[row, col].grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=7)
    figure.tight_layout()
    png = png or os.path.splitext(path)[0] + ".png"
    buffer = __import__("io").BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    atomic_write(png, buffer.getvalue())
    print(png)


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    if FLAGS.plot:
        plot(FLAGS.plot, FLAGS.png, FLAGS.labels)
        return
    if FLAGS.table:
        print(table(FLAGS.table, FLAGS.labels, [float(m) for m in FLAGS.minutes]))
        return
    if not FLAGS.mvtec_dir:
        raise app.UsageError("--mvtec_dir is required (or --plot)")
    from ustad.data import load_mvtec_category
    from ustad.train.student_inputs import size_multiple

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
