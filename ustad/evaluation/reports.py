"""Evaluation reports on plain arrays: metrics per category and score set, tables, reports.

Works on host numpy arrays only (anomaly maps, masks, labels), so it does not depend on how the
maps were made or how the data was read. Every file is written atomically (to a temporary file
in the same folder, then renamed), and all metrics are computed before the first file is
written, so an error never leaves a half-written report behind. The figures (curves, example
images) are drawn by :mod:`ustad.evaluation.figures`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ustad.evaluation import metrics
from ustad.evaluation.figures import plot_curves, select_examples, write_examples

# The figure functions moved to ustad.evaluation.figures; they stay importable from here.
from ustad.io import atomic_write

METRIC_NAMES = ("image_auroc", "pixel_auroc", "au_pro")


# The score sets of the paper: one per patch size and their plain average (paper §5).
SCALE_NAMES = ("p17", "p33", "p65", "multiscale")


@dataclasses.dataclass(frozen=True)
class Curves:
    """Curves of one score set, each `(x, y)` with `[K]` float64 arrays: PRO `(fprs, pros)`,
    pixel ROC `(fprs, tprs)` and image ROC `(fprs, tprs)`."""

    pro: tuple[np.ndarray, np.ndarray]
    pixel_roc: tuple[np.ndarray, np.ndarray]
    image_roc: tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Report:
    """What `write_category_report` computed and wrote.

    Attributes:
        metrics: `{score set: {metric name: value}}`.
        paths: every file written, in order.
    """

    metrics: dict[str, dict[str, float]]
    paths: list[Path]


def image_scores_from_maps(anomaly_maps, reduction: str = "max", top_k: int = 100) -> np.ndarray:
    """Image-level scores from the maps (the paper defines none): by default each map's maximum.

    Args:
        anomaly_maps: `[N, H, W]` anomaly scores.
        reduction: "max", "mean" or "topk" (the mean of the `top_k` highest pixels), as
            `ustad.detector.reduce_maps` (which this equals, in float64 on the host).
        top_k: pixels averaged by "topk" (≥ 1; clipped to H·W).

    Returns:
        `[N]` float64.
    """
    from ustad.detector import check_scoring_options

    check_scoring_options(reduction, top_k)
    maps = np.asarray(anomaly_maps)
    if maps.ndim != 3:
        raise ValueError(f"anomaly_maps must be [N, H, W], got shape {maps.shape}")
    flat = maps.reshape(len(maps), -1).astype(np.float64)
    if reduction == "max":
        return flat.max(axis=1)
    if reduction == "mean":
        return flat.mean(axis=1)
    k = min(int(top_k), flat.shape[1])
    return np.partition(flat, flat.shape[1] - k, axis=1)[:, flat.shape[1] - k :].mean(axis=1)


def _check_ground_truth(masks, labels) -> tuple[np.ndarray, np.ndarray]:
    masks = np.asarray(masks)
    labels = np.asarray(labels)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {masks.shape}")
    if labels.shape != (len(masks),):
        raise ValueError(f"labels must be [N] = [{len(masks)}], got shape {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (good) or 1 (defective)")
    masks = metrics._as_binary(masks, "masks", masks.shape)
    contradicting = np.flatnonzero(masks.reshape(len(masks), -1).any(axis=1) & (labels == 0))
    if contradicting.size:
        raise ValueError(f"images {contradicting.tolist()} have label 0 but a non-empty mask")
    return masks, labels.astype(np.int32)


def _evaluate_one(maps, masks, labels, image_scores, fpr_limit, with_curves):
    """`({metric: value}, Curves or None)` of one score set."""
    maps = np.asarray(maps)
    if maps.shape != masks.shape:
        raise ValueError(f"anomaly maps have shape {maps.shape}, masks {masks.shape}")
    image_scores = image_scores_from_maps(maps) if image_scores is None else image_scores
    au_pro, pro = metrics.au_pro(maps, masks, fpr_limit, return_curve=True)
    values = {
        "image_auroc": metrics.image_auroc(image_scores, labels),
        "pixel_auroc": metrics.pixel_auroc(maps, masks),
        "au_pro": au_pro,
    }
    if not with_curves:
        return values, None
    pixel_fprs, pixel_tprs, _ = metrics.roc_curve(maps, masks)
    image_fprs, image_tprs, _ = metrics.roc_curve(np.asarray(image_scores), labels)
    return values, Curves(pro, (pixel_fprs, pixel_tprs), (image_fprs, image_tprs))


def _evaluate_sets(score_maps, masks, labels, image_scores, fpr_limit, with_curves=True):
    if isinstance(score_maps, np.ndarray) or not isinstance(score_maps, Mapping):
        raise ValueError("score_maps must map score-set names (e.g. 'p65') to [N, H, W] maps")
    if not score_maps:
        raise ValueError("score_maps is empty")
    masks, labels = _check_ground_truth(masks, labels)
    image_scores = dict(image_scores or {})
    unknown = set(image_scores) - set(score_maps)
    if unknown:
        raise ValueError(f"image_scores has score sets {sorted(unknown)} not in score_maps")
    results, curves = {}, {}
    for name, maps in score_maps.items():
        try:
            results[name], curves[name] = _evaluate_one(
                maps, masks, labels, image_scores.get(name), fpr_limit, with_curves
            )
        except ValueError as error:
            raise ValueError(f"score set {name!r}: {error}") from error
    return results, curves


def evaluate_score_sets(
    score_maps: Mapping[str, Any],
    masks,
    labels,
    image_scores: Mapping[str, Any] | None = None,
    *,
    fpr_limit: float = 0.3,
) -> dict[str, dict[str, float]]:
    """Image AUROC, pixel AUROC and AU-PRO of one category for several named score sets.

    Args:
        score_maps: `{name: [N, H, W] anomaly maps}`, e.g. keys "p17", "p33", "p65",
            "multiscale"; the maps must have the masks' resolution.
        masks: `[N, H, W]` bool ground truth, True on defective pixels.
        labels: `[N]` int, 1 = defective, 0 = good.
        image_scores: optional `{name: [N] image scores}`; sets not given use each map's max.
        fpr_limit: AU-PRO integration limit.

    Returns:
        `{name: {"image_auroc": float, "pixel_auroc": float, "au_pro": float}}`.

    Raises:
        ValueError: inconsistent shapes or labels, or an undefined metric (e.g. no defective
            image); the message names the score set.
    """
    return _evaluate_sets(score_maps, masks, labels, image_scores, fpr_limit, False)[0]


def category_metrics(
    anomaly_maps, masks, labels, image_scores=None, *, fpr_limit: float = 0.3
) -> dict[str, float]:
    """`evaluate_score_sets` for a single score set.

    Args:
        anomaly_maps: `[N, H, W]` anomaly maps at the masks' resolution.
        masks: `[N, H, W]` bool ground truth, True on defective pixels.
        labels: `[N]` int, 1 = defective, 0 = good.
        image_scores: `[N]` image scores; default each map's max.
        fpr_limit: AU-PRO integration limit.

    Returns:
        `{"image_auroc": float, "pixel_auroc": float, "au_pro": float}`.
    """
    scores = None if image_scores is None else {"maps": image_scores}
    return evaluate_score_sets({"maps": anomaly_maps}, masks, labels, scores, fpr_limit=fpr_limit)[
        "maps"
    ]


def one_class_auroc(scores, test_classes, normal_class) -> float:
    """ROC-AUC of a one-class run: the test samples of `normal_class` are the normal ones.

    Args:
        scores: `[N]` anomaly scores of the whole test set.
        test_classes: `[N]` class of each test sample.
        normal_class: the class the model was trained on.
    """
    test_classes = np.asarray(test_classes)
    if test_classes.shape != np.shape(scores):
        raise ValueError(f"test_classes has shape {test_classes.shape}, scores {np.shape(scores)}")
    return metrics.image_auroc(scores, test_classes != normal_class)


# Why a metric can be undefined (NaN), for the error that refuses to write it.
UNDEFINED_METRICS = {
    "image_auroc": "image AUROC needs both good and defective test images (test/good/ and "
    "test/<defect type>/); this test set has only one kind",
}


def check_defined(rows: Sequence[dict], columns: Sequence[str]) -> None:
    """``ValueError`` when a metric of ``rows`` is NaN: a table of NaN is no result, and a
    command that wrote one would exit 0 (e.g. ``evaluate`` on a test set of good images)."""
    for row in rows:
        for column in columns:
            value = row.get(column)
            if isinstance(value, float) and np.isnan(value):
                why = UNDEFINED_METRICS.get(column, "the metric is undefined for this test set")
                label = ", ".join(str(row[c]) for c in ("category", "scale") if c in row)
                raise ValueError(f"{column} of {label or 'a row'} is NaN: {why}")


def write_table(rows: list[dict], columns: Sequence[str], out_dir, name, metadata) -> list[Path]:
    """`<name>.json` ({"columns", "rows", "metadata"}), `<name>.csv` and `<name>.md`.

    Raises:
      ValueError: a metric is NaN (:func:`check_defined`); nothing is written then.
    """
    check_defined(rows, columns)
    out_dir = Path(out_dir)
    document = {"columns": list(columns), "rows": rows, "metadata": dict(metadata or {})}
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)

    def cell(value):
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    markdown = [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows),
    ]
    return [
        atomic_write(out_dir / f"{name}.json", (json.dumps(document, indent=2) + "\n").encode()),
        atomic_write(out_dir / f"{name}.csv", text.getvalue().encode()),
        atomic_write(out_dir / f"{name}.md", ("\n".join(markdown) + "\n").encode()),
    ]


def metrics_rows(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[dict]:
    """Rows category × score set; with several categories, one "mean" row per score set (the
    mean over the categories that have that score set).

    Args:
        results: `{category: {score set: {metric: value}}}`.

    Returns:
        `[{"category", "scale", "image_auroc", "pixel_auroc", "au_pro"}]`.
    """
    rows = []
    for category, by_scale in results.items():
        for scale, values in by_scale.items():
            missing = set(METRIC_NAMES) - set(values)
            if missing:
                raise ValueError(f"results[{category!r}][{scale!r}] lacks {sorted(missing)}")
            row = {"category": category, "scale": scale}
            rows.append(row | {m: float(values[m]) for m in METRIC_NAMES})
    if len(results) > 1:
        scales = list(dict.fromkeys(row["scale"] for row in rows))
        for scale in scales:
            of_scale = [row for row in rows if row["scale"] == scale]
            rows.append(
                {"category": "mean", "scale": scale}
                | {m: float(np.mean([row[m] for row in of_scale])) for m in METRIC_NAMES}
            )
    return rows


def write_metrics_table(
    results: Mapping[str, Mapping[str, Mapping[str, float]]],
    out_dir,
    *,
    name: str = "metrics",
    metadata: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Writes the metrics table (rows category × score set) as JSON, CSV and Markdown.

    Args:
        results: `{category: {score set: {metric: value}}}` (see `evaluate_score_sets`).
        out_dir: folder for `<name>.json`, `<name>.csv`, `<name>.md`.
        name: file stem.
        metadata: JSON-serialisable facts stored in the JSON (e.g. method, fpr_limit).

    Returns:
        The three paths.
    """
    return write_table(
        metrics_rows(results), ("category", "scale", *METRIC_NAMES), out_dir, name, metadata
    )


def write_one_class_table(
    aurocs: Mapping[str, float],
    out_dir,
    *,
    name: str = "one_class",
    metadata: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Writes a one-class ROC-AUC table (one row per normal class, then "mean").

    Args:
        aurocs: `{class name: ROC-AUC}`.
        out_dir: folder for `<name>.json`, `<name>.csv`, `<name>.md`.
        name: file stem.
        metadata: JSON-serialisable facts stored in the JSON.

    Returns:
        The three paths.
    """
    if not aurocs:
        raise ValueError("aurocs is empty")
    rows = [{"class": str(c), "roc_auc": float(v)} for c, v in aurocs.items()]
    rows.append({"class": "mean", "roc_auc": float(np.mean([r["roc_auc"] for r in rows]))})
    return write_table(rows, ("class", "roc_auc"), out_dir, name, metadata)


def write_category_report(
    out_dir,
    category: str,
    score_maps: Mapping[str, Any],
    masks,
    labels,
    *,
    image_scores: Mapping[str, Any] | None = None,
    images=None,
    types: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    fpr_limit: float = 0.3,
    example_set: str | None = None,
    examples_per_type: int = 1,
    example_selection: str = "extremes",
    metadata: Mapping[str, Any] | None = None,
) -> Report:
    """Metrics table, PRO/ROC curves and example figures of one category, under `out_dir`.

    Writes `metrics.{json,csv,md}`, `pro_curves.png`, `roc_pixel.png`, `roc_image.png` and,
    when `images` and `types` are given, `examples/<index>_<name>.png` for the images chosen by
    `select_examples` from score set `example_set` (default: "multiscale" if present, else the
    last set).

    Args:
        out_dir: output folder (created).
        category: category name used in the table and titles.
        score_maps, masks, labels, image_scores, fpr_limit: as in `evaluate_score_sets`.
        images: `[N, H, W, C]` test images in [0, 1], for the example figures.
        types: `[N]` defect type per test image ("good" for anomaly-free ones).
        names: `[N]` names for titles and file names (default: "<type>_<index>").
        example_set: which score set the example figures show.
        examples_per_type, example_selection: passed to `select_examples`.
        metadata: JSON-serialisable facts stored in metrics.json.

    Returns:
        The metrics and every path written.
    """
    results, curves = _evaluate_sets(score_maps, masks, labels, image_scores, fpr_limit)
    # Examples are chosen and checked before the first file is written.
    if (images is None) != (types is None):
        raise ValueError("images and types must be given together (for the example figures)")
    if images is not None:
        shown = example_set or (
            "multiscale" if "multiscale" in score_maps else list(score_maps)[-1]
        )
        if shown not in score_maps:
            raise ValueError(f"example_set {shown!r} is not one of {list(score_maps)}")
        shown_maps = np.asarray(score_maps[shown])
        if np.shape(images)[:3] != shown_maps.shape or len(types) != len(shown_maps):
            raise ValueError(
                f"images {np.shape(images)} and types ({len(types)}) do not match the maps "
                f"{shown_maps.shape}"
            )
        scores = (image_scores or {}).get(shown)
        scores = image_scores_from_maps(shown_maps) if scores is None else np.asarray(scores)
        names = [f"{t}_{i}" for i, t in enumerate(types)] if names is None else names
        chosen = select_examples(types, scores, per_type=examples_per_type, how=example_selection)

    out_dir = Path(out_dir)
    meta = {"category": category, "fpr_limit": fpr_limit} | dict(metadata or {})
    paths = write_metrics_table({category: results}, out_dir, metadata=meta)
    for kind, file, what, pick in (
        ("pro", "pro_curves.png", "PRO", lambda c: c.pro),
        ("roc", "roc_pixel.png", "pixel ROC", lambda c: c.pixel_roc),
        ("roc", "roc_image.png", "image ROC", lambda c: c.image_roc),
    ):
        paths.append(
            plot_curves(
                {name: pick(c) for name, c in curves.items()},
                out_dir / file,
                kind=kind,
                fpr_limit=fpr_limit,
                title=f"{category}: {what}",
            )
        )
    if images is not None:
        paths += write_examples(
            images,
            masks,
            shown_maps,
            out_dir / "examples",
            chosen,
            names=names,
            image_scores=scores,
        )
    return Report(metrics=results, paths=paths)
