"""One experiment end to end on an MVTec-AD-layout category: teachers → students → scores →
report. The demo (``make demo``) and ``benchmarks/paper_mvtec.py`` are this function with
different configs (``configs/demo.py``, ``configs/paper_mvtec.py``).

Workdir layout::

    <workdir>/data/<category>/       synthetic data (only when config.data_dir is empty)
    <workdir>/teacher_p<p>/          teacher checkpoints and metrics (skipped when given)
    <workdir>/students/p<p>/         students, target statistics, score normalisation
    <workdir>/report/                metrics.{json,csv,md}, PRO/ROC curves, example figures

Every stage resumes: a finished teacher or student run is loaded, an interrupted one continues.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import ml_collections

logger = logging.getLogger(__name__)


def _teacher_workdir(config, workdir: Path, p: int) -> str:
    template = config.get("teacher_workdir", "")
    if template:
        return template.format(p=p)
    return str(workdir / f"teacher_p{p}")


def _ensure_teacher(config, workdir: Path, p: int, channels: int) -> str:
    """Train (or resume, or find finished) the teacher for ``p``; return its workdir."""
    from ustad.uninformed_students.teacher import train as teacher_lib

    teacher_dir = _teacher_workdir(config, workdir, p)
    if config.get("teacher_workdir", ""):
        teacher_lib.load_teacher(teacher_dir)  # fail early with a clear message if missing
        return teacher_dir
    teacher_config = ml_collections.ConfigDict(config.teacher.to_dict())
    teacher_config.patch_size = p
    teacher_config.channels = channels
    print(f"[ustad] teacher p={p}: {teacher_config.num_steps} steps → {teacher_dir}", flush=True)
    teacher_lib.train_and_evaluate(teacher_config, teacher_dir)
    return teacher_dir


def _data_dir(config, workdir: Path) -> str:
    """The folder holding ``<category>/``: ``config.data_dir``, or synthetic data when it is
    empty (``config.synthetic`` names the texture; ``"none"`` turns synthesis off)."""
    if config.data_dir:
        return config.data_dir
    synthetic = config.get("synthetic")
    if isinstance(synthetic, ml_collections.ConfigDict):  # older configs: all settings in one
        options = synthetic.to_dict()
    elif synthetic and str(synthetic).lower() not in ("none", "false", "0"):
        options = dict(config.get("synthetic_options", {}), texture=str(synthetic))
        options.setdefault("image_size", config.image_size)
    else:
        raise ValueError(
            "no data: set --config.data_dir to the folder holding <category>/ (MVTec layout: "
            "<category>/train/good/, test/<type>/, ground_truth/<type>/), or leave it empty "
            "with --config.synthetic=<texture> for the synthetic demo data"
        )
    from ustad.data.synthetic import make_synthetic_category

    data_dir = workdir / "data"
    if not (data_dir / config.category).exists():
        make_synthetic_category(data_dir, config.category, **options)
    print(f"[ustad] synthetic data: {data_dir / config.category}", flush=True)
    return str(data_dir)


def run_experiment(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Run (or resume) the whole method on one category and write its report.

    Args:
      config: see ``configs/demo.py``: ``data_dir`` (empty: synthetic data), ``category``,
        ``image_size``, ``grayscale``, ``keep_aspect`` (optional, as in ``configs/students.py``),
        ``synthetic`` (texture of the synthetic data, or ``"none"``) and ``synthetic_options``
        (see :func:`ustad.data.make_synthetic_category`), ``patch_sizes``, ``teacher`` (a
        teacher config, used when ``teacher_workdir`` is empty), ``teacher_workdir`` (``"{p}"``
        template of finished teachers), ``students`` (a students config), ``report`` (example
        figures).
      workdir: output folder.

    Returns:
      The metrics dict ``{score_set: {image_auroc, pixel_auroc, au_pro}}`` (image AUROC only
      when the test set has no masks) plus ``report_dir`` and ``seconds`` per stage.
    """
    from ustad.data.mvtec import category_folder, load_mvtec_test, load_mvtec_train
    from ustad.evaluation.test_report import write_report
    from ustad.uninformed_students import train as students_lib
    from ustad.uninformed_students.checkpoints import load_scale
    from ustad.uninformed_students.inputs import size_multiple
    from ustad.uninformed_students.score import score_sets

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    timings = {}
    start = time.perf_counter()
    data_dir = _data_dir(config, workdir)
    train_images, _ = load_mvtec_train(
        data_dir,
        config.category,
        image_size=config.image_size,
        grayscale=config.grayscale,
        keep_aspect=config.get("keep_aspect", False),
        multiple=size_multiple(config.patch_sizes),
    )
    test = load_mvtec_test(
        category_folder(data_dir, config.category),
        image_size=train_images.shape[1:3],
        grayscale=config.grayscale,
    )
    channels = train_images.shape[-1]
    print(
        f"[ustad] {Path(data_dir) / config.category}: {len(train_images)} train/good, "
        f"{len(test.images)} test ({int(test.labels.sum())} defective) at "
        f"{train_images.shape[1]}×{train_images.shape[2]}",
        flush=True,
    )
    timings["data_s"] = time.perf_counter() - start

    scale_dirs = {}
    for p in config.patch_sizes:
        t0 = time.perf_counter()
        teacher_dir = _ensure_teacher(config, workdir, p, channels)
        timings[f"teacher_p{p}_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        students_config = ml_collections.ConfigDict(config.students.to_dict())
        students_config.patch_sizes = (p,)
        students_config.teacher_workdir = teacher_dir
        scale_dir = workdir / "students" / f"p{p}"
        print(
            f"[ustad] students p={p}: M={students_config.num_students}, "
            f"{_schedule(students_config, p)} → {scale_dir}",
            flush=True,
        )
        students_lib.train_students(students_config, scale_dir, train_images, patch_size=p)
        scale_dirs[p] = scale_dir
        timings[f"students_p{p}_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    score_maps, image_scores = score_sets([load_scale(d) for d in scale_dirs.values()], test.images)
    timings["scoring_s"] = time.perf_counter() - t0
    timings["scoring_img_per_s"] = len(test.images) / max(timings["scoring_s"], 1e-9)

    report_dir = workdir / "report"
    report = write_report(
        report_dir,
        config.category,
        test,
        score_maps,
        image_scores,
        **({} if test.masks is None else {"examples_per_type": config.report.examples_per_type}),
        metadata={
            "data": str(Path(data_dir) / config.category),
            "image_size": config.image_size,
            "patch_sizes": list(config.patch_sizes),
            "num_students": config.students.num_students,
            "schedule": {f"p{p}": _schedule(config.students, p) for p in config.patch_sizes},
            "image_score": "max of the anomaly map",
            "timings_s": {k: round(v, 2) for k, v in timings.items()},
        },
    )
    timings["total_s"] = time.perf_counter() - start
    summary = dict(report.metrics)
    summary["report_dir"] = str(report_dir)
    summary["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _schedule(students_config, p: int) -> str:
    """``"<n> updates"`` or ``"<n> epochs"``: how long the students of scale p train."""
    from ustad.uninformed_students.schedule import scale_epochs, scale_updates

    updates = scale_updates(students_config, p)
    if updates:
        return f"≥ {updates} updates"
    return f"{scale_epochs(students_config, p)} epochs"
