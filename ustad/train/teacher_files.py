"""Teachers as files, found by name: the one module that loads a teacher.

A teacher workdir (checkpoints, metrics) is the trainer's business; to hand a teacher to someone
else, :func:`export_teacher` writes one ``<name>.teacher.npz``: T̂'s parameters (float32, or
float16 to halve the size), the decoder D (so that distillation can be measured and training
continued from the file), and a JSON header (format version, p, d, layer table, input channels,
P and how it was fed, steps trained, the training config). Loading checks the format, every
parameter's name and shape against the network the header describes, and that all values are
finite, so a wrong or damaged file fails with the key at fault. Files are plain NumPy archives
read with ``allow_pickle=False``.

Everywhere ustad takes a teacher (:func:`load_teacher`, ``--config.teacher_workdir`` of the
students and paper configs), it takes a workdir, such a file, or a *name*. A name is looked up
first in the user's teachers dir (``$USTAD_TEACHERS`` or ``~/.cache/ustad/teachers``, where
:func:`install_teacher` copies files) and then among the teachers shipped inside the package
(``ustad/teachers/``, listed with their SHA-256 in its ``MANIFEST.json``, checked on load).
:func:`list_teachers` lists both. The trainer (:mod:`ustad.train.teacher`) imports this module,
never the other way round.
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

__all__ = [
    "CHECKPOINT_SUBDIR",
    "FILE_FORMAT",
    "FORMAT",
    "export_teacher",
    "install_teacher",
    "list_teachers",
    "load_decoder",
    "load_teacher",
    "read_teacher_file",
    "resolve_teacher",
    "ship_teacher",
    "shipped_dir",
    "teachers_dir",
    "write_teacher_file",
]

CHECKPOINT_SUBDIR = "checkpoints"
FORMAT = "ustad.teacher/1"  # a teacher workdir's checkpoint metadata

FILE_FORMAT = "ustad-teacher-file/1"
SUFFIX = ".teacher.npz"
HEADER_KEY = "__header__"
PARAM_PREFIX = "params/"
DECODER_PREFIX = "decoder/"
MANIFEST = "MANIFEST.json"
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
    """Where installed teachers live: ``$USTAD_TEACHERS`` or ``~/.cache/ustad/teachers``."""
    root = os.environ.get("USTAD_TEACHERS")
    return Path(root) if root else Path.home() / ".cache" / "ustad" / "teachers"


def shipped_dir() -> Path:
    """The teachers that ship inside the package (``ustad/teachers/``)."""
    return Path(__file__).resolve().parents[1] / "teachers"


def _manifest() -> dict:
    path = shipped_dir() / MANIFEST
    if not path.exists():
        return {}
    return {entry["name"]: entry for entry in json.loads(path.read_text())["teachers"]}


# ---------------------------------------------------------------------------------------------
# Workdirs.


def _restore_workdir(workdir: Path):
    from ustad.checkpointing import Checkpointer

    directory = workdir / CHECKPOINT_SUBDIR
    with Checkpointer(directory) as checkpointer:
        restored = checkpointer.restore_latest()
    if restored is None:
        raise FileNotFoundError(
            f"no teacher checkpoint in {directory}; train one with `ustad train-teacher`"
        )
    step, state, meta = restored
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory} holds a {meta.get('format')!r} checkpoint, not {FORMAT}")
    return step, state, meta


def load_teacher(
    workdir: str | os.PathLike, *, allow_unfinished: bool = False
) -> tuple[PatchNet, dict, dict]:
    """T̂ from the newest checkpoint of a teacher workdir, a teacher file, or a name.

    Args:
      workdir: the ``--workdir`` of :func:`ustad.train.teacher.train_and_evaluate`; or a file
        written by :func:`export_teacher`; or a name (:func:`resolve_teacher`).
      allow_unfinished: accept a run that stopped before its last step.

    Returns:
      ``(module, variables, metadata)``: ``module.apply(variables, patches [N, p, p, C])`` gives
      ``[N, d]``; ``metadata`` has ``patch_size, out_dim, layers, channels, backbone,
      backbone_input, step, total_steps, config`` and more.
    """
    source = resolve_teacher(workdir)
    if source.is_file():
        return read_teacher_file(source, sha256=_shipped_sha256(source))
    step, state, meta = _restore_workdir(source)
    if step < meta["total_steps"] and not allow_unfinished:
        raise ValueError(
            f"the teacher in {workdir} stopped at step {step} of {meta['total_steps']}; resume "
            f"its training or pass allow_unfinished=True"
        )
    module = PatchNet(
        layers=layers_from_json(meta["layers"]),
        patch_size=int(meta["patch_size"]),
        out_dim=int(meta["out_dim"]),
    )
    variables = jax.tree.map(np.asarray, state["params"]["teacher"])
    return module, variables, dict(meta, step=step)


def load_decoder(name_or_path: str | os.PathLike) -> dict | None:
    """The distillation decoder D of a teacher workdir, file or name.

    Returns:
      ``{"kernel": [d, F], "bias": [F]}`` float32 (P's feature ≈ ``T̂(p) @ kernel + bias``), or
      ``None`` for a file exported without it.
    """
    source = resolve_teacher(name_or_path)
    if source.is_file():
        arrays = _read_arrays(source)
        found = {
            k[len(DECODER_PREFIX) :]: v.astype(np.float32)
            for k, v in arrays.items()
            if k.startswith(DECODER_PREFIX)
        }
        return found or None
    _, state, _ = _restore_workdir(source)
    decoder = state["params"]["decoder"]["params"]
    return {"kernel": np.asarray(decoder["kernel"]), "bias": np.asarray(decoder["bias"])}


# ---------------------------------------------------------------------------------------------
# Files.


def export_teacher(
    workdir: str | os.PathLike,
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    allow_unfinished: bool = False,
    with_decoder: bool = True,
) -> dict:
    """Write the teacher of ``workdir`` to one file.

    Args:
      workdir: a :func:`ustad.train.teacher.train_and_evaluate` workdir.
      path: the file to write (``.teacher.npz`` is the convention); written atomically.
      dtype: ``"float32"`` or ``"float16"`` for the stored parameters (loaded as float32).
      allow_unfinished: export a run that stopped before its last step (the header records
        the step it reached).
      with_decoder: store D too (F·(d + 1) more values).

    Returns:
      ``{"path", "bytes", "sha256", "parameters"}``.
    """
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    workdir = Path(workdir)
    if not (workdir / CHECKPOINT_SUBDIR).is_dir():
        raise FileNotFoundError(f"{workdir} is not a teacher workdir (no {CHECKPOINT_SUBDIR}/)")
    step, state, meta = _restore_workdir(workdir)
    if step < meta["total_steps"] and not allow_unfinished:
        raise ValueError(
            f"the teacher in {workdir} stopped at step {step} of {meta['total_steps']}; resume "
            f"its training or pass allow_unfinished=True"
        )
    decoder = state["params"]["decoder"]["params"] if with_decoder else None
    return write_teacher_file(
        path, state["params"]["teacher"], dict(meta, step=step), dtype=dtype, decoder=decoder
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


def resolve_teacher(name_or_path: str | os.PathLike) -> Path:
    """A workdir or file as given; else a name: ``<teachers dir>/<name>.teacher.npz`` (the
    user's own, which win), then the shipped ``ustad/teachers/<name>.teacher.npz``."""
    path = Path(name_or_path)
    if path.exists():
        return path
    if os.sep not in str(name_or_path):
        for folder in (teachers_dir(), shipped_dir()):
            named = folder / f"{name_or_path}{SUFFIX}"
            if named.exists():
                return named
    available = sorted(entry["name"] for entry in list_teachers())
    raise FileNotFoundError(
        f"no teacher {str(name_or_path)!r}: not a workdir or file, and not a name in "
        f"{teachers_dir()} (set $USTAD_TEACHERS) or among the shipped teachers (names: "
        f"{available or 'none'}). Train one with `ustad train-teacher`, or export one with "
        f"scripts/export_teacher.py"
    )


def _shipped_sha256(path: Path) -> str | None:
    """The manifest's SHA-256 for a shipped file (so a damaged install fails loudly)."""
    if path.resolve().parent != shipped_dir():
        return None
    entry = _manifest().get(path.name[: -len(SUFFIX)])
    return entry["sha256"] if entry else None


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


def list_teachers() -> list[dict]:
    """Every teacher loadable by name: the user's installed ones, then the shipped ones.

    Returns:
      One dict per name (an installed file hides a shipped one of the same name): ``name,
      origin`` (``"installed"`` or ``"shipped"``), ``path, bytes, patch_size, out_dim, widths,
      steps, source`` (the photos it was distilled on), ``backbone``, and for shipped teachers
      ``sha256`` and the manifest's probe figures. A file that cannot be read is listed with an
      ``error`` instead of its header fields.
    """
    manifest = _manifest()
    found: dict[str, dict] = {}
    for origin, folder in (("installed", teachers_dir()), ("shipped", shipped_dir())):
        for path in sorted(folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []:
            name = path.name[: -len(SUFFIX)]
            if name in found:
                continue
            entry = {"name": name, "origin": origin, "path": str(path)}
            entry["bytes"] = path.stat().st_size
            try:
                with np.load(path, allow_pickle=False) as archive:
                    header = _read_header(path, {HEADER_KEY: archive[HEADER_KEY]})
            except (ValueError, KeyError, OSError) as error:
                entry["error"] = str(error)
            else:
                entry.update(
                    patch_size=header["patch_size"],
                    out_dim=header["out_dim"],
                    widths=header.get("config", {}).get("widths"),
                    steps=header.get("step"),
                    source=header.get("source"),
                    backbone=header.get("backbone"),
                )
            if origin == "shipped" and name in manifest:
                entry.update({k: v for k, v in manifest[name].items() if k not in entry})
            found[name] = entry
    return list(found.values())


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
    arrays = _read_arrays(path, sha256)
    header = _read_header(path, arrays)
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


def ship_teacher(
    workdir: str | os.PathLike,
    name: str,
    *,
    allow_unfinished: bool = False,
    extra: dict | None = None,
) -> dict:
    """Maintainers: export ``workdir`` as a shipped float16 teacher and record it in the
    manifest (replacing an entry of the same name).

    Args:
      workdir: a teacher workdir.
      name: the name users load it by (e.g. ``"p33"``, ``"p33_small"``).
      allow_unfinished: ship a run that stopped early (its step is recorded).
      extra: more manifest fields (wall time, device, probe figures).

    Returns:
      The manifest entry: ``name, file, sha256, bytes, patch_size, out_dim, widths, steps,
      source, backbone, backbone_input`` and ``extra``.
    """
    if not name or os.sep in name or name.startswith("."):
        raise ValueError(f"a teacher name is a plain file stem, got {name!r}")
    folder = shipped_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}{SUFFIX}"
    record = export_teacher(workdir, path, dtype="float16", allow_unfinished=allow_unfinished)
    _, _, header = read_teacher_file(path, sha256=record["sha256"])
    entry = {
        "name": name,
        "file": path.name,
        "sha256": record["sha256"],
        "bytes": record["bytes"],
        "parameters": record["parameters"],
        "patch_size": header["patch_size"],
        "out_dim": header["out_dim"],
        "widths": header["config"].get("widths"),
        "steps": header["step"],
        "batch_size": header["config"].get("batch_size"),
        "source": header["source"],
        "backbone": header["backbone"],
        "backbone_input": header["backbone_input"],
        "compactness_mode": header["config"].get("compactness_mode"),
        "lambda_c": header["config"].get("lambda_c"),
    }
    entry.update(extra or {})
    entries = {e["name"]: e for e in _manifest().values()}
    entries[name] = entry
    manifest = {
        "format": "ustad-teachers-manifest/1",
        "teachers": sorted(entries.values(), key=lambda e: e["name"]),
    }
    atomic_write(folder / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return entry
