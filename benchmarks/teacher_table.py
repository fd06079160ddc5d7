"""The RESULTS.md teacher table from the raw lines of ``benchmarks/teacher_quality.py``.

    python -m benchmarks.teacher_table benchmarks/results/teacher_probes_cpu.jsonl \\
        --labels 'runs/choices/p33s_signed=signed λc=1'

One row per (teacher, dataset): what the teacher is (label or source, p, widths, d, steps), the
probes' AU-PRO@0.3 and pixel AUROC (maps smoothed with σ = 4, as the probes report them; the
student probe also raw), distillation R² on held-out photos and the mean |off-diagonal
correlation| of the descriptor dimensions. Every figure is read from a raw line.
"""

from __future__ import annotations

import json

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("labels", [], "source=label pairs naming the rows")


def _pair(block: dict | None, kind: str = "smoothed_sigma4") -> str:
    if not block:
        return "–"
    figures = block["figures"].get(kind) or {}
    if not figures:
        return "–"
    return f"{figures['au_pro']:.3f} / {figures['pixel_auroc']:.3f}"


def rows(lines: list[dict], labels: dict[str, str]) -> list[str]:
    out = [
        "| teacher | p | width | d | steps | data | descriptor probe σ4 | student probe σ4 | "
        "student raw | R² (decoder) | mean abs corr |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for line in lines:
        teacher = line["teacher"]
        distill = (line.get("distill") or {}).get("figures", {})
        r2 = distill.get("r2_decoder")
        corr = distill.get("mean_abs_offdiag_corr")
        out.append(
            f"| {labels.get(teacher['source'], teacher['source'])} | {teacher['p']} | "
            f"{teacher['width_fraction']} | {teacher['d']} | {teacher.get('steps') or 0} | "
            f"{line['dataset']} | {_pair(line.get('descriptor'))} | {_pair(line.get('student'))} | "
            f"{_pair(line.get('student'), 'raw')} | "
            f"{'–' if r2 is None else f'{r2:.3f}'} | {'–' if corr is None else f'{corr:.3f}'} |"
        )
    return out


def main(argv):
    labels = dict(item.split("=", 1) for item in FLAGS.labels)
    lines = []
    for path in argv[1:]:
        with open(path) as f:
            lines += [json.loads(text) for text in f if text.strip()]
    print("\n".join(rows(lines, labels)))


if __name__ == "__main__":
    app.run(main)
