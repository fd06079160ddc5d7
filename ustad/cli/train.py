"""``ustad train-teacher`` and ``ustad train-students``: the two training commands."""

from __future__ import annotations

import contextlib
import logging
import os

from absl import flags

from ustad.cli.common import Command, config_flag

logger = logging.getLogger("ustad.cli")

TEACHER_DOC = """
Pretrain one teacher (paper §3): a patch network distilled from an ImageNet network.

Reads: natural-image patches (default: the photos bundled with scikit-image and scikit-learn;
--config.source=folder --config.source_path=DIR or --config.source=tfds for ImageNet), and
P's weights (EfficientNet-Lite0 offline; --config.backbone=resnet18 downloads or reads them).
Writes: <workdir>/checkpoints/<step>/ and <workdir>/metrics.jsonl; resumes when run again.
Time: the paper's 50,000 steps take ~4 h (p17, p33) and ~8 h (p65) on 2 CPU cores, an
estimated few minutes on one GPU (not measured); configs/teacher.py:smoke about a minute.
Then: ustad train-students --config.teacher_workdir=<workdir>, or
ustad teachers export --workdir=<workdir> --out=<file> --install=<name> to use it by name.
"""


def define_teacher(fv: flags.FlagValues, argv: list[str]) -> None:
    config_flag(fv, argv, "", "configs/teacher.py:<p17|p33|p65|smoke>")
    flags.DEFINE_string("workdir", None, "folder for checkpoints and metrics", flag_values=fv)


def run_teacher(fv: flags.FlagValues) -> None:
    from ustad.uninformed_students.teacher.train import train_and_evaluate
    from ustad.workdir_lock import workdir_lock

    logger.info("setting up: patches, P and the teacher, then compiling the training step…")
    with workdir_lock(fv["workdir"].value):
        module, _, meta = train_and_evaluate(fv["config"].value, fv["workdir"].value)
    print(
        f"teacher p={module.patch_size} (d={module.out_dim}, {meta['channels']} channels, "
        f"P={meta['backbone']}: {meta.get('backbone_input')}) saved in {fv['workdir'].value} at "
        f"step {meta['step']}"
    )


STUDENTS_DOC = """
Train M students per receptive field on anomaly-free images (paper §4).

Reads: <data_dir>/<category>/train/good/*.png|jpg|bmp only (test/ and ground_truth/ are not
needed), resized to --config.image_size: 256 (square) or '(H, W)', multiples of the network's
pooling stride (8 for p=65, 4 for p=33, 1 for p=17); --config.keep_aspect=True resizes the
short side to --config.image_size instead and rounds both sides to the stride (a warning says
when images are squashed by more than 1.5×); the default, 'auto', does so when the training
images are not square (long side > 1.1 × short side), in both families. Held-out good images
(--config.val_fraction) give the validation loss after every epoch; the students of lowest
validation loss are kept (--config.select=best_val; 'last' keeps the last), and the record says
whether it had flattened. --config.max_minutes=N stops training at the first update after N
minutes of training (compilation not counted; a resumed run gets what is left), saves and
records stopped_by "max_minutes"; --config.min_train_steps is a floor of updates whatever the
category's size. The teacher in --config.teacher_workdir (a
workdir, a .teacher.npz file or an installed teacher's name; "{p}" is replaced by p).
Writes: <workdir>/checkpoints/<step>/ and metrics.jsonl (one scale), or <workdir>/p<p>/ for
each of several --config.patch_sizes; resumes an interrupted run, refuses to resume one with
different settings or data.
Time: configs/students.py:smoke under a minute on CPU; the paper's 100 epochs on MVTec AD at
256² take weeks on 2 CPU cores (~31 s per step at 128²) and an estimated ~10 minutes per scale
on one H100 (not measured).
Presets (--config=configs/students.py:<name>): p17, p33, p65, multiscale (the paper, full-width
teachers), each also as <name>_small (the shipped small teachers, ⅛ widths), cpu (the 2-core
preset: p17_small + p33_small at 128², 940 / 1128 updates, ~30 min) and smoke.
Multi-host: the same command on every host with --coordinator, --num_processes, --process_id.
STFPM (--config=configs/stfpm.py:<lite0|resnet18|ensemble|cpu|cpu_ensemble|smoke>): one
feature-pyramid student (or M) of a frozen ImageNet teacher instead, on the same data, into
<workdir>/checkpoints/ and metrics.jsonl; the workdir records its family, so `ustad score`
and `ustad evaluate` take it unchanged. Time: configs/stfpm.py:smoke under a minute on CPU;
:cpu (256², 60 updates of batch 8) 6-10 minutes on 2 CPU cores; the paper's 100 epochs ~3 h.
"""


def define_students(fv: flags.FlagValues, argv: list[str]) -> None:
    help_text = "configs/students.py:<p17|p33|p65|multiscale|smoke> or configs/stfpm.py:<name>"
    config_flag(fv, argv, "", help_text)
    flags.DEFINE_string("workdir", None, "folder for checkpoints and metrics", flag_values=fv)
    flags.DEFINE_string("coordinator", None, "multi-host: host:port of process 0", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "multi-host: number of processes", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "multi-host: this process's index", flag_values=fv)


def validate(config, workdir: str) -> None:
    """The family's ``validate(config, workdir)``: bad settings, a missing teacher or a workdir
    holding another run are refused here, before data is read or anything compiles."""
    from ustad import families

    if families.config_family(config) == families.STFPM:
        from ustad.stfpm.config import validate as validate_family
    else:
        from ustad.uninformed_students.config import validate as validate_family
    validate_family(config, workdir)


def run_students(fv: flags.FlagValues) -> None:
    import jax

    from ustad import families, sharding
    from ustad.workdir_lock import workdir_lock

    if fv["coordinator"].value:
        sharding.initialize_distributed(
            fv["coordinator"].value, fv["num_processes"].value, fv["process_id"].value
        )
    config, workdir = fv["config"].value, fv["workdir"].value
    validate(config, workdir)
    # One process per workdir: a second training into it would interleave its files. On several
    # hosts, every process runs this command into the same workdir; process 0 holds the lock.
    lock = workdir_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        _make_synthetic_data(config)
        logger.info(
            "setting up: reading %s/%s and preparing the teacher, then compiling the "
            "training step…", config.data_dir, config.category,
        )  # fmt: skip
        trained = families.train(config, workdir)
    for model in trained if isinstance(trained, list | tuple) else [trained]:
        print(model.describe())


def _make_synthetic_data(config) -> None:
    """The smoke configs' synthetic category, written into ``data_dir`` when it is missing."""
    if config.get("synthetic_data"):
        from ustad.data.synthetic import make_synthetic_category

        if not os.path.isdir(os.path.join(config.data_dir, config.category)):
            make_synthetic_category(
                config.data_dir, config.category, image_size=config.image_size, num_train=12
            )


TRAIN_TEACHER = Command(
    "pretrain a teacher on natural-image patches",
    TEACHER_DOC,
    define_teacher,
    run_teacher,
    ("config", "workdir"),
)
TRAIN_STUDENTS = Command(
    "train students on <category>/train/good",
    STUDENTS_DOC,
    define_students,
    run_students,
    ("config", "workdir"),
)
