"""The teacher file format: one ``<name>.teacher.npz`` holding T̂, D and a JSON header.

A teacher workdir (checkpoints, metrics) is the trainer's business; to hand a teacher to someone
else, :func:`ustad.uninformed_students.teacher.catalog.export_teacher` writes one file with
:func:`write_teacher_file`: T̂'s parameters (float32, or float16 to halve the size), the decoder
D (so that distillation can be measured and training continued from the file), and a JSON
header (format version, p, d, layer table, input channels, P and how it was fed, steps trained,
the training config). :func:`read_teacher_file` checks the format, every parameter's name and
shape against the network the header describes, and that all values are finite, so a wrong or
damaged file fails with the key at fault. Files are plain NumPy archives read with
``allow_pickle=False``.

Finding a teacher by name, loading workdirs, installing and shipping files is
:mod:`ustad.uninformed_students.teacher.catalog`; the trainer
(:mod:`ustad.uninformed_students.teacher.train`) imports both, never the other way round.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import flax
import jax
import numpy as np

from ustad.io import atomic_write
from ustad.uninformed_students.nets import PatchNet, patch_net_from_record

__all__ = [
    "FILE_FORMAT",
    "FORMAT",
    "read_decoder",
    "read_header",
    "read_teacher_file",
    "write_teacher_file",
]


FORMAT = "ustad.teacher/1"  # a teacher workdir's checkpoint metadata


FILE_FORMAT = "ustad-teacher-file/1"


HEADER_KEY = "__header__"


PARAM_PREFIX = "params/"


DECODER_PREFIX = "decoder/"


HEADER_FIELDS = (
    "patch_size",
    "out_dim",
    "layers",
    "channels",
    "backbone",
    "feature_dim",
    "backbone_input",
    "backbone_input_size",
    "source",
    "step",
    "total_steps",
    "config",
    "target",
)


def write_teacher_file(
    path: str | os.PathLike,
    variables: dict,
    meta: dict,
    *,
    dtype: str = "float32",
    decoder: dict | None = None,
) -> dict:
    """Write T̂'s ``variables`` (and D's ``{"kernel", "bias"}``) with the trainer's metadata
    (which must hold ``step``) as one teacher file, atomically.

    Returns:
      ``{"path", "bytes", "sha256", "parameters"}`` (parameters of T̂ only).
    """
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    header = {"format": FILE_FORMAT, "dtype": dtype}
    header.update({key: meta.get(key) for key in HEADER_FIELDS})
    variables = jax.tree.map(np.asarray, variables)
    arrays = {
        PARAM_PREFIX + name: np.asarray(value, dtype)
        for name, value in flax.traverse_util.flatten_dict(variables, sep="/").items()
    }
    parameters = int(sum(a.size for a in arrays.values()))
    if decoder is not None:
        for name in ("kernel", "bias"):
            arrays[DECODER_PREFIX + name] = np.asarray(decoder[name], dtype)
    arrays[HEADER_KEY] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    atomic_write(path, data)
    return {
        "path": str(path),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "parameters": parameters,
    }


def read_teacher_file(
    path: str | os.PathLike, *, sha256: str | None = None
) -> tuple[PatchNet, dict, dict]:
    """Load a file written by :func:`write_teacher_file`.

    Args:
      path: the file.
      sha256: if given, the file's expected SHA-256 (hex).

    Returns:
      ``(module, variables, header)`` as
      :func:`ustad.uninformed_students.teacher.catalog.load_teacher` returns them.
    """
    path = Path(path)
    arrays = _read_arrays(path, sha256)
    header = _read_header(path, arrays)
    module = patch_net_from_record(header)
    side = module.patch_size
    sample = jax.ShapeDtypeStruct((1, side, side, int(header["channels"])), np.float32)
    expected = flax.traverse_util.flatten_dict(
        jax.eval_shape(module.init, jax.random.key(0), sample), sep="/"
    )
    found = {k[len(PARAM_PREFIX) :]: v for k, v in arrays.items() if k.startswith(PARAM_PREFIX)}
    for name in sorted(set(expected) | set(found)):
        if name not in found:
            raise ValueError(f"{path}: parameter {name!r} is missing")
        if name not in expected:
            raise ValueError(f"{path}: unexpected parameter {name!r} for the network in the header")
        if found[name].shape != expected[name].shape:
            raise ValueError(
                f"{path}: parameter {name!r} has shape {found[name].shape}, the network in the "
                f"header needs {expected[name].shape}"
            )
        if not np.all(np.isfinite(found[name])):
            raise ValueError(f"{path}: parameter {name!r} holds NaN or infinite values")
    decoder_shapes = {"kernel": (module.out_dim, header.get("feature_dim")), "bias": None}
    for name, shape in decoder_shapes.items():
        value = arrays.get(DECODER_PREFIX + name)
        if value is None:
            continue
        if shape is not None and value.shape != shape:
            raise ValueError(f"{path}: decoder {name!r} has shape {value.shape}, expected {shape}")
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{path}: decoder {name!r} holds NaN or infinite values")
    variables = flax.traverse_util.unflatten_dict(
        {name: value.astype(np.float32) for name, value in found.items()}, sep="/"
    )
    return module, variables, header


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a teacher file, without reading its parameters.

    Raises:
      ValueError: not a teacher file, or another format. ``KeyError`` and ``OSError`` pass
        through from NumPy (no header entry; unreadable archive).
    """
    path = Path(path)
    with np.load(path, allow_pickle=False) as archive:
        return _read_header(path, {HEADER_KEY: archive[HEADER_KEY]})


def read_decoder(path: str | os.PathLike) -> dict | None:
    """The distillation decoder D stored in a teacher file.

    Returns:
      ``{"kernel": [d, F], "bias": [F]}`` float32, or ``None`` for a file exported without it.
    """
    arrays = _read_arrays(Path(path))
    found = {
        k[len(DECODER_PREFIX) :]: v.astype(np.float32)
        for k, v in arrays.items()
        if k.startswith(DECODER_PREFIX)
    }
    return found or None


def _read_arrays(path: Path, sha256: str | None = None) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256.lower():
        raise ValueError(f"{path}: SHA-256 {hashlib.sha256(data).hexdigest()} != {sha256}")
    try:
        archive = np.load(io.BytesIO(data), allow_pickle=False)
        return {key: archive[key] for key in archive.files}
    except Exception as error:  # noqa: BLE001  (zip, npy and pickle errors alike)
        message = f"{path} is not a teacher file (unreadable NumPy archive: {error})"
        raise ValueError(message) from None


def _read_header(path: Path, arrays: dict[str, np.ndarray]) -> dict:
    if HEADER_KEY not in arrays:
        raise ValueError(f"{path} is not a teacher file: no {HEADER_KEY!r} entry")
    try:
        header = json.loads(arrays[HEADER_KEY].tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable header ({error})") from None
    if header.get("format") != FILE_FORMAT:
        raise ValueError(f"{path} holds format {header.get('format')!r}, not {FILE_FORMAT}")
    return header
