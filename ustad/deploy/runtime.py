"""Run an exported detector (:mod:`ustad.deploy`): ``load(path)(images) -> (maps, scores)``.

A ``.jaxexport`` file runs on JAX and NumPy alone: the program is deserialized with
:mod:`jax.export`, and neither this module nor ``import ustad`` imports Flax, Optax, Orbax,
TensorFlow or ustad's networks and trainers (PIL only to resize, in
:meth:`ExportedDetector.score`). A ``.onnx`` file runs on ONNX Runtime's CPU provider
(``pip install ustad[export]``). Both check the input against the header first, so a
model exported for one image size rejects another with a message that names both.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from ustad.host_images import as_unit_float, convert_channels, resize_bilinear

SUFFIXES = (".onnx", ".jaxexport")

# The host resizes this runner can do (``input_contract["resize"]`` of a header): PIL's
# antialiased bilinear filter, as the students' Detector.
RESIZE_METHODS = ("pil_bilinear_antialias",)


def input_contract(header: dict) -> dict:
    """What the file takes, from its header: ``{"size": [H, W], "channels": C, "color": "RGB" |
    "gray", "value_range": [0, 1], "dtype": "float32", "resize": method}``; files older than the
    field get it from ``image_size`` and ``channels``.

    Raises:
      ValueError: a contract this runner cannot honour (another range, dtype or resize), or one
        that contradicts the header's size and channels.
    """
    size, channels = [int(s) for s in header["image_size"]], int(header["channels"])
    contract = header.get("input_contract") or {
        "size": size,
        "channels": channels,
        "color": "RGB" if channels == 3 else "gray",
        "value_range": [0.0, 1.0],
        "dtype": "float32",
        "resize": RESIZE_METHODS[0],
    }
    problems = []
    if list(contract.get("size", [])) != size or contract.get("channels") != channels:
        problems.append(f"size/channels {contract.get('size')}×{contract.get('channels')} vs "
                        f"image_size {size} and channels {channels}")  # fmt: skip
    if contract.get("color") != ("RGB" if channels == 3 else "gray"):
        problems.append(f"color {contract.get('color')!r} for {channels} channels")
    if list(contract.get("value_range", [])) != [0.0, 1.0] or contract.get("dtype") != "float32":
        problems.append(f"values {contract.get('dtype')} in {contract.get('value_range')}")
    if contract.get("resize") not in RESIZE_METHODS:
        problems.append(f"resize {contract.get('resize')!r} (this runner does {RESIZE_METHODS})")
    if problems:
        raise ValueError(f"input contract this runner cannot honour: {'; '.join(problems)}")
    return contract


def read_header(path: str | os.PathLike) -> dict:
    """The header of an exported file (see :func:`ustad.deploy.header`)."""
    path = Path(path)
    if path.suffix == ".jaxexport":
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("header.json"))
    if path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        properties = {entry.key: entry.value for entry in model.metadata_props}
        if "ustad" not in properties:
            raise ValueError(f"{path} is an ONNX model but not one exported by ustad")
        return json.loads(properties["ustad"])
    raise ValueError(f"{path}: an exported detector ends in {' or '.join(SUFFIXES)}")


class ExportedDetector:
    """An exported detector, scoring images of the size it was exported for.

    Args:
      path: a ``.onnx`` or ``.jaxexport`` file written by :mod:`ustad.deploy`.
      batch_size: images per call when used by :func:`ustad.score_files.score_files`.
      threads: ONNX Runtime's intra-op threads (0: its default, one per core).

    Attributes:
      header: the file's metadata; ``image_size`` ``(H, W)`` and ``channels`` C it takes.
      contract: :func:`input_contract` of the header, checked when loading.
      calibration: the :class:`ustad.calibration.Calibration` stored in the file, or None.
    """

    def __init__(self, path: str | os.PathLike, *, batch_size: int = 8, threads: int = 0):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no exported detector at {self.path}")
        self.header = read_header(self.path)
        self.image_size = tuple(self.header["image_size"])
        self.channels = int(self.header["channels"])
        try:
            self.contract = input_contract(self.header)
        except ValueError as error:
            raise ValueError(f"{self.path}: {error}") from None
        self.calibration = None
        if self.header.get("calibration"):
            from ustad.calibration import Calibration

            self.calibration = Calibration.from_record(
                self.header["calibration"], f"{self.path} (calibration in its header)"
            )
        self.batch_size = batch_size
        if self.path.suffix == ".onnx":
            self._run = _onnx_runner(self.path, threads)
        else:
            self._run = _JaxRunner(self.path)

    def compile(self, batch: int) -> None:
        """Compile for ``batch`` images now rather than on the first call (``.jaxexport``;
        ONNX Runtime prepares its session when loading)."""
        if isinstance(self._run, _JaxRunner):
            self._run.compile((batch, *self.image_size, self.channels))

    def __call__(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Anomaly maps and image scores.

        Args:
          images: ``[N, H, W, C]`` float32 in [0, 1] (uint8 / uint16 are scaled) at exactly the
            exported ``(H, W)`` and C.

        Returns:
          ``(anomaly_map [N, H, W] float32, image_score [N] float32)``.

        Raises:
          ValueError: another shape (the message names the exported one) or range.
        """
        images = as_unit_float(images)
        if not np.isfinite(images).all():
            raise ValueError(f"{self.path.name}: the images hold NaN or inf values")
        expected = (*self.image_size, self.channels)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(
                f"{self.path.name} was exported for {expected[0]}×{expected[1]} images with "
                f"{expected[2]} channels ([N, {expected[0]}, {expected[1]}, {expected[2]}]), got "
                f"shape {list(images.shape)}: resize the images (ExportedDetector.score does), "
                f"or export again with --size"
            )
        maps, scores = self._run(images)
        return np.asarray(maps, np.float32), np.asarray(scores, np.float32)

    def score(self, images) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`ustad.uninformed_students.score.Detector.score`: any size and 1 or 3 channels
        (resized and
        converted on the host as the Detector does, the maps resized back to each image)."""
        images = convert_channels(as_unit_float(images), self.channels, expected_by="the model")
        if images.ndim != 4:
            raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
        count, height, width = images.shape[:3]
        if (height, width) != self.image_size:
            self._warn_if_resized_twice((height, width))
            images = np.stack([resize_bilinear(image, self.image_size) for image in images])
        maps, scores = self(images)
        if maps.shape[1:] != (height, width):
            import jax

            maps = np.asarray(jax.image.resize(maps, (count, height, width), "linear"))
            scores = _reduce(maps, self.header["reduction"], self.header["top_k"])
        return maps, scores

    def _warn_if_resized_twice(self, size: tuple[int, int]) -> None:
        """Once: images of another size than the file's are resized on the host, and a scale
        trained at a third size resizes them again inside the graph."""
        trained = {tuple(s) for s in self.header.get("training_sizes", [])} - {self.image_size}
        if not trained or getattr(self, "_warned_twice", False):
            return
        self._warned_twice = True
        import logging

        logging.getLogger("ustad").warning(
            "images of %d×%d are resized to %d×%d on the host and then to the students' "
            "training size %s inside the model (resized twice, which blurs small defects and "
            "lowers scores); export without --size, or score images of %d×%d",
            *size, *self.image_size, " and ".join(f"{h}×{w}" for h, w in sorted(trained)),
            *self.image_size,
        )  # fmt: skip

    def predict(self, images, calibration=None):
        """:meth:`score` with the decisions of ``calibration`` (default: the one stored in the
        file); a :class:`ustad.decisions.Prediction` as
        :meth:`ustad.detector.MapDetector.predict`."""
        from ustad.decisions import decide

        maps, scores = self.score(images)
        return decide(maps, scores, self.calibration if calibration is None else calibration)

    @property
    def input_sizes(self) -> list[tuple[int, int]]:
        """The one ``(H, W)`` the file scores at."""
        return [self.image_size]

    @property
    def settings(self) -> dict:
        """The scoring options fixed in the file (no smoothing)."""
        return {
            "reduction": self.header["reduction"],
            "top_k": int(self.header["top_k"]),
            "smooth_sigma": 0.0,
        }


def load(path: str | os.PathLike, **kwargs) -> ExportedDetector:
    """Load a ``.onnx`` or ``.jaxexport`` detector; see :class:`ExportedDetector`."""
    return ExportedDetector(path, **kwargs)


def _reduce(maps: np.ndarray, reduction: str, top_k: int) -> np.ndarray:
    flat = maps.reshape(len(maps), -1)
    if reduction == "max":
        return flat.max(axis=1)
    if reduction == "mean":
        return flat.mean(axis=1)
    k = min(top_k, flat.shape[1])
    return np.sort(flat, axis=1)[:, -k:].mean(axis=1)


class _JaxRunner:
    """The deserialized program with its weights on the default device, compiled once per
    batch size (ahead of time, so :meth:`ExportedDetector.compile` runs nothing)."""

    def __init__(self, path: Path):
        import jax

        with zipfile.ZipFile(path) as archive:
            program = jax.export.deserialize(bytearray(archive.read("program.stablehlo")))
            with np.load(io.BytesIO(archive.read("weights.npz"))) as arrays:
                weights = [arrays[f"w{i:04d}"] for i in range(len(arrays.files))]
        self._weights = jax.device_put(weights)
        self._call = jax.jit(program.call)
        self._compiled = {}

    def compile(self, shape):
        import jax

        if shape not in self._compiled:
            images = jax.ShapeDtypeStruct(shape, np.float32)
            self._compiled[shape] = self._call.lower(self._weights, images).compile()
        return self._compiled[shape]

    def __call__(self, images):
        return self.compile(images.shape)(self._weights, images)


def _onnx_runner(path: Path, threads: int):
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise ImportError(
            "scoring with an .onnx detector needs onnxruntime: pip install 'ustad[export]'"
        ) from error
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"images": images})
