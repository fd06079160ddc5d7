"""``ustad calibrate``: thresholds of trained workdirs from a folder of good images."""

from __future__ import annotations

from absl import flags

from ustad.cli.common import Command, detector_flags, detector_kwargs

DOC = """
Set the decision thresholds of trained workdirs (either family) from good images only.

Reads: the models in --workdirs (scored together, as `ustad score --workdirs` with the same
--reduction/--top_k/--smooth_sigma) and --good, a folder, glob or file of good images (any
size; decoded once first, then scored a batch at a time). With --data=<category folder> (MVTec
layout: test/good, test/<defect>) also the F1-optimal threshold on those labelled images.
Writes: <workdir>/calibration.json in every workdir (atomically; the entry for these workdirs
and options replaced, others kept): the image threshold, the split-conformal quantile of the
good scores at --max_fpr (default 0.01: 1 % of good images rejected; P(good image rejected) ≤
max_fpr for new images like these), the pixel threshold (the same quantile of each good image's
maximum pixel, so good images show no defect region at that rate), how many images, the
false-reject rate achieved on them, the scores' quantiles, mean and σ, and the scores
themselves (so `ustad score --max_fpr` can recompute). --data adds
"f1_optimal_uses_defect_labels": tuned on labelled defects, for comparison, never used to decide.
Refuses (writing nothing) fewer good images than the quantile needs: max(5, ⌈1/max_fpr − 1⌉),
99 for 1 %, 19 for 5 %.
Time: as `ustad score` on the good images (and the test images with --data).
"""


def define(fv: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_list("workdirs", None, "trained workdir(s), scored together", flag_values=fv)
    flags.DEFINE_string(
        "good", None, "good images: folder, glob pattern or single file", flag_values=fv
    )
    flags.DEFINE_float(
        "max_fpr", 0.01, "share of good images the threshold rejects", flag_values=fv
    )
    flags.DEFINE_string(
        "data",
        None,
        "category folder with labelled test/ images: also the F1-optimal threshold (uses "
        "defect labels)",
        flag_values=fv,
    )
    detector_flags(fv)


def run(fv: flags.FlagValues) -> None:
    from ustad import families
    from ustad.calibration import (
        TooFewGoodImages,
        calibrate_detector,
        check_max_fpr,
        required_good_images,
    )
    from ustad.calibration_files import model_names, write_calibration
    from ustad.data.images import resolve_image_paths
    from ustad.score_files import check_writable, scan_images

    max_fpr = check_max_fpr(fv["max_fpr"].value)
    workdirs = fv["workdirs"].value
    kwargs = detector_kwargs(fv)
    paths = resolve_image_paths(fv["good"].value)
    needed = required_good_images(max_fpr)
    if len(paths) < needed:
        raise TooFewGoodImages(
            f"--good {fv['good'].value}: {len(paths)} good images cannot calibrate a false-reject "
            f"rate of {max_fpr:g}; that quantile needs at least {needed} (add good images or "
            f"raise --max_fpr)"
        )
    sizes = scan_images(paths)
    for workdir in workdirs:
        check_writable(workdir)
    detector = families.load_detector(workdirs, **kwargs)
    if detector.tile:
        from ustad.tiling import check_tiles_fit

        check_tiles_fit(sizes, paths, detector.input_sizes)
    calibration = calibrate_detector(
        detector,
        _batches(paths, sizes, detector.batch_size),
        max_fpr=max_fpr,
        models=model_names(workdirs),
        source=f"{len(paths)} good images from {fv['good'].value}",
    )
    if fv["data"].value:
        calibration = _with_labelled(calibration, fv["data"].value, workdirs, kwargs)
    written = [write_calibration(workdir, calibration) for workdir in workdirs]
    record = calibration.record()
    print(
        f"calibrated on {calibration.count} good images: image threshold "
        f"{calibration.image_threshold:.4g}, pixel threshold {calibration.pixel_threshold:.4g} "
        f"(target false-reject rate {max_fpr:g}, achieved "
        f"{record['achieved_false_reject_rate']:.3g} on these images) -> "
        f"{', '.join(str(w) for w in written)}"
    )
    if calibration.labelled is not None:
        oracle = calibration.labelled
        print(
            f"F1-optimal threshold (USES DEFECT LABELS from {fv['data'].value}; for comparison, "
            f"not used to decide): {oracle['threshold']:.4g}, F1 {oracle['f1']:.3f}; at the "
            f"calibrated threshold F1 {_fmt(oracle['f1_at_calibrated_threshold'])}"
        )


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _batches(paths, sizes, batch_size):
    """The images one batch of one size at a time."""
    import numpy as np

    from ustad.data.images import read_image

    by_size: dict[tuple, list] = {}
    for path, size in zip(paths, sizes, strict=True):
        by_size.setdefault(tuple(size), []).append(path)
    for group in by_size.values():
        for start in range(0, len(group), batch_size):
            yield np.stack([read_image(p) for p in group[start : start + batch_size]])


def _with_labelled(calibration, data: str, workdirs, kwargs):
    """``calibration`` with the F1-optimal threshold on the labelled test images of ``data``."""
    import dataclasses

    from ustad import families
    from ustad.data.mvtec import load_mvtec_test
    from ustad.evaluation.operating_point import f1_max, image_operating_point

    family, models = families.load_models(workdirs)
    # Tiled scoring sees the images at their own size, as `ustad score --tile` does.
    size = None if kwargs.get("tile") else list(models[0].image_size)
    test = load_mvtec_test(data, image_size=size)
    _, scores = families.detector_for(family, models, **kwargs).score(test.images)
    oracle = f1_max(scores, test.labels)
    if oracle is None:
        raise ValueError(f"--data {data}: no defective test images, so no F1-optimal threshold")
    at_calibrated = image_operating_point(scores, test.labels, calibration.image_threshold)
    labelled = {
        "threshold": oracle["threshold"],
        "f1": oracle["f1"],
        "precision": oracle["precision"],
        "recall": oracle["recall"],
        "f1_at_calibrated_threshold": at_calibrated["f1"],
        "data": str(data),
        "test_images": len(scores),
        "note": "tuned on labelled defects: optimistic on these images, never used to decide",
    }
    return dataclasses.replace(calibration, labelled=labelled)


CALIBRATE = Command(
    "decision thresholds from good images (calibration.json)",
    DOC,
    define,
    run,
    ("workdirs", "good"),
)
