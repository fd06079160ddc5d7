"""A trained teacher as one versioned file, and teachers found by name.

A teacher workdir (checkpoints, metrics) is the trainer's business; to hand a teacher to someone
else, :func:`export_teacher` writes one ``<name>.teacher.npz``: T̂'s parameters (float32, or
float16 to halve the size) and a JSON header (format version, p, d, layer table, input
channels, P and how it was fed, steps trained, the training config). Loading checks the format,
every parameter's name and shape against the network the header describes, and that all values
are finite, so a wrong or damaged file fails with the key at fault. Files are plain NumPy
archives read with ``allow_pickle=False``.

Everywhere ustad takes a teacher (``load_teacher``, ``--config.teacher_workdir`` of the
students and paper configs), it takes a workdir, such a file, or a *name*: ``"p33"`` is looked up
as ``<teachers dir>/p33.teacher.npz``, the teachers dir being ``$USTAD_TEACHERS`` or
``~/.cache/ustad/teachers``. :func:`install_teacher` copies a file there under a name.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import flax
import jax
import numpy as np

from ustad.io import atomic_write
from ustad.models.patch_net import PatchNet, layers_from_json

FILE_FORMAT = "ustad-teacher-file/1"
SUFFIX = ".teacher.npz"
HEADER_KEY = "__header__"
PARAM_PREFIX = "params/"
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
)


def teachers_dir() -> Path:
    """Where teachers are found by name: ``$USTAD_TEACHERS`` or ``~/.cache/ustad/teachers``."""
    root = os.environ.get("USTAD_TEACHERS")
    return Path(root) if root else Path.home() / ".cache" / "ustad" / "teachers"


def export_teacher(
    workdir: str | os.PathLike, path: str | os.PathLike, *, dtype: str = "float32"
) -> dict:
    """Write the finished teacher of ``workdir`` to one file.

    Args:
      workdir: a :func:`ustad.train.teacher.train_and_evaluate` workdir.
      path: the file to write (``.teacher.npz`` is the convention); written atomically.
      dtype: ``"float32"`` or ``"float16"`` for the stored parameters (loaded as float32).

    Returns:
      ``{"path", "bytes", "sha256", "parameters"}``.
    """
    from ustad.train.teacher import load_teacher

    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    _, variables, meta = load_teacher(workdir)
    header = {"format": FILE_FORMAT, "dtype": dtype}
    header.update({key: meta.get(key) for key in HEADER_FIELDS})
    arrays = {
        PARAM_PREFIX + name: np.asarray(value, dtype)
        for name, value in flax.traverse_util.flatten_dict(variables, sep="/").items()
    }
    arrays[HEADER_KEY] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    atomic_write(path, data)
    return {
        "path": str(path),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "parameters": int(sum(a.size for k, a in arrays.items() if k != HEADER_KEY)),
    }


def resolve_teacher(name_or_path: str | os.PathLike) -> Path:
    """A workdir or file as given, else ``<teachers dir>/<name>.teacher.npz``."""
    path = Path(name_or_path)
    if path.exists():
        return path
    named = teachers_dir() / f"{name_or_path}{SUFFIX}"
    if os.sep not in str(name_or_path) and named.exists():
        return named
    available = sorted(p.name[: -len(SUFFIX)] for p in teachers_dir().glob(f"*{SUFFIX}"))
    raise FileNotFoundError(
        f"no teacher {str(name_or_path)!r}: not a workdir or file, and not a name in "
        f"{teachers_dir()} (set $USTAD_TEACHERS; names there: {available or 'none'}). Train one "
        f"with scripts/train_teacher.py, or export one with scripts/export_teacher.py"
    )


def read_teacher_file(
    path: str | os.PathLike, *, sha256: str | None = None
) -> tuple[PatchNet, dict, dict]:
    """Load a file written by :func:`export_teacher`.

    Args:
      path: the file.
      sha256: if given, the file's expected SHA-256 (hex).

    Returns:
      ``(module, variables, header)`` as :func:`ustad.train.teacher.load_teacher` returns them.
    """
    path = Path(path)
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256.lower():
        raise ValueError(f"{path}: SHA-256 {hashlib.sha256(data).hexdigest()} != {sha256}")
    try:
        archive = np.load(io.BytesIO(data), allow_pickle=False)
        arrays = {key: archive[key] for key in archive.files}
    except Exception as error:  # noqa: BLE001  (zip, npy and pickle errors alike)
        message = f"{path} is not a teacher file (unreadable NumPy archive: {error})"
        raise ValueError(message) from None
    if HEADER_KEY not in arrays:
        raise ValueError(f"{path} is not a teacher file: no {HEADER_KEY!r} entry")
    try:
        header = json.loads(arrays.pop(HEADER_KEY).tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable header ({error})") from None
    if header.get("format") != FILE_FORMAT:
        raise ValueError(f"{path} holds format {header.get('format')!r}, not {FILE_FORMAT}")
    module = PatchNet(
        layers=layers_from_json(header["layers"]),
        patch_size=int(header["patch_size"]),
        out_dim=int(header["out_dim"]),
    )
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
    variables = flax.traverse_util.unflatten_dict(
        {name: value.astype(np.float32) for name, value in found.items()}, sep="/"
    )
    return module, variables, header


def install_teacher(path: str | os.PathLike, name: str) -> Path:
    """Check a teacher file and copy it to the teachers dir as ``name`` (then
    ``load_teacher(name)`` finds it)."""
    if not name or os.sep in name or name.startswith("."):
        raise ValueError(f"a teacher name is a plain file stem, got {name!r}")
    read_teacher_file(path)
    target = teachers_dir() / f"{name}{SUFFIX}"
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(path, temporary)
    os.replace(temporary, target)
    return target
