"""``ustad score``: anomaly maps for any images, with trained workdirs or an exported file."""

from __future__ import annotations

from absl import flags

from ustad.cli.common import Command, detector_flags, detector_kwargs

DOC = """
Anomaly maps for any folder, glob or file of images, with trained students (paper §5).

Reads: the students in --workdirs (one scale, a multi-scale run, or several; their scales are
averaged) and the images (png/jpg/bmp, any size, gray or RGB); every image is read before any
is scored, and an unreadable one stops the run naming it.
Writes, for every image <rel> (its path below the images' common folder, extension kept):
<out>/<rel>.npz (anomaly_map [H, W] float32 at the image's size, score),
<out>/<rel>.overlay.png (image | map over the image, one colour scale for the run) and
<out>/scores.csv (path,score) and <out>/scoring.json (the students or model, the image score
--reduction/--top_k and the smoothing --smooth_sigma used).
Options (not in the paper, off by default): --smooth_sigma=S blurs each map by a Gaussian of
S pixels before the image score; --reduction=topk --top_k=K scores an image by the mean of its
K highest pixels instead of the maximum (the maximum is the default).
Time: compilation (seconds), then per image at 256² with the paper's nets ~10–14 s per scale
and 35 s multi-scale on 2 CPU cores (benchmarks/RESULTS.md); the demo's small nets at 64²
score several images a second. GPU speed is not measured yet.
With --model=detector.onnx or detector.jaxexport (`ustad export`) instead of --workdirs, the
exported model scores (images resized to its size on the host as the students' are, maps back);
its image score was fixed by `ustad export` and it does not smooth, so --reduction, --top_k and
--smooth_sigma are refused with --model.
"""


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
        "vmin", None, "colour scale minimum (default: the run's minimum)", flag_values=fv
    )
    flags.DEFINE_float(
        "vmax", None, "colour scale maximum (default: the run's maximum)", flag_values=fv
    )


def run(fv: flags.FlagValues) -> None:
    from ustad.data.images import read_image, resolve_image_paths
    from ustad.score_files import output_names, score_files

    if bool(fv["workdirs"].value) == bool(fv["model"].value):
        raise ValueError("give either --workdirs (trained students) or --model (an exported file)")
    paths = resolve_image_paths(fv["images"].value)
    output_names(paths)  # clashes and unreadable images fail before the students load
    images = [read_image(path) for path in paths]
    detector, settings = _exported(fv) if fv["model"].value else _trained(fv)
    _, _, (vmin, vmax) = score_files(
        detector,
        paths,
        fv["out"].value,
        images=images,
        vmin=fv["vmin"].value,
        vmax=fv["vmax"].value,
        settings=settings,
    )
    print(f"scored {len(paths)} images -> {fv['out'].value} (colour scale {vmin:.3g} … {vmax:.3g})")


def _trained(fv: flags.FlagValues):
    """The detector of --workdirs (either family) and the settings scoring.json records."""
    from ustad import families

    detector = families.load_detector(fv["workdirs"].value, **detector_kwargs(fv))
    return detector, {"workdirs": fv["workdirs"].value, **detector.settings}


def _exported(fv: flags.FlagValues):
    """The detector of an exported --model file and the settings scoring.json records."""
    from ustad.deploy.runtime import load

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
    return detector, settings


SCORE = Command(
    "anomaly maps, overlays and scores.csv for any images",
    DOC,
    define,
    run,
    ("images", "out"),
)
