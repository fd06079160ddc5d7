"""The report of a test set that has image labels but no masks: image-level metrics only.

Many real datasets sort their test images into ``test/good`` and ``test/<defect type>`` without
drawing a mask for each defect. Pixel AUROC and AU-PRO need masks; image AUROC and the
distribution of image scores per defect type do not. :func:`write_image_report` writes those,
and says in the table what the pixel metrics would need. Like :mod:`ustad.evaluation.reports`, every
metric is computed before the first file is written, and every file is written atomically.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ustad.evaluation import metrics
from ustad.evaluation.reports import Report, write_table
from ustad.io import atomic_write

IMAGE_METRIC_NAMES = ("image_auroc",)


PIXEL_METRICS_NOTE = (
    "pixel AUROC and AU-PRO need masks: ground_truth/<defect type>/<name>_mask.png for every "
    "defective test image"
)


def image_level_metrics(
    image_scores: Mapping[str, Any], labels, *, types: Sequence[str] | None = None
) -> dict[str, dict[str, float]]:
    """Image AUROC per score set, and the mean image score of every defect type.

    Args:
        image_scores: ``{score set: [N] image scores}``.
        labels: ``[N]`` int, 1 = defective, 0 = good.
        types: ``[N]`` defect-type names (adds ``mean_score_<type>`` entries).

    Returns:
        ``{score set: {"image_auroc": float, "mean_score_<type>": float, ...}}``; image AUROC is
        NaN when the test set holds only one class.

    Raises:
        ValueError: shapes disagree, or labels are not 0/1.
    """
    labels = np.asarray(labels)
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (good) or 1 (defective)")
    results = {}
    for name, scores in image_scores.items():
        scores = np.asarray(scores, np.float64)
        if scores.shape != labels.shape:
            raise ValueError(f"score set {name!r}: {scores.shape} scores for {labels.shape} labels")
        both = 0 < labels.sum() < len(labels)
        values = {"image_auroc": metrics.image_auroc(scores, labels) if both else float("nan")}
        for kind in dict.fromkeys(types or ()):
            chosen = np.asarray([t == kind for t in types])
            values[f"mean_score_{kind}"] = float(scores[chosen].mean())
        results[name] = values
    return results


def plot_score_histograms(scores, types: Sequence[str], path, *, title: str = "") -> Path:
    """One PNG: the histogram of image scores of each defect type, on shared bins.

    Args:
        scores: ``[N]`` image scores.
        types: ``[N]`` defect-type names.
        path: the PNG to write.
        title: figure title.
    """
    scores = np.asarray(scores, np.float64)
    bins = np.histogram_bin_edges(scores, bins=min(30, max(5, len(scores) // 2)))
    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    for kind in dict.fromkeys(types):
        chosen = scores[np.asarray([t == kind for t in types])]
        axes.hist(chosen, bins=bins, alpha=0.5, label=f"{kind} ({len(chosen)})")
    axes.set_xlabel("image score")
    axes.set_ylabel("images")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return atomic_write(Path(path), buffer.getvalue())


def write_image_report(
    out_dir,
    category: str,
    image_scores: Mapping[str, Any],
    labels,
    types: Sequence[str],
    *,
    metadata: Mapping[str, Any] | None = None,
) -> Report:
    """``metrics.{json,csv,md}`` (image AUROC, mean score per type) and ``score_histograms.png``.

    Args:
        out_dir: output folder (created).
        category: name used in the table and title.
        image_scores: ``{score set: [N] image scores}``; the histogram shows "multiscale" if
            present, else the last set.
        labels: ``[N]`` int, 1 = defective, 0 = good.
        types: ``[N]`` defect-type names.
        metadata: JSON-serialisable facts stored in metrics.json.

    Returns:
        The metrics and every path written.
    """
    results = image_level_metrics(image_scores, labels, types=types)
    columns = ["category", "scale", *next(iter(results.values()))]
    rows = [{"category": category, "scale": name} | values for name, values in results.items()]
    meta = {"category": category, "note": PIXEL_METRICS_NOTE} | dict(metadata or {})
    out_dir = Path(out_dir)
    paths = write_table(rows, columns, out_dir, "metrics", meta)
    markdown = paths[-1].read_text(encoding="utf-8")
    note = f"\nImage-level metrics only: {PIXEL_METRICS_NOTE}.\n"
    atomic_write(paths[-1], (markdown + note).encode())
    shown = "multiscale" if "multiscale" in image_scores else list(image_scores)[-1]
    paths.append(
        plot_score_histograms(
            image_scores[shown],
            types,
            out_dir / "score_histograms.png",
            title=f"{category}: image scores ({shown})",
        )
    )
    return Report(metrics=results, paths=paths)
