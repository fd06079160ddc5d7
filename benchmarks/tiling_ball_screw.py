"""Large images: resize vs keep-aspect vs tiles on one category, one variant per run; prints
one JSON line (issue 22 item 4, RESULTS.md "Large images").

    flock /tmp/ustad_heavy.lock python benchmarks/tiling_ball_screw.py \\
        --config configs/stfpm.py:cpu --variant tiles --workdir runs/tiling/stfpm_tiles \\
        --config.data_dir=../shared/data/ball_screw --config.category=ball_screw \\
        >> benchmarks/results/tiling_cpu.jsonl

Variants (the rest of the config, schedule included, is the same, so the three runs take the
same number of updates of the same batch size):

* ``resize``: ``--config.keep_aspect=False``, every image squashed to ``image_size`` (square).
* ``keep_aspect``: ``--config.keep_aspect=True``, the short side to ``image_size``, the long side
  by the same factor (rounded to the network's stride).
* ``tiles``: ``--config.train_tiles=True``, training on random ``image_size`` crops of the
  native-size images; scoring by overlapping tiles at native resolution, stitched
  (``ustad evaluate --tile``).

Every variant is evaluated by ``ustad evaluate --native_size`` at the test images' own size
(1130×460 for ball_screw): the maps of ``resize`` and ``keep_aspect`` are resized back to it,
so all three are measured on the same pixels and masks. Training minutes are the trainer's
run (compilation, held-out calibration included); scoring minutes are the whole evaluate
command (reading, scoring, metrics, report).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import ustad  # noqa: E402,F401  (fast CPU flags before JAX starts)
from benchmarks.common import device_name, emit  # noqa: E402

VARIANTS = {
    "resize": {"keep_aspect": False},
    "keep_aspect": {"keep_aspect": True},
    "tiles": {"train_tiles": True},
}

FLAGS = flags.FLAGS
flags.DEFINE_enum("variant", None, list(VARIANTS), "how large images are handled")
flags.DEFINE_string("workdir", None, "training workdir (a finished run is loaded)")
flags.DEFINE_string("out", None, "evaluate report folder (default <workdir>_eval)")
flags.DEFINE_string(
    "eval_data", None, "category folder to evaluate on (default <data_dir>/<category>)"
)
flags.DEFINE_bool("evaluate_only", False, "the workdir is trained: evaluate it only")
flags.DEFINE_float("tile_overlap", 0.25, "tiles variant: least overlap of neighbouring tiles")
config_flags.DEFINE_config_file("config", "configs/stfpm.py:cpu", "training config")
flags.mark_flags_as_required(["variant", "workdir"])


def main(argv):
    del argv
    from ustad import families
    from ustad.cli import main as cli

    config = FLAGS.config
    with config.unlocked():
        for field, value in VARIANTS[FLAGS.variant].items():
            if field in config or field == "train_tiles":
                config[field] = value
    t0 = time.perf_counter()
    if not FLAGS.evaluate_only:
        families.train(config, FLAGS.workdir)
    train_minutes = (time.perf_counter() - t0) / 60 if not FLAGS.evaluate_only else None
    out = FLAGS.out or f"{FLAGS.workdir.rstrip('/')}_eval"
    data = Path(FLAGS.eval_data or Path(config.data_dir) / config.category)
    command = ["ustad", "evaluate", f"--workdirs={FLAGS.workdir}", f"--data={data}",
               f"--out={out}", "--native_size"]  # fmt: skip
    if FLAGS.variant == "tiles":
        command += ["--tile", f"--tile_overlap={FLAGS.tile_overlap}"]
    t0 = time.perf_counter()
    code = cli.main(command)
    score_minutes = (time.perf_counter() - t0) / 60
    if code != 0:
        raise SystemExit(f"evaluate failed ({code}): {' '.join(command)}")
    metrics = json.loads((Path(out) / "metrics.json").read_text())
    meta = metrics["metadata"]
    from ustad.checkpointing import workdir_metadata

    checkpoint = families.load_models(FLAGS.workdir)[1][0]
    folders = [Path(FLAGS.workdir), *sorted(Path(FLAGS.workdir).glob("p*"))]
    metas = {f.name: workdir_metadata(f) for f in folders if workdir_metadata(f)}
    steps = {name: meta.get("step") for name, meta in metas.items()}
    trainer_minutes = {n: round(m.get("train_seconds", 0) / 60, 2) for n, m in metas.items()}
    emit(
        {
            "benchmark": "tiling_ball_screw",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "device": device_name(),
            "family": families.config_family(config),
            "variant": FLAGS.variant,
            "category": config.category,
            "eval_data": str(data),
            "model_input_size": [int(s) for s in checkpoint.image_size],
            "evaluated_at": meta.get("image_size"),
            "tile": meta.get("tile"),
            "batch_size": int(config.batch_size),
            "train_steps_config": config.get("train_steps", None),
            "scale_train_steps": dict(config.get("scale_train_steps", None) or {}) or None,
            "updates_done": steps,
            "train_minutes": None if train_minutes is None else round(train_minutes, 2),
            "trainer_minutes": trainer_minutes,
            "evaluate_minutes": round(score_minutes, 2),
            "metrics": {row["scale"]: {k: row[k] for k in ("image_auroc", "pixel_auroc",
                                                           "au_pro")} for row in metrics["rows"]},
            "workdir": FLAGS.workdir,
            "report": out,
        }
    )  # fmt: skip


if __name__ == "__main__":
    app.run(main)
