"""Shipping teachers with ustad (maintainers): a finished teacher run becomes a float16 file in
``ustad/teachers/`` with its manifest entry (SHA-256, training record, probe figures).
``benchmarks/ship_teachers.py`` drives it; users load shipped teachers through
:mod:`ustad.uninformed_students.teacher.catalog`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ustad.io import atomic_write
from ustad.uninformed_students.teacher import catalog
from ustad.uninformed_students.teacher.files import read_teacher_file


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
      source, backbone, backbone_input``, ``recipe`` (:func:`recipe`) and ``extra``.
    """
    if not name or os.sep in name or name.startswith("."):
        raise ValueError(f"a teacher name is a plain file stem, got {name!r}")
    folder = catalog.shipped_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}{catalog.SUFFIX}"
    record = catalog.export_teacher(
        workdir, path, dtype="float16", allow_unfinished=allow_unfinished
    )
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
        "recipe": recipe(header),
    }
    entry.update(extra or {})
    entries = {e["name"]: e for e in catalog.read_manifest().values()}
    entries[name] = entry
    manifest = {
        "format": "ustad-teachers-manifest/1",
        "teachers": sorted(entries.values(), key=lambda e: e["name"]),
    }
    atomic_write(folder / catalog.MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return entry


def add_recipes() -> list[str]:
    """Maintainers: give every manifest entry that lacks it the ``recipe`` of its teacher, read
    from the shipped file's header (its SHA-256 checked): entries written before recipes were
    recorded. Files are not touched. Returns the names given a recipe."""
    folder = catalog.shipped_dir()
    entries = catalog.read_manifest()
    added = []
    for name, entry in entries.items():
        if "recipe" in entry:
            continue
        _, _, header = read_teacher_file(folder / entry["file"], sha256=entry["sha256"])
        entry["recipe"] = recipe(header)
        added.append(name)
    if added:
        manifest = {
            "format": "ustad-teachers-manifest/1",
            "teachers": sorted(entries.values(), key=lambda e: e["name"]),
        }
        atomic_write(folder / catalog.MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return added


def recipe(header: dict) -> dict:
    """How a teacher was trained, from its file header: the target (issue 23; teachers written
    before target options distilled P's pooled head), P's input, D's initialisation and the
    optimisation."""
    config = header.get("config") or {}
    target = header.get("target") or {}
    return {
        "target": target.get("name", "head"),
        "target_dim": target.get("dim", header.get("feature_dim")),
        "target_dead_dims": target.get("dead_dims"),
        "backbone_input_size": header.get("backbone_input_size") or None,
        "init_decoder": config.get("init_decoder", "mean"),
        "learning_rate": config.get("learning_rate"),
        "lambda_k": config.get("lambda_k"),
        "lambda_m": config.get("lambda_m"),
        "lambda_c": config.get("lambda_c"),
        "steps": header.get("step"),
    }


def training_minutes(workdir: str | os.PathLike) -> float:
    """Wall minutes a teacher workdir trained for, from its ``metrics.jsonl``: the first record's
    steps at its rate, then each interval at the rate logged at its end (a run resumed after a
    stop is counted by its steps, not by the gap between the sessions). A run continued from
    another teacher's file (``--config.init_from``) logs its first record at that file's step
    plus one logging interval: the first record counts at most one interval (the step gap to the
    second record), not the steps the file had already trained."""
    text = (Path(workdir) / "metrics.jsonl").read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    first = records[0]
    first_steps = first["step"]
    if len(records) > 1:
        first_steps = min(first_steps, records[1]["step"] - first["step"])
    seconds = first_steps / first["steps_per_s"]
    for before, after in zip(records, records[1:], strict=False):
        seconds += (after["step"] - before["step"]) / after["steps_per_s"]
    return round(seconds / 60, 1)


def probe_summary(lines: list[dict], source: str | list[str]) -> dict:
    """The manifest's probe figures of one teacher, per dataset.

    Args:
      lines: ``benchmarks/teacher_quality.py`` records.
      source: the teacher source whose lines count (a workdir or snapshot file), or several
        (the same teacher probed under different paths, e.g. its snapshot file for the grid
        probe and a copy of it for the students' verdict); a later line adds to an earlier
        one of the same dataset.

    Returns:
      ``{dataset: {"descriptor_probe": {au_pro, pixel_auroc, image_auroc}, "grid_probe": …,
      "student_probe": …, "student_probe_updates", "r2_decoder", "mean_abs_offdiag_corr"}}``
      from the σ = 4 smoothed figures, with the probes a line holds (``student_probe_updates``:
      how many updates the probe's students trained, e.g. the ``cpu`` preset's verdict).
    """
    sources = {source} if isinstance(source, str) else set(source)
    out = {}
    for line in lines:
        if line["teacher"]["source"] not in sources:
            continue
        entry = out.setdefault(line["dataset"], {})
        for probe in ("descriptor", "grid", "student"):
            if probe in line:
                figures = line[probe]["figures"]["smoothed_sigma4"]
                entry[f"{probe}_probe"] = {
                    k: figures[k] for k in ("au_pro", "pixel_auroc", "image_auroc")
                }
        steps = ((line.get("student") or {}).get("settings") or {}).get("steps")
        if steps is not None:
            entry["student_probe_updates"] = steps
        if "distill" in line:
            figures = line["distill"]["figures"]
            entry["r2_decoder"] = figures["r2_decoder"]
            entry["mean_abs_offdiag_corr"] = figures["mean_abs_offdiag_corr"]
    return out
