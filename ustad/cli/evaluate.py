"""``ustad evaluate``: metrics and figures of trained workdirs on a labelled test set."""

from __future__ import annotations

import os
from pathlib import Path

from absl import flags

from ustad.cli.common import Command, detector_flags, detector_kwargs

DOC = """
Evaluate trained students on a labelled test set and write the full report.

Reads: the students in --workdirs and --data, a category folder in the MVTec layout:
<data>/test/good/*, <data>/test/<defect type>/* and, for pixel metrics,
<data>/ground_truth/<defect type>/<name>_mask.png (train/ is not needed). Images are resized to
the students' training size (or --image_size, or --native_size: the images' own). With --tile
the test images keep their own size and each is scored by overlapping tiles of the training size
(maps stitched; see `ustad score --help`), and metrics.json records the tiling.
Writes, under --out: metrics.md/.json/.csv (image AUROC, pixel AUROC, AU-PRO@0.3 per scale and
multi-scale), pro_curves.png, roc_pixel.png, roc_image.png, examples/*.png (image | ground truth
| heatmap). Without ground_truth/: image AUROC and mean score per defect type (metrics.*) and
score_histograms.png, with a note that pixel metrics need masks. metrics.json records the
scoring options (--reduction, --top_k, --smooth_sigma; the defaults are the paper's maps and
their maximum).
Operating point (operating_point.json, printed): at the workdirs' calibrated threshold (from good
images only: calibration.json, see `ustad calibrate`) the image-level false-reject rate, miss
rate, precision, recall and F1, and with masks pixel F1 and IoU at the pixel threshold; beside
it the F1-max oracle (the best threshold on these test labels, which a line cannot know).
report/index.html: a static page (no server) with the metrics, the curves and every test image
as a thumbnail with its score, decision and ground truth, misses and false alarms first,
sortable by score.
Time: as `ustad score` for the test images, plus seconds for the metrics and figures.
"""


def define(fv: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_list(
        "workdirs", None, "students workdir(s); their scales are averaged", flag_values=fv
    )
    flags.DEFINE_string(
        "data", None, "category folder holding test/ (and ground_truth/)", flag_values=fv
    )
    flags.DEFINE_string("out", None, "report folder", flag_values=fv)
    flags.DEFINE_integer(
        "image_size", 0, "evaluation size (0: the students' training size)", flag_values=fv
    )
    flags.DEFINE_bool(
        "native_size",
        False,
        "evaluate at the test images' own (most common) size: the maps are resized back to it "
        "(or, with --tile, computed there by tiles); the default with --tile",
        flag_values=fv,
    )
    flags.DEFINE_integer("examples_per_type", 1, "example figures per defect type", flag_values=fv)
    detector_flags(fv)


def run(fv: flags.FlagValues) -> None:
    from ustad import families
    from ustad.data.mvtec import load_mvtec_test
    from ustad.evaluation.test_report import format_summary, write_report

    workdirs = fv["workdirs"].value
    detector_options = detector_kwargs(fv)
    data = Path(fv["data"].value)
    family, models = families.load_models(workdirs)
    size = fv["image_size"].value or list(models[0].image_size)
    if not fv["image_size"].value and (fv["native_size"].value or detector_options["tile"]):
        size = None  # the images' own size
    test = load_mvtec_test(data, image_size=size)
    size = [int(s) for s in test.images.shape[1:3]]
    if len(set(test.labels.tolist())) < 2:
        kind = "defective" if test.labels.all() else "good"
        raise ValueError(
            f"{data}/test holds only {kind} images: the metrics need both good and defective "
            f"test images (to set a threshold from good images alone: `ustad calibrate`)"
        )
    score_maps, image_scores = families.score_sets(family, models, test.images, **detector_options)
    kwargs = {} if test.masks is None else {"examples_per_type": fv["examples_per_type"].value}
    report = write_report(
        fv["out"].value,
        data.resolve().name,
        test,
        score_maps,
        image_scores,
        metadata={
            "data": str(data),
            "workdirs": workdirs,
            "image_size": size,
            "reduction": detector_options["reduction"],
            "top_k": detector_options["top_k"],
            "smooth_sigma": detector_options["smooth_sigma"],
            "tile": _tile_setting(detector_options),
        },
        **kwargs,
    )
    operating_point = _operating_point(fv, workdirs, detector_options, test, score_maps,
                                       image_scores, report.metrics)  # fmt: skip
    print(format_summary(report.metrics))
    print(_operating_point_lines(operating_point))
    if test.masks is None:
        from ustad.evaluation.image_report import PIXEL_METRICS_NOTE

        print(f"(image-level metrics only: {PIXEL_METRICS_NOTE})")
    print(f"\nReport: {os.path.abspath(fv['out'].value)}")


def _operating_point(fv, workdirs, options, test, score_maps, image_scores, metrics) -> dict:
    """Operating-point metrics of the detector's score set (the average of all models, as
    `ustad score` scores), operating_point.json and report/index.html."""
    import json

    from ustad.calibration_files import find_calibration
    from ustad.evaluation.html_report import write_html_report
    from ustad.evaluation.operating_point import operating_point_metrics
    from ustad.io import atomic_write

    name = list(image_scores)[-1]  # one model's set, or the average added last
    settings = _scoring_settings(options)
    calibration, why = find_calibration(workdirs, settings)
    result = operating_point_metrics(
        image_scores[name], test.labels, score_maps[name], test.masks, calibration
    )
    result |= {"score_set": name, "calibration": why or calibration.source}
    out = Path(fv["out"].value)
    atomic_write(out / "operating_point.json", (json.dumps(result, indent=2) + "\n").encode())
    pairs = enumerate(zip(test.types, test.paths, strict=True))
    names = [f"{i:04d}_{kind}_{Path(path).stem}" for i, (kind, path) in pairs]
    write_html_report(
        out / "report", Path(fv["data"].value).resolve().name, test.images, score_maps[name],
        image_scores[name], test.labels, test.types, names, calibration=calibration,
        metrics=metrics, operating_point=result,
    )  # fmt: skip
    return result


def _tile_setting(options: dict):
    """``{"overlap": …}`` when the maps are computed by tiles, else None."""
    return {"overlap": float(options["tile_overlap"])} if options["tile"] else None


def _scoring_settings(options: dict) -> dict:
    """The settings a calibration must have been made with to decide on these maps."""
    from ustad.detector import scoring_settings

    overlap = options["tile_overlap"] if options["tile"] else None
    return scoring_settings(
        options["reduction"], options["top_k"], options["smooth_sigma"], overlap
    )


def _operating_point_lines(result: dict) -> str:
    """What evaluate prints about the operating point."""

    def fmt(value):
        return "n/a" if value is None else f"{value:.3f}"

    lines = []
    calibrated = result["calibrated"]
    if calibrated is None:
        lines.append(f"\nno operating point: {result['calibration']}")
    else:
        lines.append(
            f"\nAt the calibrated threshold {calibrated['threshold']:.4g} ({result['score_set']}; "
            f"from good images only): false-reject rate {fmt(calibrated['false_reject_rate'])}, "
            f"miss rate {fmt(calibrated['miss_rate'])}, precision {fmt(calibrated['precision'])}, "
            f"recall {fmt(calibrated['recall'])}, F1 {fmt(calibrated['f1'])}"
        )
        if "pixel_f1" in calibrated:
            lines.append(
                f"pixels above {calibrated['pixel_threshold']:.4g}: F1 "
                f"{fmt(calibrated['pixel_f1'])}, IoU {fmt(calibrated['pixel_iou'])}"
            )
    oracle = result["f1_max_oracle"]
    if oracle is not None:
        lines.append(
            f"F1-max oracle (uses the test labels): F1 {fmt(oracle['f1'])} at threshold "
            f"{oracle['threshold']:.4g}"
        )
    return "\n".join(lines)


EVALUATE = Command(
    "metrics and figures on a labelled test set",
    DOC,
    define,
    run,
    ("workdirs", "data", "out"),
)
