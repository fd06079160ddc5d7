"""A stand-in baseline on one MVTec AD category, evaluated and reported with
ustad.evaluation.reports.

Two score sets, both per pixel against the training images (blurred, then compared):
- "l2_to_mean": Euclidean distance over channels to the mean training image;
- "z_to_mean": the same after dividing each pixel and channel by the training standard
  deviation (so pixels that vary a lot between good images count less).
Each map is blurred once more so single noisy pixels do not dominate. This is not the paper's
method; it shows what the evaluation pipeline reports for a method with no learning at all.

    python benchmarks/baseline_mvtec.py --data_dir ../shared/data/mvtec_ad --category bottle \\
        --out /tmp/baseline_bottle

Writes the metrics table (JSON/CSV/Markdown), PRO and ROC curves and per-image figures under
`--out`, and prints one JSON line with the metrics.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from absl import app, flags
from PIL import Image
from scipy import ndimage

from benchmarks.common import emit
from ustad.evaluation import reports as evaluate

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "folder holding <category>/train, test, ground_truth")
flags.DEFINE_string("category", "bottle", "category folder name")
flags.DEFINE_string("out", None, "output folder for the report")
flags.DEFINE_integer("image_size", 256, "images and masks are resized to this square size")
flags.DEFINE_float("image_blur", 2.0, "Gaussian sigma (pixels) applied to images first")
flags.DEFINE_float("map_blur", 4.0, "Gaussian sigma (pixels) applied to the anomaly maps")
flags.DEFINE_integer("examples_per_type", 1, "example figures per defect type and end")
flags.DEFINE_enum("examples", "extremes", ["extremes", "first"], "which examples to draw")
flags.mark_flags_as_required(["data_dir", "out"])

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def _read_local(root, category: str, image_size: int):
    """Minimal reader of the MVTec AD layout, used only when `ustad.data.mvtec` is missing.

    Returns an object with the fields of `ustad.data.mvtec.MVTecCategory`.
    """
    category_dir = Path(root) / category
    size = (image_size, image_size)

    def files(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)

    def image(path: Path) -> np.ndarray:
        with Image.open(path) as f:
            rgb = f.convert("RGB").resize(size, Image.BILINEAR)
        return np.asarray(rgb, np.float32) / 255.0

    def mask(path: Path) -> np.ndarray:
        with Image.open(path) as f:
            return np.asarray(f.convert("L").resize(size, Image.NEAREST)) > 0

    train_paths = files(category_dir / "train" / "good")
    if not train_paths:
        raise ValueError(f"no training images in {category_dir / 'train' / 'good'}")
    test_paths, test_types, test_masks = [], [], []
    for type_dir in sorted(p for p in (category_dir / "test").iterdir() if p.is_dir()):
        for path in files(type_dir):
            test_paths.append(path)
            test_types.append(type_dir.name)
            if type_dir.name == "good":
                test_masks.append(np.zeros(size, bool))
                continue
            mask_path = category_dir / "ground_truth" / type_dir.name / f"{path.stem}_mask.png"
            if not mask_path.is_file():
                raise FileNotFoundError(f"no mask {mask_path} for defective image {path}")
            test_masks.append(mask(mask_path))
    return SimpleNamespace(
        train_images=np.stack([image(p) for p in train_paths]),
        train_paths=[str(p) for p in train_paths],
        test_images=np.stack([image(p) for p in test_paths]),
        test_masks=np.stack(test_masks),
        test_labels=np.array([t != "good" for t in test_types], np.int32),
        test_types=test_types,
        test_paths=[str(p) for p in test_paths],
    )


def load_category(root, category: str, image_size: int):
    """`ustad.data.mvtec.load_mvtec_category`, or the local reader if that module is absent."""
    try:
        from ustad.data.mvtec import load_mvtec_category
    except ImportError:
        return _read_local(root, category, image_size), "local PNG reader"
    return load_mvtec_category(root, category, image_size=image_size), "ustad.data.mvtec"


def baseline_maps(train_images, test_images, image_blur: float, map_blur: float):
    """Distance of each blurred test pixel to the training mean, raw and standardised.

    Args:
        train_images: `[N, H, W, C]` float in [0, 1], anomaly-free.
        test_images: `[M, H, W, C]` float in [0, 1].
        image_blur: Gaussian sigma in pixels for the images.
        map_blur: Gaussian sigma in pixels for the maps.

    Returns:
        `{"l2_to_mean": [M, H, W], "z_to_mean": [M, H, W]}` float32.
    """

    def blur(images, sigma):
        return ndimage.gaussian_filter(images, (0, sigma, sigma, 0)) if sigma > 0 else images

    train = blur(train_images.astype(np.float32), image_blur)
    test = blur(test_images.astype(np.float32), image_blur)
    mean = train.mean(axis=0)
    # The floor keeps pixels that never vary between good images from dividing by ~0.
    std = np.maximum(train.std(axis=0), 0.02)
    maps = {
        "l2_to_mean": np.sqrt(((test - mean) ** 2).sum(axis=-1)),
        "z_to_mean": np.sqrt((((test - mean) / std) ** 2).sum(axis=-1)),
    }
    smooth = (0, map_blur, map_blur)
    return {k: ndimage.gaussian_filter(v, smooth).astype(np.float32) for k, v in maps.items()}


def main(argv):
    del argv
    start = time.perf_counter()
    data, reader = load_category(FLAGS.data_dir, FLAGS.category, FLAGS.image_size)
    loaded = time.perf_counter()
    score_maps = baseline_maps(
        data.train_images, data.test_images, FLAGS.image_blur, FLAGS.map_blur
    )
    scored = time.perf_counter()
    names = [f"{t}_{Path(p).stem}" for t, p in zip(data.test_types, data.test_paths, strict=True)]
    report = evaluate.write_category_report(
        FLAGS.out,
        FLAGS.category,
        score_maps,
        data.test_masks,
        data.test_labels,
        images=data.test_images,
        types=data.test_types,
        names=names,
        example_set="z_to_mean",
        examples_per_type=FLAGS.examples_per_type,
        example_selection=FLAGS.examples,
        metadata={
            "method": "distance to the mean training image (stand-in baseline)",
            "image_blur": FLAGS.image_blur,
            "map_blur": FLAGS.map_blur,
            "image_size": FLAGS.image_size,
            "data_dir": str(FLAGS.data_dir),
            "reader": reader,
        },
    )
    done = time.perf_counter()
    emit(
        {
            "benchmark": "baseline_mvtec",
            "category": FLAGS.category,
            "reader": reader,
            "train_images": len(data.train_images),
            "test_images": len(data.test_images),
            "defective": int(np.sum(data.test_labels)),
            "metrics": report.metrics,
            "files_written": len(report.paths),
            "out": str(FLAGS.out),
            "load_s": round(loaded - start, 2),
            "score_s": round(scored - loaded, 2),
            "evaluate_and_report_s": round(done - scored, 2),
        }
    )


if __name__ == "__main__":
    app.run(main)
