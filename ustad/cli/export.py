"""``ustad export``: trained students as one file that scores without ustad's training code."""

from __future__ import annotations

import os

import numpy as np
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
Thresholds: the workdirs' calibration for this --reduction/--top_k (calibration.json, see
`ustad calibrate`) is stored in the header, with the input contract (size, channels, RGB/gray,
float32 in [0, 1], the host resize); `ustad score --model` and `ustad.deploy.load(...).predict`
decide with it. --verify=<images> also scores your own images (folder, glob or file) with the
file and with the students and stops, writing nothing, on any difference beyond float tolerance
(or a header calibration unlike the workdirs'); --verify_only checks an existing --out file that
way without writing it.
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
    flags.DEFINE_string(
        "verify", None, "also compare on these images (folder, glob or file)", flag_values=fv
    )
    flags.DEFINE_bool(
        "verify_only", False, "check the existing --out file on --verify images", flag_values=fv
    )


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
    if fv["verify_only"].value and not fv["verify"].value:
        raise ValueError("--verify_only needs --verify=<images> to compare on")
    verify = _verify_batches(fv["verify"].value) if fv["verify"].value else None
    from ustad import families

    for workdir in fv["workdirs"].value:
        if families.family_of(workdir) == families.STFPM:
            raise ValueError(
                f"{workdir} is an STFPM workdir: STFPM workdirs cannot be exported yet (`ustad "
                f"export` takes Uninformed Students workdirs); score it with `ustad score "
                f"--workdirs={workdir}`"
            )
    scales, sources = deploy.load_scales(fv["workdirs"].value)
    calibration = _calibration(fv)
    if fv["verify_only"].value:
        from ustad.deploy.verify import verify_export

        result = verify_export(scales, fv["out"].value, verify, calibration)
        _print_verify(result, fv["out"].value)
        return
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
            verify=verify,
            calibration=calibration,
        )
    except ImportError as error:  # no ONNX converter: one error line, not a traceback
        raise ValueError(str(error)) from error
    _print_summary(meta, fv["out"].value)
    if "verify" in meta:
        _print_verify(meta["verify"], fv["out"].value)


def _calibration(fv: flags.FlagValues):
    """The workdirs' calibration for the exported image score, or None (said on stdout)."""
    from ustad.calibration_files import find_calibration

    settings = {"reduction": fv["reduction"].value, "top_k": fv["top_k"].value, "smooth_sigma": 0.0}
    calibration, why = find_calibration(fv["workdirs"].value, settings)
    if calibration is None:
        print(f"exporting without thresholds: {why}")
    return calibration


def _verify_batches(source: str):
    """The --verify images, read one batch of one size at a time (all decoded once first)."""
    from ustad.data.images import read_image, resolve_image_paths
    from ustad.score_files import scan_images

    paths = resolve_image_paths(source)
    sizes = scan_images(paths)

    def batches():
        by_size: dict[tuple, list] = {}
        for path, size in zip(paths, sizes, strict=True):
            by_size.setdefault(tuple(size), []).append(path)
        for group in by_size.values():
            for start in range(0, len(group), 8):
                yield np.stack([read_image(p) for p in group[start : start + 8]])

    return batches()


def _print_verify(result: dict, out: str) -> None:
    print(
        f"verify: {out} on {result['images']} of your images: max |Δ| {result['max_abs_map']:.3g} "
        f"(maps), {result['max_abs_score']:.3g} (scores), tolerance {result['tolerance']:.3g}; "
        f"calibration matches; decisions differ on {result['decisions_differ']} images"
    )


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
