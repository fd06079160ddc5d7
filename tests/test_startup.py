"""The commands' persistent compilation cache: the second `ustad score` of a model reads every
compiled program it needs from the cache instead of compiling it, and the detector's traced
program instead of tracing it (two processes)."""

import os
import pathlib
import subprocess
import sys

import numpy as np

from ustad.data.images import write_png

DATA = pathlib.Path(__file__).parent / "data"


def _score(tmp_path, cache, out):
    # Every compiled program is written (no least compile time): with the default bound a
    # program that compiled quickly in the first run but slowly in the second (a loaded
    # machine) would be written only then, and look like a compilation the cache missed.
    env = dict(
        os.environ,
        USTAD_COMPILATION_CACHE="1",
        USTAD_COMPILATION_CACHE_DIR=str(cache),
        USTAD_CACHE_MIN_COMPILE_SECONDS="0",
    )
    # As a user runs it: without the tests' quick-compile flag (its compiles are too short to
    # be worth caching).
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if "xla_backend_optimization_level" not in f)
    args = [sys.executable, "-m", "ustad", "score", f"--workdirs={DATA / 'workdir_students_v1'}"]
    args += [f"--images={tmp_path / 'images'}", f"--out={tmp_path / out}"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_the_second_score_compiles_nothing(tmp_path):
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        write_png(tmp_path / "images" / f"{i}.png", rng.integers(0, 256, (32, 32, 3), np.uint8))
    cache = tmp_path / "cache"
    _score(tmp_path, cache, "first")
    written = sorted(p.name for p in cache.iterdir())
    assert written, "the first run wrote nothing to the compilation cache"
    traced = sorted(p.name for p in (cache / "ustad-programs").iterdir())
    assert traced, "the first run kept no traced program (ustad/program_cache.py)"
    _score(tmp_path, cache, "second")
    # Every program of the second run was found: nothing new was compiled and written, and
    # the detector's program was read, not traced again.
    assert sorted(p.name for p in cache.iterdir()) == written
    assert sorted(p.name for p in (cache / "ustad-programs").iterdir()) == traced
    first = (tmp_path / "first" / "scores.csv").read_text()
    assert (tmp_path / "second" / "scores.csv").read_text() == first
