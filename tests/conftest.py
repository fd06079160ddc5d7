"""Test settings: 4 fake CPU devices, float32 matmuls at full precision, quick compiles.

The suite's tiny programs spend most of their time in XLA's compiler, so the tests (and the
processes they start, which inherit the environment) compile at LLVM optimisation level 0:
the HLO passes, and so what is computed, are unchanged; the whole suite takes ~40 % less CPU.
"""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole run, shared by the pytest-xdist workers (the
# workers' parent is the controller, whose pid names the folder; it removes it at the end):
# tests that build the same program (the same tiny network trained or scored by several
# tests, in either worker) compile it once. JAX keys entries by the program, options and
# flags, so a hit is the same executable; it cut ~18 % of the CPU time of the STFPM tests.
_CACHE_OWNER = os.getppid() if os.environ.get("PYTEST_XDIST_WORKER") else os.getpid()
RUN_CACHE = os.path.join(tempfile.gettempdir(), f"ustad-tests-jax-cache-{_CACHE_OWNER}")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = RUN_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The commands' persistent compilation cache stays off in tests (tests/test_startup.py turns it
# on in its own processes): it would write to the user's cache and cost every compile a write.
os.environ.setdefault("USTAD_COMPILATION_CACHE", "0")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax  # noqa: E402

import ustad  # noqa: E402,F401  (sets XLA flags before the backend starts)

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_default_matmul_precision", "highest")


# Longest first: with two workers, a minute-long test that starts last leaves one core idle at
# the end of the run (pytest-xdist keeps the collection order within each worker's share).
LONGEST_FIRST = ("test_readme.py::test_readme_blocks_run",)


def pytest_collection_modifyitems(items):
    first = [item for item in items if item.nodeid.endswith(LONGEST_FIRST)]
    items[:] = first + [item for item in items if item not in first]


def pytest_sessionfinish(session):
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller, or a run without xdist
        shutil.rmtree(RUN_CACHE, ignore_errors=True)
