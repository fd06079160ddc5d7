"""The report of one labelled test set, whatever scored it: the full report when the test set
has masks, its image-level part when it has none, and the short summary table the commands
print."""

from __future__ import annotations

from pathlib import Path


def write_report(out_dir, category: str, test, score_maps, image_scores, **kwargs):
    """The full report of a test set (:func:`ustad.evaluation.reports.write_category_report`), or
    its image-level part when the test set has no masks
    (:func:`ustad.evaluation.image_report.write_image_report`).

    Args:
      out_dir: report folder.
      category: name in titles and tables.
      test: a :class:`ustad.data.MVTecTestSet`.
      score_maps, image_scores: ``{name: [N, H, W]}``, ``{name: [N]}`` (e.g. from
        :func:`ustad.families.score_sets`).
      **kwargs: ``examples_per_type`` (full report only) and ``metadata``.
    """
    if test.masks is None:
        from ustad.evaluation.image_report import write_image_report

        return write_image_report(
            out_dir,
            category,
            image_scores,
            test.labels,
            test.types,
            metadata=kwargs.get("metadata"),
        )
    from ustad.evaluation.reports import write_category_report

    return write_category_report(
        out_dir,
        category,
        score_maps,
        test.masks,
        test.labels,
        image_scores=image_scores,
        images=test.images,
        types=test.types,
        names=[f"{t}_{Path(path).stem}" for t, path in zip(test.types, test.paths, strict=True)],
        **kwargs,
    )


def format_summary(summary: dict) -> str:
    """A short Markdown table of ``{score set: metrics}`` (e.g. a report's metrics)."""
    lines = ["| scores | image AUROC | pixel AUROC | AU-PRO@0.3 |", "|---|---|---|---|"]
    for name, row in summary.items():
        if isinstance(row, dict) and "image_auroc" in row:
            cells = [
                f"{row[k]:.3f}" if k in row else "(needs masks)"
                for k in ("image_auroc", "pixel_auroc", "au_pro")
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
