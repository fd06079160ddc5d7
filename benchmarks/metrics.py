"""Time AU-PRO and pixel AUROC on an MVTec-sized test set (default 150 maps of 256x256).

Masks are random ellipses covering a few % of ~70% of the images (like MVTec AD test sets);
maps are smoothed noise with a raised, blurred bump over each defect. Prints one JSON line: the
device, sizes, median seconds of `ustad.evaluation.metrics.au_pro` and `pixel_auroc`, and, measured
in the
same run, the time of the official MVTec algorithm (argsort of all pixels, then cumulative sums)
and of scikit-learn's `roc_auc_score`, with the largest difference to ustad's values.

    python benchmarks/metrics.py
    python benchmarks/metrics.py --num_images 30 --size 128 --noreference
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags
from scipy import ndimage

from benchmarks.common import device_name, emit, time_fn
from ustad.evaluation import metrics

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_images", 150, "test maps")
flags.DEFINE_integer("size", 256, "map height and width")
flags.DEFINE_float("defective_fraction", 0.7, "fraction of maps with a defect")
flags.DEFINE_integer("repeats", 5, "timed repeats after one warm-up (median reported)")
flags.DEFINE_bool("reference", True, "also time the official algorithm and scikit-learn")
flags.DEFINE_integer("seed", 0, "random seed")

# 8-connected within a map, never across maps.
STRUCTURE = np.zeros((3, 3, 3), bool)
STRUCTURE[1] = True


def make_test_set(num_images: int, size: int, defective_fraction: float, seed: int):
    """`[N, S, S]` float32 maps and bool masks (1-3 ellipses per defective image)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    masks = np.zeros((num_images, size, size), bool)
    for i in range(round(num_images * defective_fraction)):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0.1, 0.9, 2) * size
            ry, rx = rng.uniform(0.02, 0.12, 2) * size
            angle = rng.uniform(0, np.pi)
            u = (rows - cy) * np.cos(angle) + (cols - cx) * np.sin(angle)
            v = -(rows - cy) * np.sin(angle) + (cols - cx) * np.cos(angle)
            masks[i] |= (u / ry) ** 2 + (v / rx) ** 2 <= 1
    noise = ndimage.gaussian_filter(rng.normal(size=masks.shape), (0, 3, 3))
    bump = ndimage.gaussian_filter(masks.astype(np.float64), (0, 4, 4))
    maps = (noise / noise.std() + 2.0 * bump).astype(np.float32)
    return maps, masks


def official_au_pro(maps, masks, fpr_limit=0.3):
    """The official algorithm: per-pixel FPR/PRO increments, argsort, cumsum, collapse ties."""
    labeled, num_regions = ndimage.label(masks, structure=STRUCTURE)
    sizes = np.bincount(labeled.ravel())
    pro_change = np.where(labeled > 0, 1.0 / sizes[labeled], 0.0).ravel() / num_regions
    fp_change = (~masks).ravel().astype(np.int64)
    order = np.argsort(maps.ravel())[::-1]
    scores = maps.ravel()[order]
    fprs = np.cumsum(fp_change[order]) / fp_change.sum()
    pros = np.cumsum(pro_change[order])
    keep = np.append(scores[1:] != scores[:-1], True)
    fprs = np.concatenate([[0.0], fprs[keep]])
    pros = np.concatenate([[0.0], np.minimum(pros[keep], 1.0)])
    return metrics.area_to_limit(fprs, pros, fpr_limit) / fpr_limit


def main(argv):
    del argv
    maps, masks = make_test_set(FLAGS.num_images, FLAGS.size, FLAGS.defective_fraction, FLAGS.seed)
    defective = masks.reshape(len(masks), -1).any(axis=1)
    record = {
        "benchmark": "metrics",
        "device": device_name(),
        "maps": list(maps.shape),
        "dtype": str(maps.dtype),
        "defective_images": int(defective.sum()),
        "regions": int(ndimage.label(masks, STRUCTURE)[1]),
        "anomalous_pixel_fraction_of_defective_images": round(float(masks[defective].mean()), 4),
        "repeats": FLAGS.repeats,
    }
    record["au_pro"] = metrics.au_pro(maps, masks)
    record["pixel_auroc"] = metrics.pixel_auroc(maps, masks)
    record["au_pro_median_s"] = round(
        time_fn(metrics.au_pro, maps, masks, repeats=FLAGS.repeats), 4
    )
    record["pixel_auroc_median_s"] = round(
        time_fn(metrics.pixel_auroc, maps, masks, repeats=FLAGS.repeats), 4
    )
    if FLAGS.reference:
        from sklearn.metrics import roc_auc_score

        reference = official_au_pro(maps, masks)
        record["official_algorithm_au_pro_median_s"] = round(
            time_fn(official_au_pro, maps, masks, warmup=0, repeats=3), 4
        )
        record["au_pro_speedup"] = round(
            record["official_algorithm_au_pro_median_s"] / record["au_pro_median_s"], 2
        )
        record["au_pro_abs_diff_to_official_algorithm"] = abs(reference - record["au_pro"])
        start = time.perf_counter()
        sklearn_auroc = roc_auc_score(masks.ravel(), maps.ravel())
        record["sklearn_pixel_auroc_s"] = round(time.perf_counter() - start, 4)
        record["pixel_auroc_speedup"] = round(
            record["sklearn_pixel_auroc_s"] / record["pixel_auroc_median_s"], 2
        )
        record["pixel_auroc_abs_diff_to_sklearn"] = abs(sklearn_auroc - record["pixel_auroc"])
    emit(record)


if __name__ == "__main__":
    app.run(main)
