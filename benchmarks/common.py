"""Shared helpers for the benchmark scripts: timing, device names, JSON lines."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import jax


def device_name() -> str:
    """E.g. ``'cpu: AMD EPYC (2 cores, AVX-512 bf16)'`` or ``'gpu: NVIDIA H100 80GB HBM3'``.

    On CPU the widest vector extension is named (``AVX2``, ``AVX-512``, ``AVX-512 bf16``), as
    machines that share a model name can differ 3× in speed."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        model, isa = platform.processor() or "cpu", ""
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        model = line.split(":", 1)[1].strip()
                    elif line.startswith("flags"):
                        isa = vector_isa(line.split(":", 1)[1].split())
                        break
        except OSError:
            pass
        return f"cpu: {model} ({os.cpu_count()} cores{', ' + isa if isa else ''})"
    return f"{device.platform}: {device.device_kind}"


def vector_isa(flags) -> str:
    """The widest x86 vector extension in a ``/proc/cpuinfo`` flags list ('' if none known)."""
    flags = set(flags)
    if "avx512f" in flags:
        return "AVX-512 bf16" if "avx512_bf16" in flags else "AVX-512"
    return "AVX2" if "avx2" in flags else ""


def time_fn(fn, *args, warmup: int = 1, repeats: int = 5, min_repeats: int = 3, budget_s=None):
    """Median wall time (s) of ``fn(*args)`` after ``warmup`` calls, blocking on the result.

    With ``budget_s``, stops after the budget once ``min_repeats`` runs are done.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    start = time.perf_counter()
    for i in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
        if budget_s is not None and i + 1 >= min_repeats and time.perf_counter() - start > budget_s:
            break
    return statistics.median(times)


def compiled_stats(jitted, *args) -> dict:
    """FLOPs and memory of one compiled call, from XLA's own analysis (None where missing)."""
    compiled = jitted.lower(*args).compile()
    stats = {"flops": None, "temp_mb": None}
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        stats["flops"] = float(cost.get("flops", 0.0)) or None
    except Exception:  # noqa: BLE001  (backends without cost analysis)
        pass
    try:
        memory = compiled.memory_analysis()
        total = memory.temp_size_in_bytes + memory.argument_size_in_bytes
        stats["temp_mb"] = round((total + memory.output_size_in_bytes) / 2**20, 1)
    except Exception:  # noqa: BLE001
        pass
    return stats


def emit(record: dict, out: str | None = None) -> None:
    """Print ``record`` as one JSON line; with ``out``, also append it to that file (its folder
    made if missing)."""
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "a") as f:
            f.write(line + "\n")
