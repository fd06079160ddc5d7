"""``report/index.html``: a static page of an evaluation that opens in a browser with no server.

One self-contained HTML file (inline CSS and script, no network) beside a ``thumbs/`` folder: the
metrics, the operating point (:mod:`ustad.evaluation.operating_point`), the curves the report
already drew (linked relatively), and every test image as a thumbnail (image | map over it with
the threshold's contour | colour bar) with its score, normalised score, decision, ground truth
and outcome. The table starts with the misses and false alarms, then by score, highest first;
clicking a column header sorts by it. When the page has loaded, ``<body data-images-loaded>``
counts the images the browser decoded (the headless-Chromium test reads it).
"""

from __future__ import annotations

import html
import json
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ustad.data.images import encode_png
from ustad.io import atomic_write
from ustad.overlays import overlay_panel

# The figures of ustad.evaluation.reports / image_report shown when present.
FIGURES = ("pro_curves.png", "roc_image.png", "roc_pixel.png", "score_histograms.png")

_STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:middle}
th[data-key]{cursor:pointer;background:#eef}
tr.miss td,tr.false_alarm td{background:#fde8e8}
img.thumb{max-height:110px}
.figures img{max-width:32%;margin-right:1%}
.note{color:#666;font-size:90%}
"""

_SCRIPT = """
function sortBy(key, numeric) {
  const body = document.getElementById('images');
  const rows = Array.from(body.rows);
  const th = document.querySelector('th[data-key="' + key + '"]');
  const descending = th.dataset.order !== 'desc';
  th.dataset.order = descending ? 'desc' : 'asc';
  rows.sort((a, b) => {
    let x = a.dataset[key], y = b.dataset[key];
    if (numeric) { x = parseFloat(x); y = parseFloat(y); }
    const c = x < y ? -1 : x > y ? 1 : 0;
    return descending ? -c : c;
  });
  rows.forEach(r => body.appendChild(r));
}
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  document.body.dataset.imagesLoaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.imagesTotal = images.length;
});
"""


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _outcome(label: int, decision: bool | None) -> str:
    if decision is None:
        return "no threshold"
    if label and not decision:
        return "miss"
    if decision and not label:
        return "false_alarm"
    return "correct"


def _table(rows: dict) -> str:
    """A two-column table of ``{name: value}``."""
    cells = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in rows.items()
    )
    return f"<table>{cells}</table>"


def _image_rows(names, types, labels, scores, decisions, normalized, thumbs) -> list[str]:
    """The ``<tr>`` of every image: misses and false alarms first, then by score."""
    order = sorted(
        range(len(names)),
        key=lambda i: (
            _outcome(labels[i], decisions[i]) not in ("miss", "false_alarm"),
            -scores[i],
        ),
    )
    lines = []
    for i in order:
        outcome = _outcome(labels[i], decisions[i])
        decision = "—" if decisions[i] is None else ("anomalous" if decisions[i] else "good")
        truth = "defect: " + types[i] if labels[i] else "good"
        norm = "" if normalized is None else f"{normalized[i]:.3f}"
        lines.append(
            f'<tr class="{outcome}" data-name="{html.escape(names[i])}" '
            f'data-score="{scores[i]:.9g}" data-outcome="{outcome}">'
            f'<td><img class="thumb" src="{html.escape(thumbs[i])}" '
            f'alt="{html.escape(names[i])}"></td>'
            f"<td>{html.escape(names[i])}</td><td>{scores[i]:.5g}</td><td>{norm}</td>"
            f"<td>{decision}</td><td>{html.escape(truth)}</td><td>{outcome.replace('_', ' ')}</td>"
            "</tr>"
        )
    return lines


def write_html_report(
    out_dir,
    title: str,
    images: np.ndarray,
    maps: np.ndarray,
    scores: np.ndarray,
    labels: Sequence[int],
    types: Sequence[str],
    names: Sequence[str],
    *,
    calibration=None,
    metrics: dict | None = None,
    operating_point: dict | None = None,
) -> Path:
    """Write ``<out_dir>/index.html`` and ``<out_dir>/thumbs/*.png``.

    Args:
      out_dir: the folder (e.g. ``<evaluate --out>/report``); figures in its parent are linked.
      title: the page title (e.g. the category).
      images: ``[N, H, W, C]`` float32 in [0, 1] test images; maps: ``[N, H, W]`` their maps.
      scores: ``[N]`` image scores; labels: ``[N]`` 1 = defective; types: defect types.
      names: a unique file-name-safe name per image.
      calibration: a :class:`ustad.calibration.Calibration` (decisions, colour scale).
      metrics: ``{score set: {metric: value}}`` (AUROC, AU-PRO).
      operating_point: :func:`ustad.evaluation.operating_point.operating_point_metrics`.

    Returns:
      The path of ``index.html``.
    """
    out_dir = Path(out_dir)
    scores = np.asarray(scores, np.float64)
    labels = [int(x) for x in labels]
    decisions, normalized, masks, scale, pixel_threshold = (
        [None] * len(scores),
        None,
        None,
        None,
        None,
    )
    if calibration is not None:
        decisions = [bool(s > calibration.image_threshold) for s in scores]
        normalized = calibration.normalize(scores)
        masks = np.asarray(maps) > calibration.pixel_threshold
        pixel_threshold = calibration.pixel_threshold
        scale = calibration.colour_scale() if calibration.count else None
    if scale is None:
        scale = (float(np.percentile(maps, 1)), float(np.percentile(maps, 99.9)))
    thumbs = []
    for i, name in enumerate(names):
        mask = None if masks is None else masks[i]
        panel = overlay_panel(images[i], maps[i], *scale, mask, pixel_threshold)
        atomic_write(out_dir / "thumbs" / f"{name}.png", encode_png(panel))
        thumbs.append("thumbs/" + urllib.parse.quote(f"{name}.png"))
    rows = _image_rows(names, types, labels, scores, decisions, normalized, thumbs)
    page = _page(title, out_dir, metrics, operating_point, calibration, rows)
    return atomic_write(out_dir / "index.html", page.encode())


def _page(title, out_dir, metrics, operating_point, calibration, rows) -> str:
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>ustad: {html.escape(title)}"
        f"</title><style>{_STYLE}</style></head><body>",
        f"<h1>ustad evaluation: {html.escape(title)}</h1>",
    ]
    for name, values in (metrics or {}).items():
        if isinstance(values, dict):
            parts += [f"<h2>Threshold-free metrics: {html.escape(name)}</h2>", _table(values)]
    calibrated = (operating_point or {}).get("calibrated")
    if calibrated:
        parts += [
            "<h2>At the calibrated threshold (set from good images only)</h2>",
            _table(calibrated),
        ]
    else:
        parts.append(
            "<p class='note'>No calibration for these workdirs and options: no decisions "
            "(run <code>ustad calibrate --good &lt;folder&gt;</code>).</p>"
        )
    oracle = (operating_point or {}).get("f1_max_oracle")
    if oracle:
        parts += [
            "<h2>F1-max oracle (uses the test labels; for comparison only)</h2>",
            _table(oracle),
        ]
    if calibration is not None:
        parts.append(f"<p class='note'>Calibration: {html.escape(calibration.source)}</p>")
    figures = [f for f in FIGURES if (out_dir.parent / f).is_file()]
    if figures:
        parts.append("<h2>Curves</h2><div class='figures'>")
        parts += [f"<img src='../{f}' alt='{f}'>" for f in figures]
        parts.append("</div>")
    headers = (
        "<tr><th>image</th><th data-key='name' onclick=\"sortBy('name', false)\">name</th>"
        "<th data-key='score' onclick=\"sortBy('score', true)\">score ⇅</th>"
        "<th>normalised</th><th>decision</th><th>ground truth</th>"
        "<th data-key='outcome' onclick=\"sortBy('outcome', false)\">outcome</th></tr>"
    )
    parts += [
        f"<h2>Test images ({len(rows)}): misses and false alarms first</h2>",
        f"<table><thead>{headers}</thead><tbody id='images'>",
        *rows,
        "</tbody></table>",
        f"<script>{_SCRIPT}</script>",
        f"<script type='application/json' id='data'>{html.escape(json.dumps(operating_point))}"
        "</script></body></html>",
    ]
    return "\n".join(parts)
