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
the students' training size (or --image_size).
Writes, under --out: metrics.md/.json/.csv (image AUROC, pixel AUROC, AU-PRO@0.3 per scale and
multi-scale), pro_curves.png, roc_pixel.png, roc_image.png, examples/*.png (image | ground truth
| heatmap). Without ground_truth/: image AUROC and mean score per defect type (metrics.*) and
score_histograms.png, with a note that pixel metrics need masks. metrics.json records the
scoring options (--reduction, --top_k, --smooth_sigma; the defaults are the paper's maps and
their maximum).
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
    test = load_mvtec_test(data, image_size=size)
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
        },
        **kwargs,
    )
    print(format_summary(report.metrics))
    if test.masks is None:
        from ustad.evaluation.image_report import PIXEL_METRICS_NOTE

        print(f"(image-level metrics only: {PIXEL_METRICS_NOTE})")
    print(f"\nReport: {os.path.abspath(fv['out'].value)}")


EVALUATE = Command(
    "metrics and figures on a labelled test set",
    DOC,
    define,
    run,
    ("workdirs", "data", "out"),
)
