"""The category benchmark (issue 21): a family's preset end to end on a list of categories, one
JSON line per category × family/preset, and one table beside the nearest-neighbour reference.

    # the reference on every category at the size the STFPM preset trains (256²)
    flock /tmp/ustad_heavy.lock python -m benchmarks.categories --family=reference \\
        --image_size=256 --skip_existing
    # STFPM's cpu preset on every category ("after"), and the old epoch-counting preset
    flock /tmp/ustad_heavy.lock python -m benchmarks.categories --family=stfpm --config=cpu \\
        --skip_existing
    flock /tmp/ustad_heavy.lock python -m benchmarks.categories --family=stfpm --config=cpu \\
        --override=train_steps=0,epochs=3 --label=before --categories=bottle40,ball_screw
    python -m benchmarks.categories --table_only          # the table of every line so far

The list (:data:`ustad.evaluation.categories.CATEGORIES`): bottle; bottle with 40 and 80 of its
training images (seed 0; a folder of links under ``<work_dir>/data``); ball_screw (1130×460,
tiny pits); three synthetic categories of 200 training images at 256² (a colour texture, a grey
texture, an object on a plain background; written once under ``<work_dir>/data``).

Each family run trains ``configs/<family>.py:<config>`` (with ``--override`` fields) into
``<work_dir>/runs/<family>_<config>[_<label>]/<category>`` through :func:`ustad.families.train`
(as ``ustad train-students`` does: hold-out, model selection, calibration), then scores the
test set with the workdir's detector (as ``ustad evaluate`` does) on the test images squashed to
the preset's square ``image_size``, the size the reference is measured at (a model trained at
another size, e.g. a non-square category's kept aspect, is resized in and out by its detector;
``train_size`` records its own). ``train_minutes`` is this process's wall time of the training call
(data loading, compilation and calibration included; ``resumed`` says when a killed run was
continued, then it is only the rest). ``--skip_existing`` skips runs already in ``--results``,
so a killed benchmark resumes where it stopped.
"""

from __future__ import annotations

import ast
import datetime
import importlib
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import ustad  # noqa: E402,F401  (fast CPU flags before JAX starts)
from benchmarks.common import device_name  # noqa: E402
from ustad.evaluation import categories as cats  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("shared_data", "../shared/data", "folder holding mvtec_ad/ and ball_screw/")
flags.DEFINE_string("work_dir", "runs/categories", "subset/synthetic data and training workdirs")
flags.DEFINE_enum("family", "stfpm", ["stfpm", "students", "reference"], "what to run")
flags.DEFINE_string("config", "cpu", "preset name in configs/<family>.py")
flags.DEFINE_list("override", [], "config fields field=value (e.g. train_steps=0,epochs=3)")
flags.DEFINE_string("label", "", "a name for this variant in records and tables (e.g. before)")
flags.DEFINE_list("categories", [], "subset of the list (default: all)")
flags.DEFINE_integer("image_size", 256, "--family=reference: the square size")
flags.DEFINE_bool(
    "keep_aspect", False,
    "--family=reference: fit and score at the category's aspect (short side --image_size, ×8), "
    "the metrics at the square size",
)  # fmt: skip
flags.DEFINE_string("results", "benchmarks/results/categories_cpu.jsonl", "JSON lines appended")
flags.DEFINE_list(
    "reference_results",
    ["benchmarks/results/categories_cpu.jsonl", "benchmarks/results/reference_knn_cpu.jsonl"],
    "files whose reference lines the table (and --skip_existing for the reference) use",
)
flags.DEFINE_bool("skip_existing", False, "skip runs already recorded in --results")
flags.DEFINE_bool("table_only", False, "only print the table of --results")
flags.DEFINE_bool(
    "rescore", False,
    "re-evaluate the recorded runs' trained workdirs (no training) and replace their lines, "
    "keeping the training fields (e.g. to add metrics a newer version of this script records)",
)  # fmt: skip

CONFIG_FILES = {"stfpm": "stfpm", "students": "students"}
# Fields a preset may leave unset that an override may still give (the students' per-scale
# epochs: the ``cpu`` preset before issue 21 counted 10 / 12 epochs per scale).
OPTIONAL_FIELDS = {
    "stfpm": (),
    "students": ("scale_epochs", "scale_train_steps", "scale_teachers"),
}


def load_config(family: str, name: str, overrides):
    """``configs/<family>.py:<name>`` with ``field=value`` overrides (values as Python literals,
    else strings); an unknown field is an error naming it."""
    config = importlib.import_module(f"configs.{CONFIG_FILES[family]}").get_config(name)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or (key not in config and key not in OPTIONAL_FIELDS[family]):
            raise ValueError(f"--override={item!r}: expected field=value with a field of {name}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        config[key] = value
    return config


def _commit() -> str:
    """HEAD, and when the tracked files differ from it ``+diff:<sha1 of git diff HEAD>`` (other
    work in the same checkout changes the code a run measures)."""
    import hashlib

    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        diff = subprocess.run(
            ["git", "diff", "HEAD"], capture_output=True, check=True
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (f"+diff:{hashlib.sha1(diff).hexdigest()[:10]}" if diff else "")


def _base(spec, image_size, train_images) -> dict:
    return {
        "benchmark": "categories",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "device": device_name(),
        "category": spec.name,
        "image_size": list(image_size),
        "keep_aspect": False,
        "train_images": train_images,
        "train_subset_seed": spec.subset_seed,
    }


def run_reference(spec, data_dir, category, size, keep_aspect) -> dict:
    from ustad.data.mvtec import category_folder, load_mvtec_category, load_mvtec_test
    from ustad.evaluation.reference_knn import RECIPE, ReferenceKNN
    from ustad.evaluation.reports import category_metrics

    t0 = time.perf_counter()
    data = load_mvtec_category(
        data_dir, category, image_size=size, keep_aspect=keep_aspect, multiple=8
    )
    own = tuple(data.train_images.shape[1:3])
    square = data
    if keep_aspect:  # masks and labels at the square size the metrics use
        square = load_mvtec_test(category_folder(data_dir, category), image_size=size)
    t1 = time.perf_counter()
    detector = ReferenceKNN().fit(data.train_images)
    t2 = time.perf_counter()
    maps, scores = detector.score(data.test_images)
    t3 = time.perf_counter()
    masks = square.masks if keep_aspect else square.test_masks
    labels = square.labels if keep_aspect else square.test_labels
    types = square.types if keep_aspect else square.test_types
    maps = _resized(maps, (size, size))
    metrics = category_metrics(maps, masks, labels, scores)
    return {
        **_base(spec, (size, size), len(data.train_images)),
        "keep_aspect": keep_aspect,
        "train_size": list(own),
        "family": "reference",
        "config": "knn",
        "recipe": RECIPE,
        "test_images": len(data.test_images),
        **{k: round(float(v), 4) for k, v in metrics.items()},
        "per_defect": per_defect(maps, masks, labels, scores, types),
        "fit_s": round(t2 - t1, 1),
        "score_s": round(t3 - t2, 1),
        "end_to_end_s": round(t3 - t0, 1),
    }


def run_family(spec, data_dir, category, workdir) -> dict:
    from ustad import families
    from ustad.cli.train import validate

    config = load_config(FLAGS.family, FLAGS.config, FLAGS.override)
    config.data_dir, config.category = str(data_dir), category
    validate(config, workdir)
    resumed = any(os.scandir(workdir)) if os.path.isdir(workdir) else False
    t0 = time.perf_counter()
    families.train(config, workdir)
    train_s = time.perf_counter() - t0
    return {
        **evaluate_workdir(spec, data_dir, category, workdir, config),
        "train_minutes": round(train_s / 60, 2),
        "resumed": resumed,
    }


def evaluate_workdir(spec, data_dir, category, workdir, config) -> dict:
    """The record of a trained ``workdir`` but its training fields: the test set scored by the
    workdir's detector, metrics at the preset's square size (also per defect type and with
    σ = SMOOTH_SIGMA smoothing)."""
    from ustad import families
    from ustad.checkpointing import workdir_metadata
    from ustad.data.images import as_size
    from ustad.data.mvtec import category_folder, index_train, load_mvtec_test
    from ustad.evaluation.reports import category_metrics

    size = as_size(config.image_size)
    meta = training_metadata(workdir, workdir_metadata)
    own = tuple(meta.get("image_size") or size)
    folder = category_folder(data_dir, category)
    test = load_mvtec_test(folder, image_size=size)
    # A model trained at its own size (a kept aspect) scores the images read at that size, not
    # squashed and stretched back; its maps are then resized to the metrics' size.
    images = test.images if own == size else load_mvtec_test(folder, image_size=own).images
    detector = families.load_detector(workdir)
    t1 = time.perf_counter()
    maps, scores = detector.score(images)
    score_s = time.perf_counter() - t1
    smoothed = smoothed_variant(maps, detector, size, test)
    maps = _resized(maps, size)
    metrics = category_metrics(maps, test.masks, test.labels, scores)
    return {
        **_base(spec, size, len(index_train(folder))),
        "keep_aspect": own != size,
        "family": FLAGS.family,
        "config": FLAGS.config,
        # The model's own input size (a preset may keep a non-square category's aspect); the
        # metrics are at "image_size", the square size the reference is measured at.
        "train_size": meta.get("image_size"),
        "overrides": list(FLAGS.override),
        "label": FLAGS.label,
        "workdir": str(workdir),
        "trained_images": meta.get("train_images"),
        "val_images": meta.get("val_images"),
        "updates": meta.get("total_steps"),
        "selected_epochs": meta.get("selected_epochs"),
        "selected_steps": meta.get("selected_steps"),
        "val_loss_flattened": meta.get("val_loss_flattened"),
        "test_images": len(test.images),
        **{k: round(float(v), 4) for k, v in metrics.items()},
        "per_defect": per_defect(maps, test.masks, test.labels, scores, test.types),
        # The same maps smoothed by a Gaussian of σ = SMOOTH_SIGMA pixels at the model's own
        # size before the image score (as ``ustad score --smooth_sigma``; the reference smooths).
        f"sigma{SMOOTH_SIGMA:g}": smoothed,
        "score_s": round(score_s, 1),
    }


def training_metadata(workdir, read=None) -> dict:
    """What a trained workdir says of its training: its newest checkpoint's metadata, or for a
    multi-scale Uninformed Students run (one ``p<p>/`` folder per scale, none at the top) the
    scales' metadata merged: ``image_size`` (all scales train at one size; a kept aspect is
    that size), and per scale ``{"p17": …}`` the updates (``total_steps``), ``selected_steps``
    and ``val_loss_flattened``. ``read``: the metadata reader (default
    :func:`ustad.checkpointing.workdir_metadata`)."""
    if read is None:
        from ustad.checkpointing import workdir_metadata as read
    meta = read(workdir)
    if meta is not None:
        return meta
    from pathlib import Path

    scales = {}
    for folder in sorted(Path(workdir).glob("p*")):
        scale = read(folder) if folder.is_dir() and folder.name[1:].isdigit() else None
        if scale is not None:
            scales[folder.name] = scale
    if not scales:
        return {}
    sizes = {tuple(m["image_size"]) for m in scales.values() if m.get("image_size")}
    if len(sizes) > 1:
        raise ValueError(f"{workdir}: its scales trained at different sizes {sorted(sizes)}")
    merged = {"image_size": list(sizes.pop()) if sizes else None}
    for field in ("total_steps", "selected_steps", "val_loss_flattened"):
        merged[field] = {name: m.get(field) for name, m in scales.items()}
    return merged


TRAINING_FIELDS = ("date", "commit", "train_minutes", "resumed")


def rescore(specs) -> None:
    """``--rescore``: each recorded run of ``--family``/``--config``/``--override``/``--label``
    on ``specs`` whose workdir is there is evaluated again and its line replaced (the training
    fields kept, ``rescored`` added); the file is rewritten atomically."""
    import json

    from ustad.io import atomic_write

    records = cats.load_records([FLAGS.results])
    for spec in specs:
        key = (spec.name, FLAGS.family, FLAGS.config, tuple(FLAGS.override), FLAGS.label)
        found = [i for i, r in enumerate(records) if cats.run_key(r) == key]
        if not found:
            print(f"rescore: no recorded run {key} in {FLAGS.results}", file=sys.stderr)
            continue
        old = records[found[-1]]
        workdir = old.get("workdir")
        if not workdir or not os.path.isdir(workdir):
            print(f"rescore: {spec.name}: workdir {workdir!r} is not here", file=sys.stderr)
            continue
        data_dir, category = cats.prepare_category(spec, FLAGS.shared_data, FLAGS.work_dir)
        config = load_config(FLAGS.family, FLAGS.config, FLAGS.override)
        config.data_dir, config.category = str(data_dir), category
        record = evaluate_workdir(spec, data_dir, category, workdir, config)
        record.update({k: old[k] for k in TRAINING_FIELDS if k in old})
        record["rescored"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        print(json.dumps(record), flush=True)
        # Read again: another run may have appended a line while this one was scoring.
        records = cats.load_records([FLAGS.results])
        index = [i for i, r in enumerate(records) if cats.run_key(r) == key][-1]
        records[index] = record
        text = "".join(json.dumps(r) + "\n" for r in records)
        atomic_write(FLAGS.results, text.encode())


SMOOTH_SIGMA = 4.0


def smoothed_variant(maps, detector, size, test) -> dict:
    """Metrics (and per defect) of ``maps`` smoothed by σ = SMOOTH_SIGMA at their own size, the
    image scores reduced from them as ``detector`` does (identical to scoring with
    ``smooth_sigma``)."""
    import jax.numpy as jnp

    from ustad.detector import reduce_maps, smooth_maps
    from ustad.evaluation.reports import category_metrics

    maps = smooth_maps(maps, SMOOTH_SIGMA)
    scores = np.asarray(reduce_maps(jnp.asarray(maps), detector.reduction, detector.top_k))
    maps = _resized(maps, size)
    metrics = category_metrics(maps, test.masks, test.labels, scores)
    return {
        **{k: round(float(v), 4) for k, v in metrics.items()},
        "per_defect": per_defect(maps, test.masks, test.labels, scores, test.types),
    }


def per_defect(maps, masks, labels, scores, types) -> dict:
    """Metrics of each defect type against the good test images (its images and the good ones):
    which kind of defect a detector misses, e.g. ``{"stain": {"image_auroc": …, "au_pro": …}}``."""
    from ustad.evaluation.reports import category_metrics

    maps, masks, labels, scores = (np.asarray(a) for a in (maps, masks, labels, scores))
    types = np.asarray(types)
    good = labels == 0
    out = {}
    for kind in sorted(set(types[~good].tolist())):
        keep = good | (types == kind)
        m = category_metrics(maps[keep], masks[keep], labels[keep], scores[keep])
        out[kind] = {k: round(float(m[k]), 4) for k in ("image_auroc", "au_pro")}
    return out


def _resized(maps, size):
    """``[N, H, W]`` maps bilinearly resized to ``size`` (as they are when already). Not
    :func:`ustad.detector.resize_images`: that one is for images and clips to [0, 1]."""
    import jax

    maps = np.asarray(maps, np.float32)
    if tuple(maps.shape[1:3]) == tuple(size):
        return maps
    return np.asarray(jax.image.resize(maps, (len(maps), *size), "linear"))


def _done(spec) -> bool:
    """Already measured: a reference line on this category and size (any of
    ``--reference_results``), or a line of this family, preset, overrides and label."""
    if FLAGS.family == "reference":
        size = [FLAGS.image_size, FLAGS.image_size]
        return any(
            cats.is_reference(r)
            and r.get("category") == spec.name
            and r.get("image_size") == size
            and r.get("train_subset_seed") == spec.subset_seed
            and bool(r.get("keep_aspect", False)) == FLAGS.keep_aspect
            for r in cats.load_records(FLAGS.reference_results)
        )
    key = (spec.name, FLAGS.family, FLAGS.config, tuple(FLAGS.override), FLAGS.label)
    return any(cats.run_key(r) == key for r in cats.load_records([FLAGS.results]))


def _append(record: dict) -> None:
    import json

    line = json.dumps(record)
    print(line, flush=True)
    os.makedirs(os.path.dirname(FLAGS.results) or ".", exist_ok=True)
    with open(FLAGS.results, "a") as f:
        f.write(line + "\n")


def _print_table(names) -> None:
    records = [r for r in cats.load_records([FLAGS.results]) if r.get("category") in names]
    references = cats.load_records(FLAGS.reference_results)
    print(cats.format_table(cats.table_rows(records, references)))
    if any("per_defect" in r for r in records):
        print()
        print(defect_table(records))


def defect_table(records) -> str:
    """A Markdown table of the records that hold per-defect metrics: for each run, image AUROC
    / AU-PRO of each defect type against the good images, unsmoothed and with σ = 4."""
    rows = [
        "| category | size | family, preset | smoothing | image AUROC / AU-PRO per defect type |",
        "|---|---|---|---|---|",
    ]
    for record in records:
        if "per_defect" not in record:
            continue
        name = f"{record['family']} {record.get('config', '')}".strip()
        if record.get("label"):
            name += f" ({record['label']})"
        variants = [("none", record["per_defect"])]
        smoothed = record.get(f"sigma{SMOOTH_SIGMA:g}")
        if smoothed:
            variants.append((f"σ = {SMOOTH_SIGMA:g}", smoothed["per_defect"]))
        for label, defects in variants:
            cells = ", ".join(
                f"{kind} {m['image_auroc']:.3f} / {m['au_pro']:.3f}"
                for kind, m in sorted(defects.items())
            )
            size = cats.record_size(record)
            rows.append(f"| {record['category']} | {size} | {name} | {label} | {cells} |")
    return "\n".join(rows)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    specs = cats.category_specs(FLAGS.categories)
    names = [s.name for s in specs]
    if FLAGS.table_only:
        _print_table(names)
        return
    if FLAGS.family != "reference":
        load_config(FLAGS.family, FLAGS.config, FLAGS.override)  # bad preset/field: fail first
    if FLAGS.rescore:
        if FLAGS.family == "reference":
            raise app.UsageError("--rescore re-evaluates trained workdirs: not --family=reference")
        rescore(specs)
        _print_table(names)
        return
    suffix = f"_{FLAGS.label}" if FLAGS.label else ""
    for spec in specs:
        if FLAGS.skip_existing and _done(spec):
            print(f"skipping {spec.name} ({FLAGS.family}): already recorded", file=sys.stderr)
            continue
        data_dir, category = cats.prepare_category(spec, FLAGS.shared_data, FLAGS.work_dir)
        if FLAGS.family == "reference":
            record = run_reference(spec, data_dir, category, FLAGS.image_size, FLAGS.keep_aspect)
        else:
            workdir = os.path.join(
                FLAGS.work_dir, "runs", f"{FLAGS.family}_{FLAGS.config}{suffix}", spec.name
            )
            record = run_family(spec, data_dir, category, workdir)
        _append(record)
    _print_table(names)


if __name__ == "__main__":
    app.run(main)
