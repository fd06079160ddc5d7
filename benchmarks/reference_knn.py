"""The nearest-neighbour reference detector on MVTec-layout categories: one JSON line per
category and size (image AUROC, pixel AUROC, AU-PRO@0.3, seconds), the recipe stated in the line
(:mod:`ustad.evaluation.reference_knn`).

    python -m benchmarks.reference_knn --data_dir=../shared/data/mvtec_ad --categories=bottle \\
        --sizes=256,128 >> benchmarks/results/reference_knn_cpu.jsonl
    python -m benchmarks.reference_knn --data_dir=../shared/data/ball_screw \\
        --categories=ball_screw --sizes=256 --keep_aspect
    python -m benchmarks.reference_knn --data_dir=../shared/data/mvtec_ad --categories=bottle \\
        --train_subset=40 --subset_seed=0     # 40 of bottle's 209 training images

Same readers (:func:`ustad.data.load_mvtec_category`) and metrics
(:func:`ustad.evaluation.reports.category_metrics`) as the families' benchmarks.
"""

from __future__ import annotations

import time

from absl import app, flags

from benchmarks.common import device_name, emit
from ustad.data.mvtec import load_mvtec_category
from ustad.evaluation.reference_knn import RECIPE, ReferenceKNN
from ustad.evaluation.reports import category_metrics

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "folder holding <category>/ (MVTec layout)", required=True)
flags.DEFINE_list("categories", ["bottle"], "categories")
flags.DEFINE_list("sizes", ["256"], "image sizes (the short side with --keep_aspect)")
flags.DEFINE_bool("keep_aspect", False, "keep the images' aspect (short side = size, ×8)")
flags.DEFINE_integer("train_subset", 0, "use only this many training images (0 = all)")
flags.DEFINE_integer("subset_seed", 0, "NumPy seed of --train_subset's draw")


def main(argv):
    del argv
    import numpy as np

    for category in FLAGS.categories:
        for size in (int(s) for s in FLAGS.sizes):
            t0 = time.perf_counter()
            data = load_mvtec_category(
                FLAGS.data_dir, category, image_size=size, keep_aspect=FLAGS.keep_aspect,
                multiple=8,
            )  # fmt: skip
            train = data.train_images
            if FLAGS.train_subset:
                rng = np.random.default_rng(FLAGS.subset_seed)
                train = train[np.sort(rng.choice(len(train), FLAGS.train_subset, replace=False))]
            load_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            detector = ReferenceKNN().fit(train)
            fit_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            maps, scores = detector.score(data.test_images)
            score_s = time.perf_counter() - t0
            metrics = category_metrics(maps, data.test_masks, data.test_labels, scores)
            emit(
                {
                    "benchmark": "reference_knn",
                    "device": device_name(),
                    "category": category,
                    "image_size": list(train.shape[1:3]),
                    "keep_aspect": FLAGS.keep_aspect,
                    "train_images": len(train),
                    "train_subset_seed": FLAGS.subset_seed if FLAGS.train_subset else None,
                    "test_images": len(data.test_images),
                    "recipe": RECIPE,
                    **{k: round(float(v), 4) for k, v in metrics.items()},
                    "load_s": round(load_s, 1),
                    "fit_s": round(fit_s, 1),
                    "score_s": round(score_s, 1),
                    "end_to_end_s": round(load_s + fit_s + score_s, 1),
                }
            )


if __name__ == "__main__":
    app.run(main)
