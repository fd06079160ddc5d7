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
flags.DEFINE_bool(
    "native_size", False,
    "metrics at the test images' own size (masks read there, maps resized bilinearly to it), "
    "as `ustad evaluate --native_size` measures the families",
)  # fmt: skip


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
            masks = data.test_masks
            if FLAGS.native_size:
                maps, masks = native_maps_and_masks(FLAGS.data_dir, category, maps)
            metrics = category_metrics(maps, masks, data.test_labels, scores)
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
                    "evaluated_at": list(masks.shape[1:3]),
                    "recipe": RECIPE,
                    **{k: round(float(v), 4) for k, v in metrics.items()},
                    "load_s": round(load_s, 1),
                    "fit_s": round(fit_s, 1),
                    "score_s": round(score_s, 1),
                    "end_to_end_s": round(load_s + fit_s + score_s, 1),
                }
            )


def native_maps_and_masks(data_dir, category, maps):
    """``(maps, masks)`` at the test images' most common native size: the masks read there (only
    the masks: the images are not decoded again), the maps resized bilinearly to it."""
    import jax
    import numpy as np

    from ustad.data.images import read_image_size
    from ustad.data.mvtec import category_folder, index_test, read_test_mask

    entries = index_test(category_folder(data_dir, category))
    sizes = [read_image_size(entry.image_path) for entry in entries]
    if len(set(sizes)) != 1:
        raise ValueError(
            f"--native_size: the test images of {category} differ in size {set(sizes)}"
        )
    hw = sizes[0]
    masks = np.stack([read_test_mask(entry, hw) for entry in entries])
    resized = np.stack(
        [np.asarray(jax.image.resize(m, hw, "bilinear"), np.float32) for m in np.asarray(maps)]
    )
    return resized, masks


if __name__ == "__main__":
    app.run(main)
