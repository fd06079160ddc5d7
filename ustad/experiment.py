"""One experiment end to end on an MVTec-AD-layout category: teachers → students → scores →
report. The demo (``make demo``) and ``benchmarks/paper_mvtec.py`` are this function with
different configs (``configs/demo.py``, ``configs/paper_mvtec.py``).

Workdir layout::

    <workdir>/data/<category>/       synthetic data (only when the config asks for it)
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
    from ustad.train import teacher as teacher_lib

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


def run_experiment(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Run (or resume) the whole method on one category and write its report.

    Args:
      config: see ``configs/demo.py``: ``data_dir``, ``category``, ``image_size``, ``grayscale``,
        ``synthetic`` (a ConfigDict for :func:`ustad.data.make_synthetic_category`, or None),
        ``patch_sizes``, ``teacher`` (a teacher config, used when ``teacher_workdir`` is empty),
        ``teacher_workdir`` (``"{p}"`` template of finished teachers), ``students`` (a students
        config), ``report`` (example figures).
      workdir: output folder.

    Returns:
      The metrics dict ``{score_set: {image_auroc, pixel_auroc, au_pro}}`` plus ``report_dir``
      and ``seconds`` per stage.
    """
    from ustad.data import load_mvtec_category, make_synthetic_category
    from ustad.evaluate import write_category_report
    from ustad.scoring import Detector, load_scale
    from ustad.train import students as students_lib

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    timings = {}
    start = time.perf_counter()
    data_dir = config.data_dir
    if config.get("synthetic"):
        data_dir = str(workdir / "data")
        synthetic = config.synthetic.to_dict()
        if not (Path(data_dir) / config.category).exists():
            make_synthetic_category(data_dir, config.category, **synthetic)
        print(f"[ustad] synthetic data: {Path(data_dir) / config.category}", flush=True)
    data = load_mvtec_category(
        data_dir, config.category, image_size=config.image_size, grayscale=config.grayscale
    )
    channels = data.train_images.shape[-1]
    print(
        f"[ustad] {config.category}: {len(data.train_images)} train/good, "
        f"{len(data.test_images)} test ({int(data.test_labels.sum())} defective) at "
        f"{data.train_images.shape[1]}×{data.train_images.shape[2]}",
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
            f"{students_config.epochs} epochs → {scale_dir}",
            flush=True,
        )
        students_lib.train_students(students_config, scale_dir, data.train_images, patch_size=p)
        scale_dirs[p] = scale_dir
        timings[f"students_p{p}_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scales = {p: load_scale(d) for p, d in scale_dirs.items()}
    score_maps, image_scores = {}, {}
    for p, scale in scales.items():
        maps, scores = Detector([scale]).score(data.test_images)
        score_maps[f"p{p}"], image_scores[f"p{p}"] = maps, scores
    if len(scales) > 1:
        # The paper's multi-scale score: the plain average of the per-scale scores.
        maps, scores = Detector(list(scales.values())).score(data.test_images)
        score_maps["multiscale"], image_scores["multiscale"] = maps, scores
    timings["scoring_s"] = time.perf_counter() - t0
    timings["scoring_img_per_s"] = len(data.test_images) / max(timings["scoring_s"], 1e-9)

    report_dir = workdir / "report"
    report = write_category_report(
        report_dir,
        config.category,
        score_maps,
        data.test_masks,
        data.test_labels,
        image_scores=image_scores,
        images=data.test_images,
        types=data.test_types,
        names=[
            f"{t}_{Path(path).stem}"
            for t, path in zip(data.test_types, data.test_paths, strict=True)
        ],
        examples_per_type=config.report.examples_per_type,
        metadata={
            "image_size": config.image_size,
            "patch_sizes": list(config.patch_sizes),
            "num_students": config.students.num_students,
            "epochs": config.students.epochs,
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


def format_summary(summary: dict) -> str:
    """A short Markdown table of a :func:`run_experiment` result."""
    lines = ["| scores | image AUROC | pixel AUROC | AU-PRO@0.3 |", "|---|---|---|---|"]
    for name, row in summary.items():
        if isinstance(row, dict) and "au_pro" in row:
            lines.append(
                f"| {name} | {row['image_auroc']:.3f} | {row['pixel_auroc']:.3f} | "
                f"{row['au_pro']:.3f} |"
            )
    return "\n".join(lines)
