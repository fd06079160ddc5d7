"""Deploy a trained detector: one file that scores images without ustad's training code.

Two formats of the same scorer (:func:`ustad.uninformed_students.export_graph.make_scorer`: dense
teacher and M
students per scale, normalised error + variance, average over scales, the image score reduced
from the map), for one fixed image size:

* ``.onnx`` (:func:`export_onnx`, needs ``pip install ustad[export]``): input
  ``images [N, H, W, C] float32 in [0, 1]`` (N dynamic), outputs ``anomaly_map [N, H, W]`` and
  ``image_score [N]``, the weights as initializers, the header below as metadata properties;
  runs on ONNX Runtime (or any ONNX runtime with opset 23).
* ``.jaxexport`` (:func:`export_jax`): a zip of ``header.json``, ``program.stablehlo`` (a
  serialized :mod:`jax.export` program, lowered for CPU, CUDA and TPU, batch symbolic) and
  ``weights.npz`` (its first argument, a flat list of arrays). It needs JAX and NumPy only
  (README "Deploy" reads one in ten lines).

:func:`load` reads either into an :class:`ExportedDetector`. The header holds the format, the
ustad version, the p's, the image size and channels, the students per scale, the score
reduction, the dense-extraction method and each teacher's name and parameter SHA-256
(:func:`ustad.uninformed_students.export_graph.teacher_sha256`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ustad.deploy.runtime import RESIZE_METHODS, SUFFIXES, ExportedDetector, load, read_header
from ustad.deploy.verify import CHECK_TOLERANCE, check_export, verify_export

__all__ = [
    "CHECK_TOLERANCE",
    "DEFAULT_METHOD",
    "FORMAT",
    "SUFFIXES",
    "ExportedDetector",
    "check_export",
    "export",
    "export_jax",
    "export_onnx",
    "header",
    "load",
    "load_scales",
    "read_header",
    "verify_export",
]


FORMAT = "ustad.deploy/1"


INPUT, OUTPUTS = "images", ("anomaly_map", "image_score")


# Both are exact; multi-pooling ran faster than à trous under ONNX Runtime and under XLA (p=65,
# full width, 256², batch 1, 2 CPU cores shared with a training: 34 vs 47 s and 18 vs 23 s).
DEFAULT_METHOD = "multipool"


def header(
    scales, *, size, channels, reduction, top_k, method, sources=None, calibration=None
) -> dict:
    """The metadata stored in an exported file (JSON-serialisable): what it is, its input
    contract (checked by :func:`ustad.deploy.runtime.input_contract` when loaded) and the
    calibration's record (thresholds and the good images' scores; None when uncalibrated)."""
    from ustad import __version__
    from ustad.uninformed_students.export_graph import teacher_sha256

    sources = sources or [None] * len(scales)
    return {
        "format": FORMAT,
        "ustad_version": __version__,
        "patch_sizes": [scale.patch_size for scale in scales],
        "image_size": [int(s) for s in size],
        "channels": int(channels),
        "num_students": [scale.num_students for scale in scales],
        "training_sizes": [list(scale.image_size) for scale in scales],
        "reduction": reduction,
        "top_k": int(top_k),
        "dense_method": method,
        "teachers": [
            {"patch_size": scale.patch_size, "name": source, "sha256": teacher_sha256(scale)}
            for scale, source in zip(scales, sources, strict=True)
        ],
        "input": f"{INPUT} [N, {size[0]}, {size[1]}, {channels}] float32 in [0, 1]",
        "outputs": [f"{OUTPUTS[0]} [N, {size[0]}, {size[1]}] float32", f"{OUTPUTS[1]} [N] float32"],
        "input_contract": {
            "size": [int(s) for s in size],
            "channels": int(channels),
            "color": "RGB" if int(channels) == 3 else "gray",
            "value_range": [0.0, 1.0],
            "dtype": "float32",
            # ExportedDetector.score resizes other sizes on the host with this filter, as the
            # students' Detector does (the model itself takes exactly `size`).
            "resize": RESIZE_METHODS[0],
        },
        "calibration": None if calibration is None else calibration.record(),
    }


def load_scales(workdirs: str | os.PathLike | Sequence[str | os.PathLike]):
    """The trained scales of students workdirs and their teachers' names.

    Returns:
      ``(scales, sources)``: the :class:`ustad.uninformed_students.checkpoints.ScaleModel` s
      that :meth:`Detector.load` finds and averages (a scale worse than chance on its
      planted-defect check is left out, as ``ustad score`` does:
      :func:`ustad.uninformed_students.score.select_scales`), and each one's
      ``teacher_source`` from its checkpoint metadata.
    """
    from ustad.uninformed_students.checkpoints import find_scale_dirs, load_scale
    from ustad.uninformed_students.score import select_scales

    if isinstance(workdirs, str | os.PathLike):
        workdirs = [workdirs]
    scales = list(select_scales([load_scale(d) for w in workdirs for d in find_scale_dirs(w)]))
    return scales, [scale.teacher_source for scale in scales]


@contextlib.contextmanager
def _quiet_converter():
    """jax2onnx 0.13 logs a traceback for each plugin of a library it cannot import under JAX
    0.10 (dm-pix's) and onnx-ir one warning per constant shape: none concerns this graph."""
    loggers = [logging.getLogger(name) for name in ("jax2onnx", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _resolve(scales, size, channels):
    from ustad.uninformed_students.checkpoints import ScaleModel

    if not scales:
        raise ValueError("nothing to export: no trained scales")
    for scale in scales:
        if not isinstance(scale, ScaleModel):
            raise ValueError(
                f"only Uninformed Students scales can be exported, got {type(scale).__name__}"
            )
    sizes = {tuple(scale.image_size) for scale in scales}
    if size is None:
        if len(sizes) > 1:
            raise ValueError(
                f"the scales were trained at different sizes {sorted(sizes)}; choose the "
                f"exported input size with size=(H, W) (--size)"
            )
        size = next(iter(sizes))
    size = (int(size), int(size)) if isinstance(size, int | np.integer) else tuple(size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (H, W) of positive ints, got {size}")
    # A scale trained at another size gets the images resized to its own (a multiple of its
    # stride) inside the graph, so any size is valid.
    channels = scales[0].channels if channels is None else int(channels)
    return size, channels


def _prepare(scales, size, channels, reduction, top_k, method, sources, calibration=None):
    """``(header, score, weights)`` for :func:`export_jax` and :func:`export_onnx`."""
    from ustad.uninformed_students.export_graph import make_scorer, scale_weights

    size, channels = _resolve(scales, size, channels)
    meta = header(
        scales,
        size=size,
        channels=channels,
        reduction=reduction,
        top_k=top_k,
        method=method,
        sources=sources,
        calibration=calibration,
    )
    score = make_scorer(scales, size=size, reduction=reduction, top_k=top_k, method=method)
    return meta, score, [scale_weights(scale) for scale in scales]


def export_jax(
    scales,
    path: str | os.PathLike,
    *,
    size=None,
    channels: int | None = None,
    reduction: str = "max",
    top_k: int = 100,
    method: str = DEFAULT_METHOD,
    sources=None,
    platforms: Sequence[str] = ("cpu", "cuda", "tpu"),
    calibration=None,
) -> dict:
    """Write the scorer as a ``.jaxexport`` file (serialized StableHLO + weights + header).

    Args:
      scales: :class:`ustad.uninformed_students.checkpoints.ScaleModel` s (e.g. from
      :func:`load_scales`). path: the file to write.
      size: ``(H, W)`` (or an int) of the images it takes; default the scales' training size.
      channels: C of the images it takes; default the first scale's.
      reduction, top_k: the image score (:func:`ustad.detector.reduce_maps`).
      method: dense extraction, ``"atrous"`` or ``"multipool"`` (both exact).
      sources: each scale's teacher name for the header.
      platforms: what the program is lowered for (one program, chosen at load time).
      calibration: the :class:`ustad.calibration.Calibration` stored in the header (its
        settings must be this file's: ``reduction``, ``top_k``, no smoothing).

    Returns:
      The header.
    """
    import jax

    from ustad.io import atomic_write

    meta, score, weights = _prepare(
        scales, size, channels, reduction, top_k, method, sources, calibration
    )
    size, channels = meta["image_size"], meta["channels"]
    leaves, treedef = jax.tree.flatten(weights)

    def program(flat, images):
        return score(jax.tree.unflatten(treedef, flat), images)

    (batch,) = jax.export.symbolic_shape("N")
    specs = (
        [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in leaves],
        jax.ShapeDtypeStruct((batch, *size, channels), np.float32),
    )
    exported = jax.export.export(jax.jit(program), platforms=tuple(platforms))(*specs)
    arrays = io.BytesIO()
    np.savez(arrays, **{f"w{i:04d}": np.asarray(leaf) for i, leaf in enumerate(leaves)})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("header.json", json.dumps(meta, indent=1))
        archive.writestr("program.stablehlo", bytes(exported.serialize()))
        archive.writestr("weights.npz", arrays.getvalue())
    atomic_write(Path(path), buffer.getvalue())
    return meta


def export_onnx(
    scales,
    path: str | os.PathLike,
    *,
    size=None,
    channels: int | None = None,
    reduction: str = "max",
    top_k: int = 100,
    method: str = DEFAULT_METHOD,
    sources=None,
    opset: int = 23,
    calibration=None,
) -> dict:
    """Write the scorer as an ONNX model (``pip install ustad[export]``).

    Args: as :func:`export_jax`; ``opset`` is the ONNX opset.

    Returns:
      The header (also in the model's metadata: ``ustad`` holds it as JSON, and each field is
      a property of its own).
    """
    try:
        from jax2onnx import to_onnx
    except ImportError as error:
        raise ImportError(
            "ONNX export needs jax2onnx, onnx and onnxruntime: pip install 'ustad[export]'"
        ) from error
    from ustad.io import atomic_write

    meta, score, weights = _prepare(
        scales, size, channels, reduction, top_k, method, sources, calibration
    )
    size, channels = meta["image_size"], meta["channels"]
    with _quiet_converter():
        model = to_onnx(
            lambda images: score(weights, images),
            inputs=[("N", *size, channels)],
            model_name="ustad_detector",
            opset=opset,
            input_names=[INPUT],
            output_names=list(OUTPUTS),
        )
    # jax2onnx annotates a concatenation along the symbolic batch axis (multi-pooling) with
    # the input's batch size, which ONNX Runtime then enforces; it infers the shapes itself.
    del model.graph.value_info[:]
    model.doc_string = "ustad anomaly detector: " + json.dumps(meta)
    properties = {"ustad": json.dumps(meta)}
    properties.update(
        {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items() if k != "format"}
    )
    properties["format"] = FORMAT
    for key, value in properties.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    atomic_write(Path(path), model.SerializeToString())
    return meta


def export(scales, path: str | os.PathLike, *, check: bool = True, verify=None, **kwargs) -> dict:
    """Write the scorer in the format ``path``'s suffix names (``.onnx`` or ``.jaxexport``).

    The file is written under a temporary name next to ``path`` and renamed into place only
    after the checks pass, so a failed check leaves no file.

    Args:
      scales: :class:`ustad.uninformed_students.checkpoints.ScaleModel` s.
      path: the file to write.
      check: score two random images with the written file and with
        :meth:`ustad.uninformed_students.score.Detector.score` and raise if they differ
        (:func:`check_export`).
      verify: the user's images to compare on as well (:func:`verify_export`): ``[N, H, W, C]``
        or an iterable of such batches, any size.
      **kwargs: see :func:`export_jax` (``platforms``, ``calibration``) and :func:`export_onnx`
        (``opset``).

    Returns:
      The header, with ``"check"`` and ``"verify"`` (the measured differences) when done.
    """
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: the file name must end in {' or '.join(SUFFIXES)}")
    calibration = kwargs.get("calibration")
    if calibration is not None:
        check_calibration_settings(
            calibration, kwargs.get("reduction", "max"), kwargs.get("top_k", 100)
        )
    staged = path.with_name(f".{path.stem}.unchecked{path.suffix}")
    meta = (export_onnx if path.suffix == ".onnx" else export_jax)(scales, staged, **kwargs)
    try:
        if check:
            meta["check"] = check_export(scales, staged)
        if verify is not None:
            meta["verify"] = verify_export(scales, staged, verify, calibration)
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
    return meta


def check_calibration_settings(calibration, reduction: str, top_k: int) -> None:
    """Raise ``ValueError`` unless ``calibration`` was made for this image score without
    smoothing (what an exported file computes)."""
    want = {"reduction": reduction, "top_k": int(top_k), "smooth_sigma": 0.0}
    have = {k: calibration.settings.get(k) for k in want}
    if have != want:
        raise ValueError(
            f"the calibration was made for {have}, the file scores with {want}: calibrate with "
            f"these options (ustad calibrate --reduction/--top_k) or export with the calibration's"
        )
