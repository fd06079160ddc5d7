"""Evaluation figures on plain arrays: PRO/ROC curves and per-image anomaly-map panels.

Figures are drawn on bare ``matplotlib.figure.Figure`` objects (rendered by Agg, no pyplot and
no global state) and written as PNG atomically (to a temporary file in the same folder, then
renamed). The reports that call these live in :mod:`ustad.evaluation.reports`.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ustad.evaluation import metrics
from ustad.io import atomic_write

__all__ = ["plot_curves", "select_examples", "write_examples"]


_PLOT_POINTS = 4000


def _thin(x: np.ndarray, y: np.ndarray, max_points: int = _PLOT_POINTS):
    """At most `max_points` points spread evenly along the curve's length (steps kept visible;
    an exact curve over ~10M pixels would only slow the renderer down)."""
    if x.size <= max_points:
        return x, y
    length = np.concatenate([[0.0], np.cumsum(np.abs(np.diff(x)) + np.abs(np.diff(y)))])
    keep = np.unique(np.searchsorted(length, np.linspace(0.0, length[-1], max_points)))
    return x[np.minimum(keep, x.size - 1)], y[np.minimum(keep, x.size - 1)]


def _save_figure(figure: Figure, path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return atomic_write(Path(path), buffer.getvalue())


def plot_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path,
    *,
    kind: str,
    fpr_limit: float = 0.3,
    title: str = "",
) -> Path:
    """One PNG with several PRO or ROC curves; the legend gives each curve's area.

    Args:
        curves: `{label: (fprs [K], ys [K])}` as returned by `metrics.pro_curve` or
            `metrics.roc_curve`.
        path: the PNG to write.
        kind: "pro" (area normalised up to `fpr_limit`, which is marked) or "roc".
        fpr_limit: AU-PRO integration limit.
        title: figure title.
    """
    if kind not in ("pro", "roc"):
        raise ValueError(f"kind must be 'pro' or 'roc', got {kind!r}")
    figure = Figure(figsize=(5, 4.2))
    axes = figure.subplots()
    for label, (x, y) in curves.items():
        if kind == "pro":
            area = metrics.area_to_limit(x, y, fpr_limit) / fpr_limit
            text = f"{label} (AU-PRO@{fpr_limit:g} {area:.3f})"
        else:
            text = f"{label} (AUROC {metrics.area_to_limit(x, y, 1.0):.3f})"
        axes.plot(*_thin(np.asarray(x), np.asarray(y)), label=text, linewidth=1.2)
    if kind == "pro":
        axes.axvspan(0, fpr_limit, color="0.92", zorder=0)
        axes.axvline(fpr_limit, color="0.5", linestyle="--", linewidth=0.8)
    else:
        axes.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=0.8)
    axes.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate")
    axes.set_ylabel("per-region overlap" if kind == "pro" else "true positive rate")
    axes.set_title(title, fontsize=10)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return _save_figure(figure, path)


def select_examples(
    types: Sequence[str], image_scores, *, per_type: int = 1, how: str = "extremes"
) -> list[int]:
    """Indices of test images to draw, per defect type.

    Args:
        types: `[N]` defect type of each test image ("good" for anomaly-free ones).
        image_scores: `[N]` image scores.
        per_type: images per type.
        how: "first" (the first `per_type` of each type) or "extremes" (the hardest first, then
            the easiest, alternating: ⌈per_type/2⌉ of the lowest-scored defective images and
            ⌊per_type/2⌋ of the highest, the reverse for "good"; one image a type is its
            hardest: the least anomalous-looking defect, the most anomalous-looking good one).

    Returns:
        Sorted distinct indices.
    """
    scores = np.asarray(image_scores, dtype=np.float64)
    if scores.shape != (len(types),):
        raise ValueError(f"image_scores has shape {scores.shape}, expected ({len(types)},)")
    if how not in ("first", "extremes"):
        raise ValueError(f"how must be 'first' or 'extremes', got {how!r}")
    chosen: set[int] = set()
    for kind in dict.fromkeys(types):
        members = np.flatnonzero(np.asarray(types) == kind)
        if how == "first":
            chosen.update(members[:per_type].tolist())
            continue
        ranked = members[np.argsort(scores[members], kind="stable")]
        hard, easy = (ranked[::-1], ranked) if kind == "good" else (ranked, ranked[::-1])
        count = min(per_type, len(members))
        picked = list(hard[: -(-count // 2)]) + list(easy[: count // 2])
        chosen.update(int(i) for i in picked)
    return sorted(chosen)


def _map_maxima(maps: np.ndarray) -> np.ndarray:
    """`[N]` maximum of each of the `[N, H, W]` maps, in their dtype: the default image score
    (`ustad.evaluation.reports.image_scores_from_maps`, which cannot be imported here: evaluate
    imports this module)."""
    return maps.reshape(len(maps), -1).max(axis=1)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "image"


def write_examples(
    images,
    masks,
    anomaly_maps,
    out_dir,
    indices: Sequence[int],
    *,
    names: Sequence[str] | None = None,
    image_scores=None,
    value_range: tuple[float, float] | None = None,
) -> list[Path]:
    """One PNG per chosen test image: image | ground truth | anomaly map over the image.

    Args:
        images: `[N, H, W, C]` (C = 1 or 3) or `[N, H, W]` float in [0, 1].
        masks: `[N, H, W]` bool ground truth.
        anomaly_maps: `[N, H, W]` anomaly scores.
        out_dir: folder for the PNGs.
        indices: which images to draw.
        names: `[N]` labels used in titles and file names (default: the index).
        image_scores: `[N]` shown in the title (default: each map's max).
        value_range: colour range of the heat map, the same for every figure so a colour
            means the same score throughout. Default: from the minimum over all N maps to the
            90th percentile of the per-map maxima (one extreme map would otherwise wash all
            the others out; the hottest ~10% of maps saturate instead).

    Returns:
        The PNG paths, in the order of `indices`.
    """
    images, masks, maps = np.asarray(images), np.asarray(masks), np.asarray(anomaly_maps)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if maps.ndim != 3 or masks.shape != maps.shape or images.shape[:3] != maps.shape:
        raise ValueError(
            f"images {images.shape}, masks {masks.shape} and anomaly_maps {maps.shape} must "
            "share [N, H, W]"
        )
    if np.any((np.asarray(indices) < 0) | (np.asarray(indices) >= len(maps))):
        raise ValueError(f"indices must lie in [0, {len(maps)}), got {list(indices)}")
    names = [str(i) for i in range(len(maps))] if names is None else list(names)
    scores = _map_maxima(maps) if image_scores is None else np.asarray(image_scores)
    if value_range is None:
        value_range = (float(maps.min()), float(np.percentile(_map_maxima(maps), 90)))
    low, high = value_range
    paths = []
    for i in indices:
        figure = Figure(figsize=(9.6, 3.4))
        panels = figure.subplots(1, 3)
        gray = "gray" if images.ndim == 3 else None
        image = np.clip(images[i], 0.0, 1.0)
        panels[0].imshow(image, cmap=gray, vmin=0, vmax=1)
        panels[0].set_title(names[i], fontsize=9)
        panels[1].imshow(masks[i], cmap="gray", vmin=0, vmax=1)
        panels[1].set_title("ground truth", fontsize=9)
        panels[2].imshow(image, cmap=gray, vmin=0, vmax=1)
        heat = panels[2].imshow(maps[i], cmap="jet", alpha=0.5, vmin=low, vmax=high)
        if masks[i].any():
            panels[2].contour(masks[i], levels=[0.5], colors="white", linewidths=0.8)
        panels[2].set_title(f"anomaly map (image score {float(scores[i]):.3g})", fontsize=9)
        figure.colorbar(heat, ax=panels[2], fraction=0.046, pad=0.04)
        for panel in panels:
            panel.set_axis_off()
        figure.tight_layout()
        paths.append(_save_figure(figure, Path(out_dir) / f"{i:04d}_{_safe_name(names[i])}.png"))
    return paths
