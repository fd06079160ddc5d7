"""Teachers found by name: the one module that loads a teacher, and the shipped catalogue.

Everywhere ustad takes a teacher (:func:`load_teacher`, ``--config.teacher_workdir`` of the
students and paper configs), it takes a workdir, a teacher file
(:mod:`ustad.uninformed_students.teacher.files`), or a *name*. A name is looked up first in the
user's teachers dir (``$USTAD_TEACHERS`` or ``~/.cache/ustad/teachers``, where
:func:`install_teacher` copies files) and then among the teachers shipped inside the package
(``ustad/teachers/``, listed with their SHA-256 in its ``MANIFEST.json``, checked on load).
:func:`list_teachers` lists both; :func:`export_teacher` turns a workdir into a file and
:func:`ship_teacher` (maintainers) adds one to the package with its manifest entry. The trainer
(:mod:`ustad.uninformed_students.teacher.train`) imports this module, never the other way round.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np

from ustad.checkpointing import CHECKPOINT_SUBDIR, restore_workdir
from ustad.io import atomic_write
from ustad.uninformed_students.nets import PatchNet, layers_from_json
from ustad.uninformed_students.teacher.files import (
    FORMAT,
    read_decoder,
    read_header,
    read_teacher_file,
    write_teacher_file,
)

__all__ = [
    "MANIFEST",
    "SUFFIX",
    "choose_teachers",
    "export_teacher",
    "install_teacher",
    "list_teachers",
    "load_decoder",
    "load_teacher",
    "probe_summary",
    "resolve_teacher",
    "ship_teacher",
    "shipped_dir",
    "teachers_dir",
    "training_minutes",
]


SUFFIX = ".teacher.npz"


MANIFEST = "MANIFEST.json"


def teachers_dir() -> Path:
    """Where installed teachers live: ``$USTAD_TEACHERS`` or ``~/.cache/ustad/teachers``."""
    root = os.environ.get("USTAD_TEACHERS")
    return Path(root) if root else Path.home() / ".cache" / "ustad" / "teachers"


def shipped_dir() -> Path:
    """The teachers that ship inside the package (``ustad/teachers/``)."""
    return Path(__file__).resolve().parents[2] / "teachers"


def _manifest() -> dict:
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
        f"`ustad teachers export`"
    )


def _shipped_sha256(path: Path) -> str | None:
    """The manifest's SHA-256 for a shipped file (so a damaged install fails loudly)."""
    if path.resolve().parent != shipped_dir():
        return None
    entry = _manifest().get(path.name[: -len(SUFFIX)])
    return entry["sha256"] if entry else None


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
            found[name] = entry
    return list(found.values())


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


def training_minutes(workdir: str | os.PathLike) -> float:
    """Wall minutes a teacher workdir trained for, from its ``metrics.jsonl``: the first record's
    steps at its rate, then each interval at the rate logged at its end (a run resumed after a
    stop is counted by its steps, not by the gap between the sessions)."""
    text = (Path(workdir) / "metrics.jsonl").read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    first = records[0]
    seconds = first["step"] / first["steps_per_s"]
    for before, after in zip(records, records[1:], strict=False):
        seconds += (after["step"] - before["step"]) / after["steps_per_s"]
    return round(seconds / 60, 1)


def probe_summary(lines: list[dict], source: str) -> dict:
    """The manifest's probe figures of one teacher, per dataset.

    Args:
      lines: ``benchmarks/teacher_quality.py`` records.
      source: the teacher source whose lines count (a workdir or snapshot file).

    Returns:
      ``{dataset: {"descriptor_probe": {au_pro, pixel_auroc, image_auroc}, "student_probe":
      …, "r2_decoder", "mean_abs_offdiag_corr"}}`` from the σ = 4 smoothed figures, with the
      probes a line holds.
    """
    out = {}
    for line in lines:
        if line["teacher"]["source"] != source:
            continue
        entry = {}
        for probe in ("descriptor", "student"):
            if probe in line:
                figures = line[probe]["figures"]["smoothed_sigma4"]
                entry[f"{probe}_probe"] = {
                    k: figures[k] for k in ("au_pro", "pixel_auroc", "image_auroc")
                }
        if "distill" in line:
            figures = line["distill"]["figures"]
            entry["r2_decoder"] = figures["r2_decoder"]
            entry["mean_abs_offdiag_corr"] = figures["mean_abs_offdiag_corr"]
        out[line["dataset"]] = entry
    return out
