"""Production latency and folder throughput of both families (issue 24 item 4).

One JSON line per measure (``benchmarks/results/latency_cpu.jsonl`` when run on CPU):

* ``batch1``: p50 / p99 / mean milliseconds of one image (batch 1, at the model's training size,
  different random images) after a warm-up, for

  - ``detector``: a loaded detector (``ustad.load_detector(workdir, batch_size=1).score``);
  - ``onnxruntime_cpu`` and ``jax_exported``: the files ``ustad export`` writes, run through
    ``ustad.deploy.load`` (Uninformed Students only: STFPM workdirs cannot be exported yet).

* ``folder``: images per second through :func:`ustad.score_files.score_files` (what
  ``ustad score`` runs once the detector is loaded: reading, scoring, writing maps, masks,
  overlays and ``scores.csv``) on a folder of PNGs at the training size written here, with
  reading and writing in turn (``prefetch=0, write_behind=0``: how ``ustad score`` ran before),
  reading overlapped with scoring (``prefetch=2``) and both overlapped (``prefetch=2,
  write_behind=2``: the default), alternated in the same run (``--overlaps``), with a fixed
  colour scale (a calibrated workdir's: each batch's files are written while the next is scored)
  and/or the run's own (no calibration: overlays drawn after the last image; ``--scales``);
  ``ratio_to_0_0`` is each one's speed-up over the first overlap's median with that scale.
* ``cli``: the whole ``ustad score`` command on that folder in a fresh process (start-up,
  decoding every image once to check it, restore, compile from an empty cache, scoring,
  writing).

Workdirs: ``--stfpm_workdir`` / ``--students_workdir``, or (default) built here with random
weights at the ``cpu`` presets' sizes (speed does not depend on the weights): STFPM's
EfficientNet-Lite0 stages 2/3/5 at 256², M = 1; Uninformed Students p = 17 and p = 33 with the
shipped small teachers and 3 random students each, at 128².

    python -m benchmarks.latency                                   # both families, 1,000 images
    python -m benchmarks.latency --images=40 --repeats=20 --families=students   # a quick look
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from benchmarks.common import device_name, emit

FLAGS = flags.FLAGS
flags.DEFINE_list("families", ["stfpm", "students"], "which families to time")
flags.DEFINE_string("stfpm_workdir", "", "an STFPM workdir (default: random, cpu preset)")
flags.DEFINE_string(
    "students_workdir", "", "a students workdir (default: random p17+p33 small, 128²)"
)
flags.DEFINE_integer("repeats", 200, "timed batch-1 calls per runtime (after the warm-up)")
flags.DEFINE_integer("warmup", 5, "untimed batch-1 calls first")
flags.DEFINE_integer("images", 1000, "images in the scored folder")
flags.DEFINE_integer("batch_size", 8, "the folder's images per jitted call (ustad score's)")
flags.DEFINE_integer("passes", 1, "folder passes per prefetch setting (alternated)")
flags.DEFINE_bool("cli", True, "also time the whole `ustad score` command on the folder")
flags.DEFINE_list(
    "overlaps",
    ["0:0", "2:0", "2:2"],
    "PREFETCH:WRITE_BEHIND pairs of the folder passes: 0:0 reads and writes in turn (ustad score "
    "before), 2:0 reads ahead, 2:2 also writes behind (the default)",
)
flags.DEFINE_list(
    "scales",
    ["calibration"],
    "the overlays' colour scale in the folder passes: 'calibration' (fixed, as with a calibrated "
    "workdir: each batch's files are written as it is scored) and/or 'run' (no calibration: the "
    "run's minimum and maximum, so every overlay is drawn after the last image is scored)",
)
flags.DEFINE_list(
    "runtimes", ["detector", "onnxruntime_cpu", "jax_exported"], "batch-1 runtimes (empty: none)"
)


def stfpm_workdir(folder: Path, size: int = 256) -> Path:
    """A finished STFPM workdir with random weights: the ``cpu`` preset's network (EfficientNet-
    Lite0 stages 2, 3 and 5, M = 1) at ``size``²."""
    from ustad.checkpointing import Checkpointer
    from ustad.stfpm import nets
    from ustad.stfpm.maps import FORMAT

    network = nets.pyramid_from_spec(
        {
            "backbone": "efficientnet_lite0",
            "levels": [2, 3, 5],
            "stages": [
                [3, 1, 1, 16, 1],
                [3, 2, 6, 24, 2],
                [5, 2, 6, 40, 2],
                [3, 2, 6, 80, 3],
                [5, 1, 6, 112, 3],
                [5, 2, 6, 192, 4],
                [3, 1, 6, 320, 1],
            ],  # fmt: skip
            "stem": 32,
            "normalize": True,
            "bn_momentum": 0.9,
        }
    )
    sample = np.zeros((1, 32, 32, 3), np.float32)
    teacher = network.init(jax.random.key(0), sample)
    keys = jax.random.split(jax.random.key(1), 1)  # M = 1, stacked as the trainer stacks
    students = jax.vmap(lambda key: network.init(key, sample))(keys)
    state = jax.tree.map(np.asarray, {"teacher": teacher, "students": students})
    meta = {
        "format": FORMAT,
        "family": "stfpm",
        "network": nets.pyramid_spec(network),
        "levels": ["stage2", "stage3", "stage5"],
        "image_size": [size, size],
        "channels": 3,
        "num_students": 1,
        "score": "error",
        "combination": "product",
        "teacher_source": "random (benchmarks/latency.py)",
        "step": 1,
        "total_steps": 1,
        "score_normalization": [[0.1, 0.1, 0.0, 1e-12]] * 3,
    }
    with Checkpointer(folder / "checkpoints", async_save=False) as checkpointer:
        checkpointer.save(1, state, meta)
    return folder


def students_workdir(folder: Path, size: int = 128, num_students: int = 3) -> Path:
    """A finished multi-scale students workdir with random students: the ``cpu`` preset's p = 17
    and p = 33 with the shipped small teachers, M students each, at ``size``²."""
    from ustad.checkpointing import Checkpointer
    from ustad.uninformed_students.checkpoints import FORMAT
    from ustad.uninformed_students.nets import layers_to_json
    from ustad.uninformed_students.teacher.catalog import load_teacher

    for p in (17, 33):
        network, teacher, _ = load_teacher(f"p{p}_small")
        sample = np.zeros((1, p, p, 3), np.float32)
        keys = jax.random.split(jax.random.key(p), num_students)
        students = jax.vmap(lambda key, n=network, s=sample: n.init(key, s))(keys)
        dim = network.out_dim
        state = {
            "teacher": teacher,
            "students": {"params": students},
            "target_stats": {"mean": np.zeros(dim, np.float32), "std": np.ones(dim, np.float32)},
        }
        meta = {
            "format": FORMAT,
            "patch_size": p,
            "out_dim": dim,
            "layers": layers_to_json(network.layers),
            "channels": 3,
            "image_size": [size, size],
            "num_students": num_students,
            "padding": "reflect",
            "teacher_source": f"p{p}_small",
            "step": 1,
            "total_steps": 1,
            "score_normalization": {
                "error_mean": 0.0,
                "error_std": 1.0,
                "variance_mean": 0.0,
                "variance_std": 1.0,
            },  # fmt: skip
        }
        with Checkpointer(folder / f"p{p}" / "checkpoints", async_save=False) as checkpointer:
            checkpointer.save(1, jax.tree.map(np.asarray, state), meta)
    return folder


def _latency(base, runtime, score, size, extra=None):
    """p50/p99/mean ms of ``score`` on one random ``size`` image, each call a new image."""
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(FLAGS.warmup + FLAGS.repeats, 1, *size, 3)).astype(np.float32)
    for image in images[: FLAGS.warmup]:
        jax.block_until_ready(score(image))
    times = []
    for image in images[FLAGS.warmup :]:
        start = time.perf_counter()
        jax.block_until_ready(score(image))
        times.append(1000 * (time.perf_counter() - start))
    emit(
        {
            **base,
            "measure": "batch1",
            "runtime": runtime,
            "repeats": FLAGS.repeats,
            "p50_ms": round(float(np.percentile(times, 50)), 2),
            "p99_ms": round(float(np.percentile(times, 99)), 2),
            "mean_ms": round(statistics.fmean(times), 2),
            "img_per_s": round(1000 / float(np.percentile(times, 50)), 2),
            **(extra or {}),
            "load_avg_1min": round(os.getloadavg()[0], 2),
        }
    )


def _export(workdir, path) -> float:
    from ustad.cli import main as cli

    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout holds only the JSON lines
        status = cli.main(
            ["ustad", "export", f"--workdirs={workdir}", f"--out={path}", "--nocheck"]
        )
    if status != 0:
        raise RuntimeError(f"ustad export --out={path} failed ({status})")
    return time.perf_counter() - start


def _write_folder(folder: Path, count: int, size) -> list[Path]:
    from ustad.data.images import write_png

    folder.mkdir()
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (*size, 3), np.uint8)
    paths = []
    for i in range(count):
        # A smooth image with noise: PNGs of a realistic size (pure noise does not compress).
        noise = rng.integers(-12, 13, (*size, 3))
        image = np.clip(base.astype(int) // 4 + 96 + noise, 0, 255).astype(np.uint8)
        paths.append(folder / f"{i:04d}.png")
        write_png(paths[-1], image)
    return paths


def _folder(base, detector, paths, tmp: Path):
    from ustad.score_files import scan_images, score_files

    start = time.perf_counter()
    sizes = scan_images(paths)
    scan_s = time.perf_counter() - start
    warm = detector.batch_size  # compiles (every batch of the folder has this size)
    score_files(detector, paths[:warm], tmp / "warm", sizes=sizes[:warm])
    overlaps = [tuple(int(v) for v in pair.split(":")) for pair in FLAGS.overlaps]
    runs = [(scale, *overlap) for scale in FLAGS.scales for overlap in overlaps]
    seconds: dict[tuple, list[float]] = {run: [] for run in runs}
    for i in range(FLAGS.passes):
        for scale, prefetch, write_behind in runs:
            out = tmp / f"out_{scale}{prefetch}{write_behind}_{i}"
            fixed = {"vmin": 0.0, "vmax": 1.0} if scale == "calibration" else {}
            start = time.perf_counter()
            score_files(
                detector, paths, out, sizes=sizes, prefetch=prefetch, write_behind=write_behind,
                **fixed,
            )  # fmt: skip
            seconds[scale, prefetch, write_behind].append(time.perf_counter() - start)
    for (scale, prefetch, write_behind), times in seconds.items():
        median = statistics.median(times)
        reference = statistics.median(seconds[scale, *overlaps[0]])
        emit(
            {
                **base,
                "measure": "folder",
                "colour_scale": scale,
                "prefetch": prefetch,
                "write_behind": write_behind,
                "images": len(paths),
                "batch_size": detector.batch_size,
                "passes": FLAGS.passes,
                "seconds": round(median, 2),
                "img_per_s": round(len(paths) / median, 2),
                f"ratio_to_{FLAGS.overlaps[0].replace(':', '_')}": round(reference / median, 3),
                "scan_s": round(scan_s, 2),
                "load_avg_1min": round(os.getloadavg()[0], 2),
            }
        )


def _cli(base, workdir, folder: Path, tmp: Path, count: int):
    env = dict(os.environ, USTAD_COMPILATION_CACHE_DIR=str(tmp / "cli_cache"))
    args = [sys.executable, "-m", "ustad", "score", f"--workdirs={workdir}"]
    args += [f"--images={folder}", f"--out={tmp / 'cli_out'}", f"--batch_size={FLAGS.batch_size}"]
    start = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"ustad score failed: {done.stderr.strip()[-500:]}")
    emit(
        {
            **base,
            "measure": "cli",
            "images": count,
            "batch_size": FLAGS.batch_size,
            "seconds": round(seconds, 2),
            "img_per_s": round(count / seconds, 2),
            "load_avg_1min": round(os.getloadavg()[0], 2),
        }
    )


def _family(family: str, tmp: Path):
    from ustad import deploy, load_detector

    given = FLAGS.stfpm_workdir if family == "stfpm" else FLAGS.students_workdir
    if given:
        workdir = Path(given)
    elif family == "stfpm":
        workdir = stfpm_workdir(tmp / "stfpm")
    else:
        workdir = students_workdir(tmp / "students")
    detector = load_detector([str(workdir)], batch_size=1)
    size = detector.input_sizes[0]
    base = {
        "benchmark": "latency",
        "device": device_name(),
        "family": family,
        "workdir": given or f"random {family} cpu preset",
        "image_size": list(size),
    }
    if "detector" in FLAGS.runtimes:
        _latency(base, "detector", detector.score, size)
    if family == "students":
        for runtime, suffix in (("onnxruntime_cpu", ".onnx"), ("jax_exported", ".jaxexport")):
            if runtime in FLAGS.runtimes:
                path = tmp / f"detector{suffix}"
                export_s = _export(workdir, path)
                model = deploy.load(path, batch_size=1)
                extra = {
                    "export_s": round(export_s, 1),
                    "file_mb": round(path.stat().st_size / 1e6, 2),
                }
                _latency(base, runtime, model.score, size, extra)
    folder = tmp / f"{family}_images"
    paths = _write_folder(folder, FLAGS.images, size)
    detector = load_detector([str(workdir)], batch_size=FLAGS.batch_size)
    _folder(base, detector, paths, tmp)
    if FLAGS.cli:
        _cli(base, workdir, folder, tmp, len(paths))


def main(argv):
    del argv
    for family in FLAGS.families:
        if family not in ("stfpm", "students"):
            raise ValueError(f"--families: {family!r} is not stfpm or students")
        with tempfile.TemporaryDirectory() as tmp:
            _family(family, Path(tmp))


if __name__ == "__main__":
    app.run(main)
