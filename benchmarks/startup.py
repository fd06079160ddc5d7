"""Start-up of the ``ustad`` command: ``ustad --help``, and the first and second ``ustad score``
of a model with an empty persistent compilation cache (each in a fresh process, as a user runs
them). One JSON line with the three wall times and the first ÷ second ratio; with --profile, a
second line per run (first, second) with where the time goes under cProfile (its overhead
inflates Python-heavy phases: read the shares, not the seconds): importing JAX, restoring the
checkpoint, tracing or reading the detector's program (ustad/program_cache.py), compiling or
reading the compiled program, scoring and writing.

    python -m benchmarks.startup                                  # the committed tiny workdir
    python -m benchmarks.startup --workdirs=runs/bottle_cpu --images='data/bottle/test/*/*.png'
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from benchmarks.common import device_name, emit

FLAGS = flags.FLAGS
ROOT = Path(__file__).resolve().parents[1]
flags.DEFINE_string("workdirs", str(ROOT / "tests/data/workdir_students_v1"), "model to score")
flags.DEFINE_string("images", "", "images to score (default: 4 random 64² PNGs)")
flags.DEFINE_integer("repeats", 3, "runs of each measure (median reported)")
flags.DEFINE_bool("profile", False, "also profile one first and one second start (cProfile)")

# Phase → (file suffix, function name) whose cumulative time cProfile reports for it.
PHASES = {
    "import_jax": ("jax/__init__.py", "<module>"),
    "restore": ("ustad/checkpointing.py", "restore_workdir"),
    "load_detector": ("ustad/families.py", "load_detector"),
    "trace_or_read_program": ("ustad/program_cache.py", "_load_or_export"),
    "compile_or_read_compiled": ("jax/_src/compiler.py", "compile_or_get_cached"),
    "score_files": ("ustad/score_files.py", "score_files"),
    "total": ("ustad/__main__.py", "<module>"),
}


def _wall(args, env) -> float:
    start = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {done.stderr.strip()[-500:]}")
    return time.perf_counter() - start


def _profile(args, env, tmp) -> dict:
    """Cumulative seconds of :data:`PHASES` in one run of ``args`` under cProfile."""
    import pstats

    stats_file = os.path.join(tmp, "profile.out")
    _wall([args[0], "-m", "cProfile", "-o", stats_file, *args[1:]], env)
    stats = pstats.Stats(stats_file).stats  # (file, line, name) → (cc, nc, tt, ct, callers)
    phases = {}
    for phase, (suffix, name) in PHASES.items():
        times = [v[3] for (f, _, n), v in stats.items() if f.endswith(suffix) and n == name]
        phases[phase] = round(max(times), 2) if times else None
    return phases


def main(argv):
    del argv
    from ustad.data.images import write_png

    with tempfile.TemporaryDirectory() as tmp:
        images = FLAGS.images
        if not images:
            images = os.path.join(tmp, "images")
            os.makedirs(images)
            rng = np.random.default_rng(0)
            for i in range(4):
                write_png(f"{images}/{i}.png", rng.integers(0, 256, (64, 64, 3), np.uint8))
        command = [sys.executable, "-m", "ustad"]
        help_s, first_s, second_s = [], [], []
        for repeat in range(FLAGS.repeats):
            cache = os.path.join(tmp, f"cache{repeat}")
            env = dict(os.environ, USTAD_COMPILATION_CACHE="1", USTAD_COMPILATION_CACHE_DIR=cache)
            help_s.append(_wall([*command, "--help"], env))
            score = [*command, "score", f"--workdirs={FLAGS.workdirs}", f"--images={images}"]
            first_s.append(_wall([*score, f"--out={tmp}/out{repeat}a"], env))
            second_s.append(_wall([*score, f"--out={tmp}/out{repeat}b"], env))
        if FLAGS.profile:
            cache = os.path.join(tmp, "cache_profile")
            env = dict(os.environ, USTAD_COMPILATION_CACHE="1", USTAD_COMPILATION_CACHE_DIR=cache)
            score = [*command, "score", f"--workdirs={FLAGS.workdirs}", f"--images={images}"]
            profiles = {
                run: _profile([*score, f"--out={tmp}/profile_{run}"], env, tmp)
                for run in ("first", "second")
            }
    first, second = float(np.median(first_s)), float(np.median(second_s))
    if FLAGS.profile:
        for run, phases in profiles.items():
            emit(
                {
                    "benchmark": "startup_profile",
                    "device": device_name(),
                    "workdirs": FLAGS.workdirs,
                    "run": run,
                    "cumulative_s": phases,
                }
            )
    emit(
        {
            "benchmark": "startup",
            "device": device_name(),
            "workdirs": FLAGS.workdirs,
            "repeats": FLAGS.repeats,
            "help_s": round(float(np.median(help_s)), 2),
            "first_score_s": round(first, 2),
            "second_score_s": round(second, 2),
            "first_over_second": round(first / second, 2),
        }
    )


if __name__ == "__main__":
    app.run(main)
