"""``ustad export``: trained students as one file that scores without ustad's training code."""

from __future__ import annotations

import os

from absl import flags

from ustad.cli.common import Command, score_option_flags

DOC = """
Export trained students as one file that scores images without ustad's training code.

Reads: the students in --workdirs (one scale, a multi-scale run, or several; as `ustad score`).
Writes: --out, by its suffix: detector.onnx (ONNX, opset 23: input images [N, H, W, C] float32
in [0, 1], N dynamic; outputs anomaly_map [N, H, W] and image_score [N]; needs
`pip install ustad[export]`) or detector.jaxexport (serialized StableHLO for CPU, CUDA and TPU
with its weights and a JSON header; needs JAX only). Both hold the ustad version, p's, image
size, channels and the teachers' names and SHA-256. Then: ustad score --model=<out>.
Time: seconds to a minute to convert; the check (--check, on by default) scores two random
images with the file and with the students and stops if they differ (~1 min per scale at
256² with the paper's nets on 2 CPU cores).
The file scores exactly as the students do without smoothing (`ustad score --smooth_sigma=0`,
the default): smoothing is not exported, and --smooth_sigma other than 0 is refused.
"""


def define(fv: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_list(
        "workdirs", None, "students workdir(s); their scales are averaged", flag_values=fv
    )
    flags.DEFINE_string("out", None, "the file to write: *.onnx or *.jaxexport", flag_values=fv)
    flags.DEFINE_integer(
        "size", 0, "image size it takes (0: the students' training size)", flag_values=fv
    )
    score_option_flags(fv, "not supported: exported models do not smooth (must be 0)")
    flags.DEFINE_enum(
        "method",
        "multipool",
        ["multipool", "atrous"],
        "dense extraction (both exact)",
        flag_values=fv,
    )
    flags.DEFINE_bool("check", True, "compare with the students on random images", flag_values=fv)


def run(fv: flags.FlagValues) -> None:
    from ustad import deploy
    from ustad.detector import check_scoring_options

    check_scoring_options(fv["reduction"].value, fv["top_k"].value, fv["smooth_sigma"].value)
    if fv["smooth_sigma"].value:
        raise ValueError(
            f"--smooth_sigma={fv['smooth_sigma'].value:g}: exported models score without "
            f"smoothing (as `ustad score --smooth_sigma=0`); export without it, and smooth the "
            f"maps the file returns yourself if you need to"
        )
    scales, sources = deploy.load_scales(fv["workdirs"].value)
    try:
        meta = deploy.export(
            scales,
            fv["out"].value,
            size=fv["size"].value or None,
            reduction=fv["reduction"].value,
            top_k=fv["top_k"].value,
            method=fv["method"].value,
            sources=sources,
            check=fv["check"].value,
        )
    except ImportError as error:  # no ONNX converter: one error line, not a traceback
        raise ValueError(str(error)) from error
    _print_summary(meta, fv["out"].value)


def _print_summary(meta: dict, out: str) -> None:
    size = "×".join(str(s) for s in meta["image_size"])
    print(
        f"exported p={'+'.join(str(p) for p in meta['patch_sizes'])} for {size}×"
        f"{meta['channels']} images -> {out} ({os.path.getsize(out) / 1e6:.1f} MB)"
    )
    check = meta.get("check", {})
    if "skipped" in check:
        print(f"check skipped: {check['skipped']}")
    elif check:
        print(
            f"check: max |Δ| {check['max_abs_map']:.3g} (maps), {check['max_abs_score']:.3g} "
            f"(scores) against the students, tolerance {check['tolerance']:.3g}"
        )


EXPORT = Command(
    "one .onnx or .jaxexport file that scores without ustad",
    DOC,
    define,
    run,
    ("workdirs", "out"),
)
