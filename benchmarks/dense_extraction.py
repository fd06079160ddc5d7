"""Dense descriptor extraction vs per-patch evaluation (paper §2, Bailer et al.).

One JSON line per (p, image size, method): median ms per image of dense extraction, per-patch
ms per image (measured on a subsample of patches and scaled to H·W patches), the speedup, the
achieved GFLOP/s (XLA's FLOP count of the compiled call), and XLA's memory estimate.

    python benchmarks/dense_extraction.py                       # ustad's default (fast CPU flag)
    USTAD_FAST_CPU=0 python benchmarks/dense_extraction.py      # XLA's default CPU convolutions
"""

from __future__ import annotations

import os

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags

import ustad  # noqa: F401  (sets the fast CPU flag before JAX starts, unless USTAD_FAST_CPU=0)
from benchmarks.common import compiled_stats, device_name, emit, time_fn  # noqa: E402
from ustad.uninformed_students.dense import _dense, check_dense_inputs  # noqa: E402
from ustad.uninformed_students.nets import patch_net  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("patch_sizes", ["17", "33", "65"], "receptive fields p")
flags.DEFINE_list("sizes", ["72x48", "128x128", "256x256"], "image sizes HxW")
flags.DEFINE_list("methods", ["multipool", "atrous"], "dense methods")
flags.DEFINE_integer("batch", 1, "images per call")
flags.DEFINE_integer("per_patch_samples", 1024, "patches timed for the per-patch reference")
flags.DEFINE_integer("repeats", 5, "timed repeats (median reported)")
flags.DEFINE_float("budget_s", 20.0, "stop repeating a measurement after this long")


def main(argv):
    del argv
    device = device_name()
    fast_flag = "xla_cpu_experimental_ynn_fusion_type" in os.environ.get("XLA_FLAGS", "")
    for p in map(int, FLAGS.patch_sizes):
        module = patch_net(p)
        variables = module.init(jax.random.key(0), jnp.zeros((1, p, p, 3)))
        apply_patches = jax.jit(lambda v, x, m=module: m.apply(v, x))
        patches = jax.random.uniform(jax.random.key(1), (FLAGS.per_patch_samples, p, p, 3))
        per_patch_s = time_fn(apply_patches, variables, patches, budget_s=FLAGS.budget_s)
        per_patch_s_per_patch = per_patch_s / FLAGS.per_patch_samples
        for size in FLAGS.sizes:
            height, width = map(int, size.lower().split("x"))
            images = jax.random.uniform(jax.random.key(2), (FLAGS.batch, height, width, 3))
            per_patch_ms = per_patch_s_per_patch * height * width * 1e3
            for method in FLAGS.methods:
                check_dense_inputs(
                    module, variables, images.shape, patch_size=p, padding="reflect", method=method
                )

                def run(v, x, m=module, meth=method):
                    return _dense(m, v, x, "reflect", meth)

                stats = compiled_stats(jax.jit(run), variables, images)
                seconds = time_fn(
                    run, variables, images, repeats=FLAGS.repeats, budget_s=FLAGS.budget_s
                )
                dense_ms = seconds * 1e3 / FLAGS.batch
                emit(
                    {
                        "benchmark": "dense_extraction",
                        "device": device,
                        "xla_fast_cpu_flag": fast_flag,
                        "p": p,
                        "height": height,
                        "width": width,
                        "batch": FLAGS.batch,
                        "method": method,
                        "dense_ms_per_image": round(dense_ms, 2),
                        "per_patch_ms_per_image": round(per_patch_ms, 1),
                        "per_patch_samples": FLAGS.per_patch_samples,
                        "speedup": round(per_patch_ms / dense_ms, 1),
                        "gflops_per_s": (
                            round(stats["flops"] / seconds / 1e9, 1) if stats["flops"] else None
                        ),
                        "xla_memory_mb": stats["temp_mb"],
                    }
                )


if __name__ == "__main__":
    app.run(main)
