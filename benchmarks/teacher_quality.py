"""Teacher probes: how good a teacher is for anomaly detection (see
:mod:`ustad.uninformed_students.probes`).

One JSON line per (teacher, dataset): the teacher (source, p, widths, d, steps), and per probe its
figures, settings and seconds:

* ``descriptor``: nearest-neighbour distance of each test descriptor to a memory bank of the
  category's training descriptors; AU-PRO@0.3, pixel and image AUROC, raw and smoothed (σ = 4).
* ``grid``: the same on a stride-8 grid (``--grid_stride``), every training grid descriptor in
  the bank, the map resized bilinearly: seconds per teacher, the filter for many teachers or
  for the snapshots of a run.
* ``student``: a short fixed student run (M students, fixed epochs, batch, learning rate: the
  same for every teacher compared) scored as the method scores, same figures. With
  ``--student_preset=cpu``: the ``cpu`` preset's schedule for the teacher's p instead (batch 2,
  Adam 3e-3, 940 updates at p = 17, 1,128 at p = 33; ~15 min per scale on 2 cores): the
  verdict, since a 2-epoch probe measures early learning, not the preset's plateau.
* ``distill``: distillation R² (1 − unexplained, with the run's decoder D and with a linear
  read-out fitted on other photos) and mean |off-diagonal correlation| of the descriptor
  dimensions, on held-out photos; P sees exactly the R×R window T̂ sees. Per teacher, repeated
  in each of its rows.

Teachers: workdirs, ``.teacher.npz`` files, installed names, or ``random:<p>:<widths>:<d>`` (a
random init of that architecture, the control row); ``--snapshots_of=<workdir>`` adds every
snapshot of a teacher run (``--config.snapshot_every_steps``) and its newest checkpoint, each
row with the training metrics logged at its step: the curve of the probes against steps.
Datasets: an MVTec-AD-layout category (``--mvtec_dir``, ``--category``), more of them
(``--categories=<root>:<category>,…``, e.g. ``../shared/data/ball_screw:ball_screw``) and
synthetic categories (``--synthetic`` textures, written once under ``--synthetic_dir``), all at
``--image_size`` (squashed to a square)::

    python -m benchmarks.teacher_quality --teachers runs/t_a,random:33:0.125:32 \\
        --mvtec_dir ../shared/data/mvtec_ad --category bottle --synthetic gravel \\
        --probes descriptor,student,distill --photos_dir ../shared/data/photos \\
        --out benchmarks/results/teacher_probes.jsonl

Measured cost per (teacher, dataset) at 128², ⅛ width, d = 32, on 2 CPU cores shared with a
teacher training: descriptor 37–81 s (bank 25k; bottle's 83 test images ≈ 70 s of exact NN
matmuls), student 3–4.5 min (M = 3, 2 epochs of batch 2 at lr 1e-3: 188 steps on bottle, 180 on
the default synthetic set), distill 8–16 s per teacher. Skip the synthetic set with
``--synthetic=``.
"""

from __future__ import annotations

import json
import logging as std_logging
import time
from pathlib import Path

import numpy as np
from absl import app, flags, logging

import ustad  # noqa: F401  (sets the fast CPU flag before JAX starts)
from benchmarks.common import device_name, emit
from ustad.uninformed_students import probes
from ustad.uninformed_students.teacher import distillation

FLAGS = flags.FLAGS
PROBES = ("descriptor", "grid", "student", "distill")
flags.DEFINE_list("teachers", None, "workdirs, .teacher.npz files, names or random:<p>:<w>:<d>")
flags.DEFINE_list("workdirs", None, "old name of --teachers (teacher workdirs)")
flags.DEFINE_list("snapshots_of", [], "teacher workdirs whose snapshots (and end) to probe")
flags.DEFINE_list("probes", ["descriptor", "student", "distill"], f"probes to run: {PROBES}")
flags.DEFINE_string("mvtec_dir", None, "folder holding MVTec-AD-layout categories")
flags.DEFINE_string("category", "bottle", "category under --mvtec_dir")
flags.DEFINE_list("categories", [], "more MVTec-layout categories as <root>:<category>")
flags.DEFINE_list("synthetic", ["gravel"], "synthetic categories: textures of ustad.data")
flags.DEFINE_string("synthetic_dir", "/tmp/ustad_probe_data", "where synthetic data is written")
flags.DEFINE_integer("synthetic_train", 200, "synthetic train/good images")
flags.DEFINE_integer("synthetic_test_good", 20, "synthetic test/good images")
flags.DEFINE_integer("synthetic_test_per_defect", 10, "synthetic defective images per type")
flags.DEFINE_integer("image_size", 128, "probe image side")
flags.DEFINE_integer("seed", 0, "bank subset, random-teacher init and students seed")
# Descriptor probe.
flags.DEFINE_integer("bank_size", 25_000, "memory-bank descriptors")
flags.DEFINE_float("sigma", 4.0, "Gaussian smoothing of the maps (pixels)")
flags.DEFINE_integer("grid_stride", 8, "grid probe: pixels between grid descriptors")
# Student probe: the fixed schedule.
flags.DEFINE_integer("students", 3, "M")
flags.DEFINE_integer("student_epochs", 2, "epochs of the student probe")
flags.DEFINE_integer("student_batch", 2, "images per student step")
flags.DEFINE_float("student_lr", 1e-3, "student learning rate (paper: 1e-4 for 100 epochs)")
flags.DEFINE_enum(
    "student_preset", "", ["", "cpu"], "cpu: the cpu preset's schedule for the teacher's p"
)
flags.DEFINE_string("student_workdir", None, "keep the students under <this>/<teacher>/<data>")
# Distillation probe.
flags.DEFINE_string("photos_dir", None, "photo folder (its held-out split); default bundled")
flags.DEFINE_integer("patches", 2048, "evaluation patches (as many again fit the read-out)")
flags.DEFINE_integer("photo_seed", 12345, "crop stream (not the trainer's)")
flags.DEFINE_string("backbone", "efficientnet_lite0", "P when the teacher names none")
flags.DEFINE_integer("backbone_input_size", 0, "P's input side when the teacher names none")
flags.DEFINE_string("out", None, "also append the lines to this .jsonl file")


_LOADED = {}


def _datasets(channels: int):
    """``(name, MVTecCategory, settings)`` of every requested dataset (loaded once per
    channel count, then kept for the next teachers)."""
    if channels not in _LOADED:
        _LOADED[channels] = list(_load_datasets(channels))
    return _LOADED[channels]


def _load_datasets(channels: int):
    from ustad.data.mvtec import load_mvtec_category
    from ustad.data.synthetic import make_synthetic_category
    from ustad.uninformed_students.teacher import sources

    grayscale = channels == 1
    size = FLAGS.image_size
    named = [(FLAGS.mvtec_dir, FLAGS.category)] if FLAGS.mvtec_dir else []
    for entry in FLAGS.categories:
        root, _, category = entry.rpartition(":")
        if not root or not category:
            raise app.UsageError(f"--categories entry {entry!r} is not <root>:<category>")
        named.append((root, category))
    for root, category in named:
        data = load_mvtec_category(root, category, image_size=size, grayscale=grayscale)
        yield f"{category}@{size}", data, {"root": root}
    for texture in FLAGS.synthetic:
        arguments = {
            "texture": texture,
            "image_size": size,
            "num_train": FLAGS.synthetic_train,
            "num_test_good": FLAGS.synthetic_test_good,
            "num_test_per_defect": FLAGS.synthetic_test_per_defect,
            "seed": FLAGS.seed,
        }
        category = "synthetic_" + "_".join(f"{v}" for v in arguments.values())
        root = Path(FLAGS.synthetic_dir)
        if not (root / category / "synthetic.json").exists():
            make_synthetic_category(root, category, overwrite=True, **arguments)
        data = load_mvtec_category(root, category, image_size=size, grayscale=grayscale)
        # The bundled fallback corpus includes some of these textures: a teacher trained on it
        # has seen the synthetic category's source (not its defects).
        seen = texture in sources.NATURAL_PHOTOS
        info = dict(arguments, root=str(root / category), in_bundled_photos=seen)
        yield f"synthetic:{texture}@{size}", data, info


def _students_config(image_size: int, patch_size: int):
    from configs.students import get_config

    if FLAGS.student_preset:
        # The preset's own schedule (its batch, learning rate and updates for this p), M = 3.
        config = get_config(FLAGS.student_preset)
        config.patch_sizes = (patch_size,)
        config.image_size = image_size
        config.seed = FLAGS.seed
        config.num_devices = 1
        config.log_every_steps = 10**9
        return config
    config = get_config("p33")
    config.num_students = FLAGS.students
    config.epochs = FLAGS.student_epochs
    config.batch_size = FLAGS.student_batch
    config.learning_rate = FLAGS.student_lr
    config.image_size = image_size
    config.seed = FLAGS.seed
    config.num_devices = 1
    config.log_every_steps = 10**9
    return config


def _photos():
    from ustad.uninformed_students.teacher import sources

    if FLAGS.photos_dir:
        photos = sources.photo_folder(FLAGS.photos_dir, split="holdout")
        return photos, f"{FLAGS.photos_dir} (holdout split)"
    return sources.natural_photos(), "bundled natural photos (fresh crops)"


def _snapshots(workdir: str):
    """``(spec, step, metrics logged at that step or None)`` of a teacher run's snapshots and
    of its newest checkpoint (the workdir itself), by step."""
    root = Path(workdir)
    logged = {}
    metrics_file = root / "metrics.jsonl"
    if metrics_file.exists():
        for line in metrics_file.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                logged[int(record["step"])] = record
    found = [
        (str(path), int(path.name.split(".")[0].removeprefix("step_")))
        for path in sorted((root / "snapshots").glob("step_*.teacher.npz"))
    ]
    if not found and not (root / "checkpoints").is_dir():
        raise app.UsageError(f"--snapshots_of={workdir}: no snapshots/ and no checkpoints/")
    if (root / "checkpoints").is_dir():
        from ustad.uninformed_students.teacher.catalog import load_teacher

        last = int(load_teacher(root, allow_unfinished=True)[2]["step"])
        if last not in {step for _, step in found}:
            found.append((str(root), last))
    return [(spec, step, logged.get(step)) for spec, step in sorted(found, key=lambda x: x[1])]


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    std_logging.getLogger("ustad").setLevel(std_logging.WARNING)
    specs = list(FLAGS.teachers or FLAGS.workdirs or [])
    training = {}
    for workdir in FLAGS.snapshots_of:
        for spec, step, metrics in _snapshots(workdir):
            specs.append(spec)
            training[spec] = {"workdir": workdir, "step": step, "metrics": metrics}
    if not specs:
        raise app.UsageError("--teachers or --snapshots_of is required")
    unknown = set(FLAGS.probes) - set(PROBES)
    if unknown:
        raise app.UsageError(f"unknown probes {sorted(unknown)}")
    device = device_name()
    backbones = {}
    photos = None
    for spec in specs:
        t0 = time.perf_counter()
        teacher = probes.load_probe_teacher(spec, seed=FLAGS.seed)
        description = dict(teacher.description, load_s=round(time.perf_counter() - t0, 2))
        distill = None
        if "distill" in FLAGS.probes:
            from ustad.models.pretrained import load_pretrained

            if photos is None:
                photos = _photos()
            name = description["backbone"] or FLAGS.backbone
            if name not in backbones:
                backbones[name] = load_pretrained(name)
            distill = distillation.distill_probe(
                teacher,
                backbones[name],
                photos[0],
                patches=FLAGS.patches,
                seed=FLAGS.photo_seed,
                input_size=FLAGS.backbone_input_size or None,
            )
            distill["settings"].update(photo_source=photos[1], backbone=name)
        for dataset, data, data_settings in _datasets(int(description["channels"])):
            record = {
                "benchmark": "teacher_quality",
                "device": device,
                "teacher": description,
                **({"training": training[spec]} if spec in training else {}),
                "dataset": dataset,
                "dataset_settings": data_settings,
                "train_images": len(data.train_images),
                "test_images": len(data.test_images),
                "defective": int(np.sum(data.test_labels)),
            }
            if "descriptor" in FLAGS.probes:
                record["descriptor"] = probes.descriptor_probe(
                    teacher,
                    data.train_images,
                    data.test_images,
                    data.test_masks,
                    data.test_labels,
                    bank_size=FLAGS.bank_size,
                    sigma=FLAGS.sigma,
                    seed=FLAGS.seed,
                )
            if "grid" in FLAGS.probes:
                record["grid"] = probes.grid_descriptor_probe(
                    teacher,
                    data.train_images,
                    data.test_images,
                    data.test_masks,
                    data.test_labels,
                    stride=FLAGS.grid_stride,
                    sigma=FLAGS.sigma,
                )
            if "student" in FLAGS.probes:
                workdir = None
                if FLAGS.student_workdir:
                    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in spec)
                    workdir = Path(FLAGS.student_workdir) / safe / dataset.replace(":", "_")
                record["student"] = probes.student_probe(
                    teacher,
                    _students_config(FLAGS.image_size, teacher.module.patch_size),
                    data.train_images,
                    data.test_images,
                    data.test_masks,
                    data.test_labels,
                    workdir=workdir,
                    sigma=FLAGS.sigma,
                )
            if distill is not None:
                record["distill"] = distill
            emit(record, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
