"""Scoring options on a labelled category: Gaussian smoothing σ × image score (max or top-k mean).

Scores the test set once with the given trained students (each scale and, with several, their
multi-scale average; no options), then for every σ smooths those maps exactly as
``Detector(smooth_sigma=σ)`` does (:func:`ustad.detector.smooth_maps` on the final map; the
equality is tested in tests/test_scoring_options.py) and evaluates AU-PRO@0.3 and pixel AUROC
(:mod:`ustad.evaluation.metrics`), and for every image score
(:func:`ustad.evaluation.reports.image_scores_from_maps`:
the max, or the mean of the k highest pixels) the image AUROC. One JSON line per
(score set, σ, image score), appended to ``--out``; then the Markdown table of the lines written.

    python -m benchmarks.scoring_options --workdirs runs/convergence/p33_256 \\
        --mvtec_dir ../shared/data/mvtec_ad --category bottle \\
        --out benchmarks/results/scoring_options_cpu.jsonl
    python -m benchmarks.scoring_options --table benchmarks/results/scoring_options_cpu.jsonl

The images are scored at the students' training size (the workdir's), as ``ustad evaluate``
does. Neither option is in the paper; the defaults (σ = 0, max) are the paper's maps.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import ustad  # noqa: E402,F401  (fast CPU flags before JAX starts)

FLAGS = flags.FLAGS
flags.DEFINE_list("workdirs", None, "trained students workdir(s); their scales are averaged")
flags.DEFINE_string("mvtec_dir", "../shared/data/mvtec_ad", "MVTec AD root")
flags.DEFINE_string("category", "bottle", "category")
flags.DEFINE_list("sigmas", ["0", "2", "4", "8"], "smoothing σ in pixels (0: none)")
flags.DEFINE_list("top_ks", ["10", "100", "1000"], "k of the top-k mean image scores")
flags.DEFINE_float("fpr_limit", 0.3, "AU-PRO integration limit")
flags.DEFINE_integer("batch_size", 8, "images per scoring call")
flags.DEFINE_string("label", "", "a name for the students in the lines (default: the workdirs)")
flags.DEFINE_string("out", "", "JSON-lines file to append to (default: stdout only)")
flags.DEFINE_string("table", "", "only print the Markdown table of this JSON-lines file")


def image_score_settings(top_ks) -> list[tuple[str, int | None]]:
    return [("max", None)] + [("topk", int(k)) for k in top_ks]


def evaluate_options(maps, masks, labels, sigmas, top_ks, fpr_limit=0.3) -> list[dict]:
    """Metrics of one score set for every σ and image score.

    Args:
        maps: ``[N, H, W]`` maps without options (σ = 0).
        masks: ``[N, H, W]`` bool; labels: ``[N]`` 1 = defective.
        sigmas: smoothing σ's in pixels; top_ks: the k's of the top-k image scores.

    Returns:
        ``[{"sigma", "image_score", "top_k", "au_pro", "pixel_auroc", "image_auroc",
        "metrics_s"}]``.
    """
    from ustad.detector import smooth_maps
    from ustad.evaluation import metrics
    from ustad.evaluation.reports import image_scores_from_maps

    rows = []
    for sigma in sigmas:
        start = time.perf_counter()
        smoothed = smooth_maps(maps, sigma)
        pixel = {
            "au_pro": float(metrics.au_pro(smoothed, masks, fpr_limit)),
            "pixel_auroc": float(metrics.pixel_auroc(smoothed, masks)),
        }
        for reduction, k in image_score_settings(top_ks):
            scores = image_scores_from_maps(smoothed, reduction, k or 1)
            rows.append(
                {
                    "sigma": float(sigma),
                    "image_score": "max" if k is None else f"top{k} mean",
                    "top_k": k,
                    **pixel,
                    "image_auroc": float(metrics.image_auroc(scores, labels)),
                }
            )
        for row in rows[-len(top_ks) - 1 :]:
            row["metrics_s"] = round(time.perf_counter() - start, 2)
    return rows


def markdown_table(records: list[dict]) -> str:
    """Rows (students, score set) × σ, columns AU-PRO, pixel AUROC and the image AUROCs."""
    groups: dict[tuple, dict[float, list[dict]]] = {}
    for r in records:
        groups.setdefault((r["students"], r["scores"]), {}).setdefault(r["sigma"], []).append(r)
    names = list(dict.fromkeys(r["image_score"] for r in records))
    header = ["students", "scores", "σ (px)", "AU-PRO@0.3", "pixel AUROC"]
    header += [f"image AUROC ({n})" for n in names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (students, scores), by_sigma in groups.items():
        for sigma, rows in by_sigma.items():
            by_name = {r["image_score"]: r for r in rows}
            cells = [students, scores, f"{sigma:g}", f"{rows[0]['au_pro']:.3f}"]
            cells.append(f"{rows[0]['pixel_auroc']:.3f}")
            cells += [f"{by_name[n]['image_auroc']:.3f}" if n in by_name else "–" for n in names]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv):
    del argv
    if FLAGS.table:
        with open(FLAGS.table) as f:
            print(markdown_table([json.loads(line) for line in f if line.strip()]))
        return
    if not FLAGS.workdirs:
        raise app.UsageError("--workdirs is required (or --table)")
    from benchmarks.common import device_name
    from ustad.data.mvtec import category_folder, load_mvtec_test
    from ustad.uninformed_students.checkpoints import find_scale_dirs, load_scale
    from ustad.uninformed_students.score import score_sets

    sigmas = [float(s) for s in FLAGS.sigmas]
    scales = [load_scale(d) for w in FLAGS.workdirs for d in find_scale_dirs(w)]
    size = list(scales[0].image_size)
    test = load_mvtec_test(category_folder(FLAGS.mvtec_dir, FLAGS.category), image_size=size)
    if test.masks is None:
        raise ValueError(f"{FLAGS.category} has no ground_truth/: pixel metrics need masks")
    start = time.perf_counter()
    score_maps, _ = score_sets(scales, test.images, batch_size=FLAGS.batch_size)
    scoring_s = time.perf_counter() - start
    common = {
        "benchmark": "scoring_options",
        "device": device_name(),
        "students": FLAGS.label or ",".join(FLAGS.workdirs),
        "workdirs": FLAGS.workdirs,
        "category": FLAGS.category,
        "image_size": size,
        "patch_sizes": [s.patch_size for s in scales],
        "test_images": len(test.images),
        "fpr_limit": FLAGS.fpr_limit,
        "scoring_s": round(scoring_s, 1),
    }
    records = []
    for name, maps in score_maps.items():
        for row in evaluate_options(
            maps, test.masks, test.labels, sigmas, FLAGS.top_ks, FLAGS.fpr_limit
        ):
            records.append({**common, "scores": name, **row})
            line = json.dumps(records[-1])
            print(line, flush=True)
            if FLAGS.out:
                with open(FLAGS.out, "a") as f:
                    f.write(line + "\n")
    print(markdown_table(records))


if __name__ == "__main__":
    app.run(main)
