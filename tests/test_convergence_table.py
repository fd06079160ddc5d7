"""The convergence table and plot read the JSON lines benchmarks/convergence.py wrote."""

import json

import pytest

from ustad.evaluation.tables import convergence_table, plot_convergence


def _record(label, step, train_s, au_pro, **settings):
    figures = {"au_pro": au_pro, "pixel_auroc": 0.9, "image_auroc": 0.95}
    return {
        "benchmark": "convergence",
        "label": label,
        "teacher": "/x/p17_small.teacher.npz",
        "image_size": [128, 128],
        "step": step,
        "epochs_seen": step / 100,
        "train_s": train_s,
        "load_avg": 2.0,
        "settings": {
            "batch_size": 2,
            "learning_rate": 1e-3,
            "lr_schedule": "cosine",
            "warmup_steps": 10,
            "crop_size": 0,
            **settings,
        },  # fmt: skip
        "figures": {"raw": figures, "smoothed_sigma4": dict(figures, au_pro=au_pro + 0.05)},
    }


def test_table_reads_points_at_minutes_and_marks_minutes_a_run_never_reached(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [
        _record("long", 100, 100.0, 0.5),
        _record("long", 200, 400.0, 0.7),
        _record("long", 300, 700.0, 0.8),
        _record("short", 50, 150.0, 0.6, crop_size=64),
        {"benchmark": "other"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    text = convergence_table(path, minutes=(3, 6, 10))
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()[2:]}
    assert set(rows) == {"long", "short"}
    cells = [c.strip() for c in rows["long"].split("|")[1:-1]]
    # The last evaluation at or before 3, 6 and 10 minutes (180, 360, 600 s).
    assert cells[4:7] == ["0.500", "0.500", "0.700"]
    assert cells[10:12] == ["0.800", "0.850"]  # last point: raw and smoothed
    short = [c.strip() for c in rows["short"].split("|")[1:-1]]
    assert short[3].startswith("crops 64² × 2") and short[5:7] == ["–", "–"]
    png = plot_convergence(path, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000 and png == tmp_path / "c.png"
    with pytest.raises(ValueError, match="no convergence lines"):
        convergence_table(path, labels=["missing"])
