"""``ustad score``: anomaly maps for any images, with trained workdirs or an exported file."""

from __future__ import annotations

from absl import flags

from ustad.cli.common import Command, detector_flags, detector_kwargs

DOC = """
Anomaly maps and pass/fail decisions for any folder, glob or file of images (paper §5 maps).

Reads: the students in --workdirs (either family; one scale, a multi-scale run, or several,
averaged) with their calibration (<workdir>/calibration.json: thresholds from good images, see
`ustad calibrate`), and the images (png/jpg/bmp, any size, gray or RGB); every image is decoded
once before any is scored (an unreadable one stops the run naming it) and the output folder must
be writable; then the images are scored one batch at a time.
Writes, for every image <rel> (its path below the images' common folder, extension kept):
<out>/<rel>.npz (anomaly_map [H, W] at the image's size, float32, or float16 compressed with
--map_dtype=float16; score), <out>/<rel>.mask.png (defect pixels above the pixel threshold),
<out>/<rel>.overlay.png (image | map over it with the threshold's contour | colour bar; the
colour scale is fixed by the calibration, else the run's minimum … maximum), <out>/scores.csv:
path, score and, with a threshold, normalized_score (0.5 exactly at the threshold), threshold,
is_anomalous, defect_area_px, defect_regions (8-connected), map, mask; and <out>/scoring.json
(the model, --reduction/--top_k/--smooth_sigma, the calibration used, warnings).
Decisions: the calibration's thresholds (default: 1 % of good images rejected); --max_fpr=A
recomputes them for another rate from the same good images; --threshold=T sets the image
threshold by hand (the pixel threshold follows it when the image score is the map's maximum).
--fail_on_anomaly exits with status 3 when any image is anomalous (1 = error, 2 = usage).
Prints one line: images scored, how many anomalous, the threshold. Images resized by more
than 8× to the model's size get a warning.
Options (not in the paper, off by default): --smooth_sigma=S blurs each map by a Gaussian of
S pixels before the image score; --reduction=topk --top_k=K scores an image by the mean of its
K highest pixels instead of the maximum (a calibration holds for the options it was made with).
Large images (--tile): each image is scored at its own resolution by tiles of the training size
overlapping by at least --tile_overlap (default 0.25 of a tile; the last tile flush with the
border), and the tile maps are stitched by a trimmed mean (each tile's inner edges, half the
overlap, are left to its neighbour; ustad/tiling.py); the image score comes from the stitched
map. Every image must be at least one tile (an image smaller than a tile is refused, naming it,
before anything is written). A calibration holds for the tiling it was made with: a workdir
calibrated on resized images has no thresholds for tiled maps, so without `ustad calibrate
--tile` the run writes scores only and says why (a workdir trained on tiles,
--config.train_tiles, is calibrated by tiles when it is trained). scoring.json records the
tiling.
Time: compilation (seconds), then per image at 256² with the paper's nets ~10–14 s per scale
and 35 s multi-scale on 2 CPU cores (benchmarks/RESULTS.md); the demo's small nets at 64²
score several images a second. The decisions add ≤ 5 % (benchmarks/calibration_overhead.py).
With --model=detector.onnx or detector.jaxexport (`ustad export`) instead of --workdirs, the
exported model scores with the thresholds stored in the file; its image score was fixed by
`ustad export` and it does not smooth, so --reduction, --top_k and --smooth_sigma are refused.
"""

# The exit status of --fail_on_anomaly when an image is anomalous (1 is an error, 2 a usage
# error), so a production line's script tells "reject the part" from "scoring broke".
EXIT_ANOMALOUS = 3


def define(fv: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_list(
        "workdirs", None, "students workdir(s); their scales are averaged", flag_values=fv
    )
    flags.DEFINE_string(
        "model",
        None,
        "an exported detector (.onnx, .jaxexport) instead of --workdirs",
        flag_values=fv,
    )
    flags.DEFINE_string("images", None, "image folder, glob pattern or single file", flag_values=fv)
    flags.DEFINE_string("out", None, "output folder", flag_values=fv)
    detector_flags(fv)
    flags.DEFINE_float(
        "threshold", None, "image threshold by hand (default: the calibration's)", flag_values=fv
    )
    flags.DEFINE_float(
        "max_fpr",
        None,
        "recalibrate the thresholds for this share of good images rejected (from the "
        "calibration's good images)",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "fail_on_anomaly", False, "exit with status 3 when any image is anomalous", flag_values=fv
    )
    flags.DEFINE_enum(
        "map_dtype", "float32", ["float32", "float16"], "dtype of the saved maps", flag_values=fv
    )
    flags.DEFINE_float(
        "vmin", None, "colour scale minimum (default: the calibration's)", flag_values=fv
    )
    flags.DEFINE_float(
        "vmax", None, "colour scale maximum (default: the calibration's)", flag_values=fv
    )


def run(fv: flags.FlagValues) -> int:
    from ustad.data.images import resolve_image_paths
    from ustad.score_files import check_writable, output_names, scan_images, score_files

    if bool(fv["workdirs"].value) == bool(fv["model"].value):
        raise ValueError("give either --workdirs (trained students) or --model (an exported file)")
    _check_decision_flags(fv)
    paths = resolve_image_paths(fv["images"].value)
    output_names(paths)  # clashes and unreadable images fail before the students load
    sizes = scan_images(paths)
    check_writable(fv["out"].value)
    detector, settings, calibration, why = _exported(fv) if fv["model"].value else _trained(fv)
    if getattr(detector, "tile", False):
        from ustad.tiling import check_tiles_fit

        check_tiles_fit(sizes, paths, detector.input_sizes)
    calibration = operating_point(calibration, why, fv, settings)
    result = score_files(
        detector,
        paths,
        fv["out"].value,
        calibration=calibration,
        vmin=fv["vmin"].value,
        vmax=fv["vmax"].value,
        settings=settings,
        sizes=sizes,
        map_dtype=fv["map_dtype"].value,
    )
    print(summary_line(result.rows, calibration, fv["out"].value, why))
    if fv["fail_on_anomaly"].value and any(r["is_anomalous"] == "true" for r in result.rows):
        return EXIT_ANOMALOUS
    return 0


def _check_decision_flags(fv: flags.FlagValues) -> None:
    """Refuse contradictory or bad decision flags before anything is read."""
    from ustad.calibration import check_max_fpr, check_threshold

    if fv["threshold"].value is not None and fv["max_fpr"].value is not None:
        raise ValueError("give --threshold or --max_fpr, not both")
    if fv["threshold"].value is not None:
        check_threshold(fv["threshold"].value)
    if fv["max_fpr"].value is not None:
        check_max_fpr(fv["max_fpr"].value)


def operating_point(calibration, why: str, fv: flags.FlagValues, settings: dict):
    """The calibration the run decides with: the stored one, at --max_fpr, or --threshold.

    Raises:
      ValueError: --max_fpr or --fail_on_anomaly without a calibration (``why`` says what is
        missing), or a --threshold below every good image's score.
    """
    from ustad.calibration import manual_calibration

    threshold, max_fpr = fv["threshold"].value, fv["max_fpr"].value
    if threshold is not None:
        if calibration is None:
            return manual_calibration(threshold, settings)
        return calibration.with_threshold(threshold)
    if calibration is None:
        if max_fpr is not None or fv["fail_on_anomaly"].value:
            flag = "--max_fpr" if max_fpr is not None else "--fail_on_anomaly"
            raise ValueError(f"{flag} needs a calibration: {why}, or pass --threshold")
        return None
    return calibration if max_fpr is None else calibration.at(max_fpr)


def summary_line(rows: list[dict], calibration, out: str, why: str) -> str:
    """``scored N images, K anomalous (threshold …) -> out``."""
    if calibration is None:
        return f"scored {len(rows)} images -> {out} (no threshold, scores only: {why})"
    anomalous = sum(r["is_anomalous"] == "true" for r in rows)
    if calibration.count:
        rate = f"{calibration.max_fpr:.3g}" if calibration.max_fpr is not None else "?"
        basis = f"false-reject rate {rate} on {calibration.count} good images"
    else:
        basis = "set by hand"
    return (
        f"scored {len(rows)} images, {anomalous} anomalous (threshold "
        f"{calibration.image_threshold:.4g}, {basis}) -> {out}"
    )


def _trained(fv: flags.FlagValues):
    """The detector of --workdirs (either family) and the settings scoring.json records."""
    from ustad import families
    from ustad.calibration_files import find_calibration

    detector = families.load_detector(fv["workdirs"].value, **detector_kwargs(fv))
    calibration, why = find_calibration(fv["workdirs"].value, detector.settings)
    return detector, {"workdirs": fv["workdirs"].value, **detector.settings}, calibration, why


def _exported(fv: flags.FlagValues):
    """The detector of an exported --model file and the settings scoring.json records."""
    from ustad.deploy.runtime import load

    if fv["tile"].value:
        raise ValueError(
            f"--tile: {fv['model'].value} scores whole images at its input size; score by tiles "
            f"with --workdirs"
        )
    fixed = [f"--{n}" for n in ("reduction", "top_k", "smooth_sigma") if fv[n].present]
    if fixed:
        raise ValueError(
            f"{', '.join(fixed)}: an exported model's image score is fixed when it is exported "
            f"(ustad export --reduction/--top_k) and it does not smooth its maps; score with "
            f"--workdirs to use these options"
        )
    detector = load(fv["model"].value, batch_size=fv["batch_size"].value)
    header = getattr(detector, "header", {}) or {}
    settings = {"model": fv["model"].value, "smooth_sigma": 0.0}
    settings |= {k: header[k] for k in ("reduction", "top_k") if k in header}
    why = "" if detector.calibration else f"{fv['model'].value} was exported without a calibration"
    return detector, settings, detector.calibration, why


SCORE = Command(
    "anomaly maps, pass/fail decisions and scores.csv for any images",
    DOC,
    define,
    run,
    ("images", "out"),
)
