"""The commands of ``ustad`` (:mod:`ustad.cli`): each defines its flags and calls the library.

A command's ``doc`` is its ``--help`` text: what it reads, what it writes, roughly how long it
takes. ``run`` receives the parsed flags; it raises ``FileNotFoundError``/``ValueError`` for
problems the user can fix, which the CLI prints as one ``error:`` line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from absl import flags
from ml_collections import config_flags

logger = logging.getLogger("ustad.cli")


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: one-line summary, ``--help`` text, flag definitions and the action."""

    summary: str
    doc: str
    define: Callable[[flags.FlagValues, list[str]], None]
    run: Callable[[flags.FlagValues], None]
    required: tuple[str, ...] = ()


def _config_flag(fv, argv, default, help_text):
    # ``argv`` tells the flag which ``--config.<field>`` overrides to define.
    from ustad.cli import resolve_config_arg

    default = resolve_config_arg(default) if default else None
    config_flags.DEFINE_config_file(
        "config", default, help_text, flag_values=fv, lock_config=True, sys_argv=argv
    )


# --------------------------------------------------------------------------------------- demo

DEMO_DOC = """
The whole method on one category: teachers → students → anomaly maps → report.

Reads: nothing by default (it writes a synthetic defect dataset: a scikit-image texture with
procedural defects and exact masks); with --config.data_dir=/data/mvtec_ad
--config.category=bottle, that MVTec-layout category instead (train/good, test/, and
ground_truth/ if present).
Writes, under --out: data/ (synthetic data only), teacher_p17/ and teacher_p33/ (teacher
checkpoints; skipped with --config.teacher_workdir=<name or path with {p}>), students/p<p>/,
report/ (metrics.md/.json/.csv, pro_curves.png, roc_pixel.png, roc_image.png, examples/*.png)
and summary.json.
Time: ~10 minutes on 2 CPU cores with the default configs/demo.py (64×64 images, small nets);
an interrupted demo resumes where it stopped when run again with the same flags.
"""


def _define_demo(fv, argv):
    flags.DEFINE_string(
        "out", "demo_out", "output folder (an interrupted demo resumes)", flag_values=fv
    )
    _config_flag(fv, argv, "configs/demo.py", "experiment config (configs/demo.py)")


def _run_demo(fv):
    from ustad.experiment import format_summary, run_experiment

    summary = run_experiment(fv["config"].value, fv["out"].value)
    print(format_summary(summary))
    print(f"\nReport: {os.path.abspath(summary['report_dir'])}")
    print(f"Stage times (s): {summary['seconds']}")


# ------------------------------------------------------------------------------ train-teacher

TEACHER_DOC = """
Pretrain one teacher (paper §3): a patch network distilled from an ImageNet network.

Reads: natural-image patches (default: the photos bundled with scikit-image and scikit-learn;
--config.source=folder --config.source_path=DIR or --config.source=tfds for ImageNet), and
P's weights (EfficientNet-Lite0 offline; --config.backbone=resnet18 downloads or reads them).
Writes: <workdir>/checkpoints/<step>/ and <workdir>/metrics.jsonl; resumes when run again.
Time: the paper's 50,000 steps take ~4 h (p17, p33) and ~8 h (p65) on 2 CPU cores, an
estimated few minutes on one GPU (not measured); configs/teacher.py:smoke about a minute.
Then: ustad train-students --config.teacher_workdir=<workdir>.
"""


def _define_teacher(fv, argv):
    _config_flag(fv, argv, "", "configs/teacher.py:<p17|p33|p65|smoke>")
    flags.DEFINE_string("workdir", None, "folder for checkpoints and metrics", flag_values=fv)


def _run_teacher(fv):
    from ustad.train.teacher import train_and_evaluate

    module, _, meta = train_and_evaluate(fv["config"].value, fv["workdir"].value)
    print(
        f"teacher p={module.patch_size} (d={module.out_dim}, {meta['channels']} channels, "
        f"P={meta['backbone']}: {meta.get('backbone_input')}) saved in {fv['workdir'].value} at "
        f"step {meta['step']}"
    )


# ----------------------------------------------------------------------------- train-students

STUDENTS_DOC = """
Train M students per receptive field on anomaly-free images (paper §4).

Reads: <data_dir>/<category>/train/good/*.png|jpg|bmp only (test/ and ground_truth/ are not
needed), resized to --config.image_size: 256 (square) or '(H, W)', multiples of the network's
pooling stride (8 for p=65, 4 for p=33, 1 for p=17); --config.keep_aspect=True resizes the
short side to --config.image_size instead and rounds both sides to the stride (a warning says
when images are squashed by more than 1.5×). The teacher in --config.teacher_workdir (a
workdir, a .teacher.npz file or an installed teacher's name; "{p}" is replaced by p).
Writes: <workdir>/checkpoints/<step>/ and metrics.jsonl (one scale), or <workdir>/p<p>/ for
each of several --config.patch_sizes; resumes an interrupted run, refuses to resume one with
different settings or data.
Time: configs/students.py:smoke under a minute on CPU; the paper's 100 epochs on MVTec AD at
256² take weeks on 2 CPU cores (~31 s per step at 128²) and an estimated ~10 minutes per scale
on one H100 (not measured).
Multi-host: the same command on every host with --coordinator, --num_processes, --process_id.
STFPM (--config=configs/stfpm.py:<lite0|resnet18|ensemble|cpu|cpu_ensemble|smoke>): one
feature-pyramid student (or M) of a frozen ImageNet teacher instead, on the same data, into
<workdir>/checkpoints/ and metrics.jsonl; the workdir records its family, so `ustad score`
and `ustad evaluate` take it unchanged. Time: configs/stfpm.py:smoke under a minute on CPU;
:cpu (bottle, 256², 3 epochs) ~10 minutes on 2 CPU cores; the paper's 100 epochs ~3 h there.
"""


def _define_students(fv, argv):
    help_text = "configs/students.py:<p17|p33|p65|multiscale|smoke> or configs/stfpm.py:<name>"
    _config_flag(fv, argv, "", help_text)
    flags.DEFINE_string("workdir", None, "folder for checkpoints and metrics", flag_values=fv)
    flags.DEFINE_string("coordinator", None, "multi-host: host:port of process 0", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "multi-host: number of processes", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "multi-host: this process's index", flag_values=fv)


def _run_students(fv):
    from ustad import sharding
    from ustad.train.students import train_and_evaluate

    if fv["coordinator"].value:
        sharding.initialize_distributed(
            fv["coordinator"].value, fv["num_processes"].value, fv["process_id"].value
        )
    config = fv["config"].value
    if config.get("synthetic_data"):
        from ustad.data.synthetic import make_synthetic_category

        if not os.path.isdir(os.path.join(config.data_dir, config.category)):
            make_synthetic_category(
                config.data_dir, config.category, image_size=config.image_size, num_train=12
            )
    if config.get("family", "students") == "stfpm":
        from ustad.train import stfpm

        model = stfpm.train_and_evaluate(config, fv["workdir"].value)
        print(
            f"STFPM: {model.num_students} student(s), {config.backbone} "
            f"{'/'.join(model.network.level_names)}, score {model.score} ({model.combination})"
        )
        return
    for scale in train_and_evaluate(config, fv["workdir"].value):
        print(
            f"p={scale.patch_size}: {scale.num_students} students trained, score normalisation "
            f"{scale.normalization.as_dict()}"
        )


# -------------------------------------------------------------------------------------- score

SCORE_DOC = """
Anomaly maps for any folder, glob or file of images, with trained students (paper §5).

Reads: the students in --workdirs (one scale, a multi-scale run, or several; their scales are
averaged) and the images (png/jpg/bmp, any size, gray or RGB); every image is read before any
is scored, and an unreadable one stops the run naming it.
Writes, for every image <rel> (its path below the images' common folder, extension kept):
<out>/<rel>.npz (anomaly_map [H, W] float32 at the image's size, score),
<out>/<rel>.overlay.png (image | map over the image, one colour scale for the run) and
<out>/scores.csv (path,score) and <out>/scoring.json (the students or model, the image score
--reduction/--top_k and the smoothing --smooth_sigma used).
Options (not in the paper, off by default): --smooth_sigma=S blurs each map by a Gaussian of
S pixels before the image score; --reduction=topk --top_k=K scores an image by the mean of its
K highest pixels instead of the maximum (the maximum is the default).
Time: compilation (seconds), then per image at 256² with the paper's nets ~10–14 s per scale
and 35 s multi-scale on 2 CPU cores (benchmarks/RESULTS.md); the demo's small nets at 64²
score several images a second. GPU speed is not measured yet.
With --model=detector.onnx or detector.jaxexport (`ustad export`) instead of --workdirs, the
exported model scores (images resized to its size on the host as the students' are, maps back);
its image score was fixed by `ustad export` and it does not smooth, so --reduction, --top_k and
--smooth_sigma are refused with --model.
"""


def _define_score(fv, argv):
    flags.DEFINE_list(
        "workdirs", None, "students workdir(s); their scales are averaged", flag_values=fv
    )
    flags.DEFINE_string(
        "model",
        None,
        "an exported detector (.onnx, .jaxexport) instead of --workdirs",
        flag_values=fv,
    )
    flags.DEFINE_string("images", None, "image folder, glob pattern or single file", flag_values=fv)
    flags.DEFINE_string("out", None, "output folder", flag_values=fv)
    _detector_flags(fv)
    flags.DEFINE_float(
        "vmin", None, "colour scale minimum (default: the run's minimum)", flag_values=fv
    )
    flags.DEFINE_float(
        "vmax", None, "colour scale maximum (default: the run's maximum)", flag_values=fv
    )


def _score_option_flags(fv, smooth_help: str):
    """--reduction, --top_k and --smooth_sigma (ustad.score_maps.check_scoring_options)."""
    flags.DEFINE_enum(
        "reduction", "max", ["max", "mean", "topk"], "image score from the map", flag_values=fv
    )
    flags.DEFINE_integer("top_k", 100, "pixels averaged by --reduction=topk", flag_values=fv)
    flags.DEFINE_float("smooth_sigma", 0.0, smooth_help, flag_values=fv)


def _detector_flags(fv):
    flags.DEFINE_integer("batch_size", 8, "images per jitted call", flag_values=fv)
    _score_option_flags(
        fv, "Gaussian smoothing of the maps before the image score, σ in pixels (0: none)"
    )
    flags.DEFINE_bool("bf16", False, "run the networks in bfloat16", flag_values=fv)


def _detector_kwargs(fv) -> dict:
    import jax.numpy as jnp

    from ustad.score_maps import check_scoring_options

    check_scoring_options(fv["reduction"].value, fv["top_k"].value, fv["smooth_sigma"].value)
    return dict(
        reduction=fv["reduction"].value,
        top_k=fv["top_k"].value,
        smooth_sigma=fv["smooth_sigma"].value,
        compute_dtype=jnp.bfloat16 if fv["bf16"].value else None,
        batch_size=fv["batch_size"].value,
    )


def _run_score(fv):
    from ustad.data.images import read_image, resolve_image_paths
    from ustad.score_files import output_names, score_files
    from ustad.scoring import Detector

    if bool(fv["workdirs"].value) == bool(fv["model"].value):
        raise ValueError("give either --workdirs (trained students) or --model (an exported file)")
    paths = resolve_image_paths(fv["images"].value)
    output_names(paths)  # clashes and unreadable images fail before the students load
    images = [read_image(path) for path in paths]
    if fv["model"].value:
        from ustad.deploy import load

        fixed = [f"--{n}" for n in ("reduction", "top_k", "smooth_sigma") if fv[n].present]
        if fixed:
            raise ValueError(
                f"{', '.join(fixed)}: an exported model's image score is fixed when it is exported "
                f"(ustad export --reduction/--top_k) and it does not smooth its maps; score with "
                f"--workdirs to use these options"
            )
        detector = load(fv["model"].value, batch_size=fv["batch_size"].value)
        header = getattr(detector, "header", {}) or {}
        settings = {"model": fv["model"].value, "smooth_sigma": 0.0}
        settings |= {k: header[k] for k in ("reduction", "top_k") if k in header}
    else:
        detector = Detector.load(fv["workdirs"].value, **_detector_kwargs(fv))
        settings = {"workdirs": fv["workdirs"].value, **detector.settings}
    _, _, (vmin, vmax) = score_files(
        detector,
        paths,
        fv["out"].value,
        images=images,
        vmin=fv["vmin"].value,
        vmax=fv["vmax"].value,
        settings=settings,
    )
    print(f"scored {len(paths)} images -> {fv['out'].value} (colour scale {vmin:.3g} … {vmax:.3g})")


# ------------------------------------------------------------------------------------- export

EXPORT_DOC = """
Export trained students as one file that scores images without ustad's training code.

Reads: the students in --workdirs (one scale, a multi-scale run, or several; as `ustad score`).
Writes: --out, by its suffix: detector.onnx (ONNX, opset 23: input images [N, H, W, C] float32
in [0, 1], N dynamic; outputs anomaly_map [N, H, W] and image_score [N]; needs
`pip install ustad[export]`) or detector.jaxexport (serialized StableHLO for CPU, CUDA and TPU
with its weights and a JSON header; needs JAX only). Both hold the ustad version, p's, image
size, channels and the teachers' names and SHA-256. Then: ustad score --model=<out>.
Time: seconds to a minute to convert; the check (--check, on by default) scores two random
images with the file and with the students and stops if they differ (~1 min per scale at
256² with the paper's nets on 2 CPU cores).
The file scores exactly as the students do without smoothing (`ustad score --smooth_sigma=0`,
the default): smoothing is not exported, and --smooth_sigma other than 0 is refused.
"""


def _define_export(fv, argv):
    flags.DEFINE_list(
        "workdirs", None, "students workdir(s); their scales are averaged", flag_values=fv
    )
    flags.DEFINE_string("out", None, "the file to write: *.onnx or *.jaxexport", flag_values=fv)
    flags.DEFINE_integer(
        "size", 0, "image size it takes (0: the students' training size)", flag_values=fv
    )
    _score_option_flags(fv, "not supported: exported models do not smooth (must be 0)")
    flags.DEFINE_enum(
        "method",
        "multipool",
        ["multipool", "atrous"],
        "dense extraction (both exact)",
        flag_values=fv,
    )
    flags.DEFINE_bool("check", True, "compare with the students on random images", flag_values=fv)


def _run_export(fv):
    from ustad import deploy
    from ustad.score_maps import check_scoring_options

    check_scoring_options(fv["reduction"].value, fv["top_k"].value, fv["smooth_sigma"].value)
    if fv["smooth_sigma"].value:
        raise ValueError(
            f"--smooth_sigma={fv['smooth_sigma'].value:g}: exported models score without "
            f"smoothing (as `ustad score --smooth_sigma=0`); export without it, and smooth the "
            f"maps the file returns yourself if you need to"
        )
    scales, sources = deploy.load_scales(fv["workdirs"].value)
    try:
        meta = deploy.export(
            scales,
            fv["out"].value,
            size=fv["size"].value or None,
            reduction=fv["reduction"].value,
            top_k=fv["top_k"].value,
            method=fv["method"].value,
            sources=sources,
            check=fv["check"].value,
        )
    except ImportError as error:  # no ONNX converter: one error line, not a traceback
        raise ValueError(str(error)) from error
    size = "×".join(str(s) for s in meta["image_size"])
    print(
        f"exported p={'+'.join(str(p) for p in meta['patch_sizes'])} for {size}×"
        f"{meta['channels']} images -> {fv['out'].value} "
        f"({os.path.getsize(fv['out'].value) / 1e6:.1f} MB)"
    )
    check = meta.get("check", {})
    if "skipped" in check:
        print(f"check skipped: {check['skipped']}")
    elif check:
        print(
            f"check: max |Δ| {check['max_abs_map']:.3g} (maps), {check['max_abs_score']:.3g} "
            f"(scores) against the students, tolerance {check['tolerance']:.3g}"
        )


# ----------------------------------------------------------------------------------- evaluate

EVALUATE_DOC = """
Evaluate trained students on a labelled test set and write the full report.

Reads: the students in --workdirs and --data, a category folder in the MVTec layout:
<data>/test/good/*, <data>/test/<defect type>/* and, for pixel metrics,
<data>/ground_truth/<defect type>/<name>_mask.png (train/ is not needed). Images are resized to
the students' training size (or --image_size).
Writes, under --out: metrics.md/.json/.csv (image AUROC, pixel AUROC, AU-PRO@0.3 per scale and
multi-scale), pro_curves.png, roc_pixel.png, roc_image.png, examples/*.png (image | ground truth
| heatmap). Without ground_truth/: image AUROC and mean score per defect type (metrics.*) and
score_histograms.png, with a note that pixel metrics need masks. metrics.json records the
scoring options (--reduction, --top_k, --smooth_sigma; the defaults are the paper's maps and
their maximum).
Time: as `ustad score` for the test images, plus seconds for the metrics and figures.
"""


def _define_evaluate(fv, argv):
    flags.DEFINE_list(
        "workdirs", None, "students workdir(s); their scales are averaged", flag_values=fv
    )
    flags.DEFINE_string(
        "data", None, "category folder holding test/ (and ground_truth/)", flag_values=fv
    )
    flags.DEFINE_string("out", None, "report folder", flag_values=fv)
    flags.DEFINE_integer(
        "image_size", 0, "evaluation size (0: the students' training size)", flag_values=fv
    )
    flags.DEFINE_integer("examples_per_type", 1, "example figures per defect type", flag_values=fv)
    _detector_flags(fv)


def _run_evaluate(fv):
    from ustad.data import load_mvtec_test
    from ustad.experiment import format_summary, score_sets, write_report
    from ustad.scoring import find_scale_dirs, load_scale

    scales = [load_scale(d) for w in fv["workdirs"].value for d in find_scale_dirs(w)]
    data = Path(fv["data"].value)
    size = fv["image_size"].value or list(scales[0].image_size)
    test = load_mvtec_test(data, image_size=size)
    if any(getattr(scale, "family", "students") != "students" for scale in scales):
        from ustad import stfpm_scoring

        score_sets = stfpm_scoring.score_sets  # STFPM workdirs: one map per model
    detector_kwargs = _detector_kwargs(fv)
    score_maps, image_scores = score_sets(scales, test.images, **detector_kwargs)
    kwargs = {} if test.masks is None else {"examples_per_type": fv["examples_per_type"].value}
    report = write_report(
        fv["out"].value,
        data.resolve().name,
        test,
        score_maps,
        image_scores,
        metadata={
            "data": str(data),
            "workdirs": fv["workdirs"].value,
            "image_size": size,
            "reduction": detector_kwargs["reduction"],
            "top_k": detector_kwargs["top_k"],
            "smooth_sigma": detector_kwargs["smooth_sigma"],
        },
        **kwargs,
    )
    print(format_summary(report.metrics))
    if test.masks is None:
        from ustad.image_report import PIXEL_METRICS_NOTE

        print(f"(image-level metrics only: {PIXEL_METRICS_NOTE})")
    print(f"\nReport: {os.path.abspath(fv['out'].value)}")


# ----------------------------------------------------------------------------------- teachers

TEACHERS_DOC = """
List the teachers ustad can load by name (--config.teacher_workdir=<name>, load_teacher(name)).

Reads: the teachers shipped with ustad and those installed in $USTAD_TEACHERS (default
~/.cache/ustad/teachers). Writes nothing. Time: instant.
"""


def _define_teachers(fv, argv):
    flags.DEFINE_bool(
        "json", False, "one JSON object per teacher instead of a table", flag_values=fv
    )


def _size(num_bytes) -> str:
    return f"{num_bytes / 1e6:.1f} MB" if num_bytes >= 1e5 else f"{num_bytes / 1e3:.0f} kB"


def _run_teachers(fv):
    from ustad.train import teacher_files

    if not hasattr(teacher_files, "list_teachers"):
        raise FileNotFoundError("this version of ustad cannot list teachers yet")
    teachers = teacher_files.list_teachers()
    if fv["json"].value:
        for teacher in teachers:
            print(json.dumps(teacher, default=str))
        return
    if not teachers:
        print(f"no teachers found (install one into {teacher_files.teachers_dir()})")
        return
    header = ("name", "p", "d", "widths", "size", "origin", "path")
    rows = [
        (
            str(t["name"]),
            str(t.get("patch_size", "?")),
            str(t.get("out_dim", "?")),
            str(t.get("widths", "?")),
            _size(t["bytes"]),
            str(t["origin"]),
            str(t["path"]) + (f"  (unreadable: {t['error']})" if "error" in t else ""),
        )
        for t in teachers
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


COMMANDS = {
    "demo": Command(
        "the whole method on one category, offline (~10 min on CPU)",
        DEMO_DOC,
        _define_demo,
        _run_demo,
    ),
    "train-teacher": Command(
        "pretrain a teacher on natural-image patches",
        TEACHER_DOC,
        _define_teacher,
        _run_teacher,
        ("config", "workdir"),
    ),
    "train-students": Command(
        "train students on <category>/train/good",
        STUDENTS_DOC,
        _define_students,
        _run_students,
        ("config", "workdir"),
    ),
    "score": Command(
        "anomaly maps, overlays and scores.csv for any images",
        SCORE_DOC,
        _define_score,
        _run_score,
        ("images", "out"),
    ),
    "export": Command(
        "one .onnx or .jaxexport file that scores without ustad",
        EXPORT_DOC,
        _define_export,
        _run_export,
        ("workdirs", "out"),
    ),
    "evaluate": Command(
        "metrics and figures on a labelled test set",
        EVALUATE_DOC,
        _define_evaluate,
        _run_evaluate,
        ("workdirs", "data", "out"),
    ),
    "teachers": Command(
        "list the teachers loadable by name", TEACHERS_DOC, _define_teachers, _run_teachers
    ),
}
