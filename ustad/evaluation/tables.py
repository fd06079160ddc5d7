"""Markdown tables and plots of benchmark JSON lines.

:func:`convergence_table` and :func:`plot_convergence` read the lines of
``benchmarks/convergence.py`` (one per evaluation of a training run: ``label``, ``step``,
``train_s``, ``settings``, ``figures`` ``{"raw": {au_pro, pixel_auroc, image_auroc},
"smoothed_sigma<σ>": …}``) and show AU-PRO against updates and against training minutes.
"""

from __future__ import annotations

import io
import json
import os

from ustad.io import atomic_write

__all__ = ["convergence_table", "plot_convergence", "read_convergence"]


def read_convergence(path, labels=()) -> dict[str, list[dict]]:
    """The convergence lines of a JSON-lines file by label, each sorted by step."""
    runs: dict[str, list[dict]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                if rec.get("benchmark") == "convergence" and (not labels or rec["label"] in labels):
                    runs.setdefault(rec["label"], []).append(rec)
    if not runs:
        which = f" for {labels}" if labels else ""
        raise ValueError(f"{path} holds no convergence lines{which}")
    return {k: sorted(v, key=lambda r: r["step"]) for k, v in runs.items()}


def _recipe(settings: dict) -> str:
    if settings.get("crop_size"):
        data = f"crops {settings['crop_size']}² × {settings['batch_size']}"
    else:
        data = f"whole images × {settings['batch_size']}"
    rate = f"lr {settings['learning_rate']:g} {settings.get('lr_schedule') or 'constant'}"
    if settings.get("warmup_steps"):
        rate += f" (warm-up {settings['warmup_steps']})"
    return f"{data}, {rate}"


def convergence_table(path, labels=(), minutes=(3, 6, 10)) -> str:
    """One row per run: its recipe, AU-PRO (raw maps) at the given training minutes (the last
    evaluation before each), and the last point's figures, raw and smoothed."""
    runs = read_convergence(path, labels)
    head = (
        "| run | teacher | size | recipe | "
        + " | ".join(f"AU-PRO @{m:g} min" for m in minutes)
        + " | last: steps | epochs | min | AU-PRO | AU-PRO σ4 | pixel AUROC | image AUROC | load |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label, recs in runs.items():
        last = recs[-1]
        at = []
        for m in minutes:
            before = [r for r in recs if r["train_s"] <= 60 * m]
            reached = last["train_s"] >= 60 * m  # a shorter run has no figure at m minutes
            at.append(
                f"{before[-1]['figures']['raw']['au_pro']:.3f}" if before and reached else "–"
            )
        smoothed = next((v for k, v in last["figures"].items() if k.startswith("smoothed")), None)
        teacher = os.path.basename(str(last.get("teacher", ""))).replace(".teacher.npz", "")
        loads = [r["load_avg"] for r in recs if r.get("load_avg", -1) >= 0]
        lines.append(
            f"| {label} | {teacher} | {last['image_size'][0]}² | {_recipe(last['settings'])} | "
            + " | ".join(at)
            + f" | {last['step']} | {last['epochs_seen']:g} | {last['train_s'] / 60:.1f} | "
            f"{last['figures']['raw']['au_pro']:.3f} | "
            f"{smoothed['au_pro'] if smoothed else float('nan'):.3f} | "
            f"{last['figures']['raw']['pixel_auroc']:.3f} | "
            f"{last['figures']['raw']['image_auroc']:.3f} | "
            f"{min(loads):.1f}–{max(loads):.1f} |"
        )
    return "\n".join(lines)


def plot_convergence(path, png=None, labels=()) -> str:
    """AU-PRO of the raw and the smoothed maps against updates and minutes, one line per
    label."""
    from matplotlib.figure import Figure

    runs = read_convergence(path, labels)
    figure = Figure(figsize=(12, 8))
    axes = figure.subplots(2, 2)
    for label, recs in sorted(runs.items()):
        recs = sorted(recs, key=lambda r: r["step"])
        key = next(k for k in recs[-1]["figures"] if k.startswith("smoothed")) if any(
            k.startswith("smoothed") for k in recs[-1]["figures"]) else "raw"  # fmt: skip
        steps = [r["step"] for r in recs]
        minutes = [r["train_s"] / 60 for r in recs]
        for col, x in enumerate((steps, minutes)):
            axes[0, col].plot(x, [r["figures"]["raw"]["au_pro"] for r in recs], "o-", label=label)
            axes[1, col].plot(
                x, [r["figures"][key]["au_pro"] for r in recs], "o-", label=f"{label} ({key})"
            )
    for col, name in enumerate(("student updates (steps)", "training minutes")):
        axes[0, col].set_title(f"AU-PRO@0.3 (raw maps) vs {name}")
        axes[1, col].set_title(f"AU-PRO@0.3 (smoothed maps) vs {name}")
        for row in range(2):
            axes[row, col].set_xlabel(name)
            axes[row, col].grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=7)
    figure.tight_layout()
    png = png or os.path.splitext(path)[0] + ".png"
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    atomic_write(png, buffer.getvalue())
    return png
