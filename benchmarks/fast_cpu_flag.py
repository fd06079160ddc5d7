"""The fast CPU flag's speedup, measured in one run: flag-on and flag-off processes alternated.

XLA reads ``XLA_FLAGS`` when its backend starts, so one process cannot time both settings. This
runs ``benchmarks.dense_extraction`` in child processes, alternating ustad's default
(``--xla_cpu_experimental_ynn_fusion_type=dot``) and ``USTAD_FAST_CPU=0``, starting each round
with the other setting, and prints one JSON line per (p, size, method): the median dense ms per
image of each setting over the rounds, their ratio, every child's figure and the load average
before and after. Alternating keeps a drifting load on a shared machine from favouring either.

    python -m benchmarks.fast_cpu_flag --patch_sizes=33,65 --sizes=128x128 --rounds=3
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("patch_sizes", ["33", "65"], "receptive fields p")
flags.DEFINE_list("sizes", ["128x128"], "image sizes HxW")
flags.DEFINE_string("method", "multipool", "dense method")
flags.DEFINE_integer("rounds", 3, "children per setting")
flags.DEFINE_integer("repeats", 3, "timed calls in each child (its median is its figure)")


def child(p: int, size: str, fast: bool) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "ynn_fusion_type" not in f
    )
    env["USTAD_FAST_CPU"] = "1" if fast else "0"
    command = [
        sys.executable,
        "-m",
        "benchmarks.dense_extraction",
        f"--patch_sizes={p}",
        f"--sizes={size}",
        f"--methods={FLAGS.method}",
        "--per_patch_samples=8",
        f"--repeats={FLAGS.repeats}",
        "--budget_s=1000",
    ]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    record = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    if record["xla_fast_cpu_flag"] != fast:
        raise RuntimeError(f"the child ran with the flag {record['xla_fast_cpu_flag']}, not {fast}")
    return record


def main(argv):
    del argv
    for p in map(int, FLAGS.patch_sizes):
        for size in FLAGS.sizes:
            load_before = os.getloadavg()[0]
            times = {True: [], False: []}
            record = None
            for r in range(FLAGS.rounds):
                for fast in (True, False) if r % 2 == 0 else (False, True):
                    record = child(p, size, fast)
                    times[fast].append(record["dense_ms_per_image"])
            on, off = statistics.median(times[True]), statistics.median(times[False])
            print(
                json.dumps(
                    {
                        "benchmark": "fast_cpu_flag",
                        "device": record["device"],
                        "p": p,
                        "size": size,
                        "method": FLAGS.method,
                        "rounds": FLAGS.rounds,
                        "repeats_per_child": FLAGS.repeats,
                        "dense_ms_flag_on": on,
                        "dense_ms_flag_off": off,
                        "speedup": round(off / on, 2),
                        "flag_on_children_ms": times[True],
                        "flag_off_children_ms": times[False],
                        "load_avg_1min_before_after": [load_before, os.getloadavg()[0]],
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    app.run(main)
