"""Teachers found by name: the one module that loads a teacher, and the shipped catalogue.

Everywhere ustad takes a teacher (:func:`load_teacher`, ``--config.teacher_workdir`` of the
students and paper configs), it takes a workdir, a teacher file
(:mod:`ustad.uninformed_students.teacher.files`), or a *name*. A name is looked up first in the
user's teachers dir (``$USTAD_TEACHERS`` or ``~/.cache/ustad/teachers``, where
:func:`install_teacher` copies files) and then among the teachers shipped inside the package
(``ustad/teachers/``, listed with their SHA-256 in its ``MANIFEST.json``, checked on load).
:func:`install_teacher` records each installed file's SHA-256 in ``INSTALLED.json`` beside it
(checked on load too) and refuses a shipped teacher's name unless forced, so that a teacher of
another p or d cannot silently take a shipped one's place; :func:`list_teachers` lists both,
saying which one a name loads; :func:`export_teacher` turns a workdir into a file and
:func:`ship_teacher` (maintainers) adds one to the package with its manifest entry. The trainer
(:mod:`ustad.uninformed_students.teacher.train`) imports this module, never the other way round.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import jax
import numpy as np

from ustad.checkpointing import CHECKPOINT_SUBDIR, restore_workdir
from ustad.io import atomic_write
from ustad.uninformed_students.nets import PatchNet, patch_net_from_record
from ustad.uninformed_students.teacher.files import (
    FORMAT,
    read_decoder,
    read_header,
    read_teacher_file,
    write_teacher_file,
)

logger = logging.getLogger(__name__)

__all__ = [
    "INSTALLED",
    "MANIFEST",
    "SUFFIX",
    "check_install_name",
    "choose_teachers",
    "export_teacher",
    "install_teacher",
    "list_teachers",
    "load_decoder",
    "load_teacher",
    "resolve_teacher",
    "shipped_dir",
    "teachers_dir",
]


SUFFIX = ".teacher.npz"


MANIFEST = "MANIFEST.json"
# In the teachers dir: {name: {"sha256", "source", "replaces_shipped"}} of installed files.
INSTALLED = "INSTALLED.json"


def teachers_dir() -> Path:
    """Where installed teachers live: ``$USTAD_TEACHERS`` or ``~/.cache/ustad/teachers``."""
    root = os.environ.get("USTAD_TEACHERS")
    return Path(root) if root else Path.home() / ".cache" / "ustad" / "teachers"


def shipped_dir() -> Path:
    """The teachers that ship inside the package (``ustad/teachers/``)."""
    return Path(__file__).resolve().parents[2] / "teachers"


def read_manifest() -> dict:
    path = shipped_dir() / MANIFEST
    if not path.exists():
        return {}
    return {entry["name"]: entry for entry in json.loads(path.read_text())["teachers"]}


def _restore_workdir(workdir: Path):
    return restore_workdir(workdir, (FORMAT,), hint="train one with `ustad train-teacher`")


def load_teacher(
    workdir: str | os.PathLike, *, allow_unfinished: bool = False
) -> tuple[PatchNet, dict, dict]:
    """T̂ from the newest checkpoint of a teacher workdir, a teacher file, or a name.

    Args:
      workdir: the ``--workdir`` of
        :func:`ustad.uninformed_students.teacher.train.train_and_evaluate`; or a file written
        by :func:`export_teacher`; or a name (:func:`resolve_teacher`).
      allow_unfinished: accept a run that stopped before its last step.

    Returns:
      ``(module, variables, metadata)``: ``module.apply(variables, patches [N, p, p, C])`` gives
      ``[N, d]``; ``metadata`` has ``patch_size, out_dim, layers, channels, backbone,
      backbone_input, step, total_steps, config`` and more.
    """
    source = resolve_teacher(workdir)
    if source.is_file():
        return read_teacher_file(source, sha256=_expected_sha256(source))
    step, state, meta = _restore_workdir(source)
    if step < meta["total_steps"] and not allow_unfinished:
        raise ValueError(
            f"the teacher in {workdir} stopped at step {step} of {meta['total_steps']}; resume "
            f"its training or pass allow_unfinished=True"
        )
    module = patch_net_from_record(meta)
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
        return read_decoder(source)
    _, state, _ = _restore_workdir(source)
    decoder = state["params"]["decoder"]["params"]
    return {"kernel": np.asarray(decoder["kernel"]), "bias": np.asarray(decoder["bias"])}


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
      workdir: a :func:`ustad.uninformed_students.teacher.train.train_and_evaluate`
        workdir.
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


def resolve_teacher(name_or_path: str | os.PathLike) -> Path:
    """A workdir or file as given; else a name: ``<teachers dir>/<name>.teacher.npz`` (the
    user's own), then the shipped ``ustad/teachers/<name>.teacher.npz``.

    An installed file of a shipped teacher's name is used only when it was installed with
    ``force=True`` (:func:`install_teacher`); otherwise the name is ambiguous and refused.

    Raises:
      FileNotFoundError: no such workdir, file or name; the message lists the names and says
        how to train or pass a teacher.
      ValueError: an installed file hides a shipped teacher without having been forced to.
    """
    path = Path(name_or_path)
    if path.exists():
        return path
    if os.sep not in str(name_or_path):
        installed = teachers_dir() / f"{name_or_path}{SUFFIX}"
        shipped = shipped_dir() / f"{name_or_path}{SUFFIX}"
        if installed.exists():
            record = _installed_records().get(str(name_or_path), {})
            if shipped.exists() and not record.get("replaces_shipped"):
                raise ValueError(
                    f"teacher name {str(name_or_path)!r} is both shipped with ustad and installed "
                    f"in {installed} (not with --force): which one is meant is unclear. Rename "
                    f"the installed file, or install it again with `ustad teachers install "
                    f"--file={installed} --name={name_or_path} --force` to make it win"
                )
            return installed
        if shipped.exists():
            return shipped
    raise FileNotFoundError(_missing_teacher_message(str(name_or_path)))


def _missing_teacher_message(name: str) -> str:
    """Which teachers exist, and how to use a shipped one or train one and pass it on."""
    available = sorted({entry["name"] for entry in list_teachers() if "error" not in entry})
    wanted = re.fullmatch(r"(p(?:17|33|65))(_small)?", name)
    preset = wanted.group(0) if wanted else "<p17|p33|p65>"
    folder = f"runs/teacher_{wanted.group(0) if wanted else 'p<p>'}"
    use = "Train"
    if wanted and not wanted.group(2) and f"{wanted.group(1)}_small" in available:
        small = f"{wanted.group(1)}_small"
        use = f"Use the shipped {small} (--config=configs/students.py:{small}), or train"
    return (
        f"no teacher {name!r}: not a workdir or file, and not a name in {teachers_dir()} (set "
        f"$USTAD_TEACHERS) or among the shipped teachers (names: "
        f"{', '.join(available) or 'none'}; `ustad teachers` lists them). {use} one with `ustad "
        f"train-teacher --config=configs/teacher.py:{preset} --workdir={folder}` and pass "
        f"--config.teacher_workdir={folder}"
    )


def _expected_sha256(path: Path) -> str | None:
    """The SHA-256 a named file must have: the manifest's for a shipped file, the one recorded
    at install for an installed one (so a damaged or swapped file fails loudly)."""
    folder = path.resolve().parent
    name = path.name[: -len(SUFFIX)] if path.name.endswith(SUFFIX) else None
    if name is None:
        return None
    if folder == shipped_dir().resolve():
        entry = read_manifest().get(name)
        return entry["sha256"] if entry else None
    if folder == teachers_dir().resolve():
        return _installed_records().get(name, {}).get("sha256")
    return None


def _installed_records() -> dict:
    path = teachers_dir() / INSTALLED
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} cannot be read ({error}); delete it and reinstall") from error


def list_teachers() -> list[dict]:
    """Every teacher loadable by name: the user's installed ones, then the shipped ones.

    Returns:
      One dict per file: ``name, origin`` (``"installed"`` or ``"shipped"``), ``active``
      (whether the name loads this file: an installed file of a shipped name is listed beside
      the shipped one, and wins only when installed with ``force``; ``status`` says why not),
      ``path, bytes, patch_size, out_dim, widths, steps, source`` (the photos it was distilled
      on), ``backbone``, and for shipped teachers ``sha256`` and the manifest's probe figures.
      A file that cannot be read is listed with an ``error`` instead of its header fields.
    """
    manifest, records = read_manifest(), _installed_records()
    found: list[dict] = []
    for origin, folder in (("installed", teachers_dir()), ("shipped", shipped_dir())):
        for path in sorted(folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []:
            name = path.name[: -len(SUFFIX)]
            entry = {"name": name, "origin": origin, "path": str(path), "active": True}
            entry["bytes"] = path.stat().st_size
            try:
                header = read_header(path)
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
            found.append(entry)
    installed = {e["name"]: e for e in found if e["origin"] == "installed"}
    for entry in found:
        twin = installed.get(entry["name"]) if entry["origin"] == "shipped" else None
        if twin is None:
            continue
        if records.get(entry["name"], {}).get("replaces_shipped"):
            entry["active"], entry["status"] = False, "hidden by the installed one"
        else:
            for e in (entry, twin):
                e["active"], e["status"] = False, "ambiguous: installed without --force"
    return found


def check_install_name(name: str, *, force: bool = False) -> None:
    """``ValueError`` unless ``name`` is a plain file stem, and not a shipped teacher's name
    (unless ``force``): checked before anything is exported or copied."""
    if not name or os.sep in name or name.startswith("."):
        raise ValueError(f"a teacher name is a plain file stem, got {name!r}")
    if (shipped_dir() / f"{name}{SUFFIX}").exists() and not force:
        raise ValueError(
            f"{name!r} is the name of a teacher shipped with ustad; installing another file "
            f"under it would replace the shipped one wherever {name!r} is loaded: choose "
            f"another name (e.g. my_{name}), or pass --force to replace it"
        )


def install_teacher(path: str | os.PathLike, name: str, *, force: bool = False) -> Path:
    """Check a teacher file and copy it to the teachers dir as ``name`` (then
    ``load_teacher(name)`` finds it), recording its SHA-256 (checked on every load).

    Args:
      path: a ``.teacher.npz`` file.
      name: the name to load it by (a plain file stem).
      force: install under a shipped teacher's name, which the installed file then replaces
        wherever that name is loaded.

    Raises:
      ValueError: a bad name, a bad file, or a shipped teacher's name without ``force``.
    """
    check_install_name(name, force=force)
    _, _, header = read_teacher_file(path)
    shipped = shipped_dir() / f"{name}{SUFFIX}"
    target = teachers_dir() / f"{name}{SUFFIX}"
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(path, temporary)
    sha256 = hashlib.sha256(temporary.read_bytes()).hexdigest()
    records = _installed_records()
    records[name] = {
        "sha256": sha256,
        "source": str(Path(path).resolve()),
        "patch_size": header["patch_size"],
        "out_dim": header["out_dim"],
        "replaces_shipped": bool(shipped.exists()),
    }
    os.replace(temporary, target)
    atomic_write(teachers_dir() / INSTALLED, (json.dumps(records, indent=1) + "\n").encode())
    if shipped.exists():
        logger.warning("installed %s as %r: it replaces the shipped %r wherever that name is "
                       "loaded", path, name, name)  # fmt: skip
    return target


def choose_teachers(patch_sizes, spec: str = "auto") -> dict[int, str]:
    """A loadable teacher name per receptive field.

    Args:
      patch_sizes: the p's that need a teacher.
      spec: ``"auto"`` (``p<p>``, the full-width teacher, where there is one, else
        ``p<p>_small``), ``"small"`` (``p<p>_small`` always), or explicit ``"17=p17_small,33=p33"``
        items (p's not named fall back to ``p<p>_small``).

    Returns:
      ``{p: name}``.

    Raises:
      FileNotFoundError: no teacher for some p.
    """
    names = {t["name"] for t in list_teachers() if "error" not in t}
    overrides = {}
    if spec not in ("auto", "small"):
        for item in spec.split(","):
            p, _, name = item.partition("=")
            overrides[int(p)] = name
    chosen = {}
    for p in patch_sizes:
        if p in overrides:
            chosen[p] = overrides[p]
        elif spec == "auto" and f"p{p}" in names:
            chosen[p] = f"p{p}"
        elif f"p{p}_small" in names:
            chosen[p] = f"p{p}_small"
        else:
            raise FileNotFoundError(f"no teacher for p={p} (ustad teachers lists: {sorted(names)})")
    return chosen
