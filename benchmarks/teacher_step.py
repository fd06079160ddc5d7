"""Teacher pretraining step time (paper §3), and how the patch size fed to P matters.

One JSON line per (p, P input size): the median seconds of one full train step (64 patches by
default, the paper's networks, EfficientNet-Lite0 as P; patches cropped from the bundled
natural photos), steps/s, patches/s, and the median seconds of P's forward pass alone (its
share of the step: P runs inside the step on each new random batch, so its features cannot be
precomputed; this is the part any precomputation could save).

    python -m benchmarks.teacher_step                                  # p = 17, 33, 65; native
    python -m benchmarks.teacher_step --input_sizes=0,224 --patch_sizes=33
    python -m benchmarks.teacher_step --fast_apply=true,false       # train_apply vs module.apply
    python -m benchmarks.teacher_step --train_steps=300 --input_sizes=0,224 --patch_sizes=33

With ``--train_steps N`` each configuration also trains N steps (a short run through
``train_and_evaluate``, in a temporary folder) and reports the final loss terms, the variance of
P's features over patches (``target_variance``: the distillation loss of always predicting the
mean feature) and their ratio ``unexplained`` (lower is better; raw losses are not comparable
across input sizes because P's features differ).

Reference, the most used PyTorch re-implementation on the same 2-core CPU, 64 patches per step:
0.99 s (p=65), 0.24 s (p=33), 0.17 s (p=17).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags

import ustad  # noqa: F401  (sets the fast CPU flag before JAX starts)
from benchmarks.common import device_name, emit  # noqa: E402
from ustad.models.pretrained import load_pretrained  # noqa: E402
from ustad.uninformed_students.teacher import patches, sources
from ustad.uninformed_students.teacher import train as teacher  # noqa: E402
from ustad.uninformed_students.teacher.steps import backbone_inputs

FLAGS = flags.FLAGS
flags.DEFINE_list("patch_sizes", ["17", "33", "65"], "receptive fields p")
flags.DEFINE_list("input_sizes", ["0"], "side P sees (0 = the native p×p patch)")
flags.DEFINE_integer("batch", 64, "patches per step")
flags.DEFINE_string("backbone", "efficientnet_lite0", "P")
flags.DEFINE_integer("repeats", 5, "timed steps (median reported)")
flags.DEFINE_integer("train_steps", 0, "also train this many steps and report the losses")
flags.DEFINE_string("compactness_mode", "signed", "for --train_steps")
flags.DEFINE_list("fast_apply", ["true"], "T̂ through train_apply (true) and/or module.apply")

REFERENCE_S = {17: 0.17, 33: 0.24, 65: 0.99}


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _matmul_gflops() -> float:
    """This machine's float32 matmul throughput right now (a shared machine's load shows)."""
    a = jax.random.normal(jax.random.key(0), (4096, 3200))
    b = jax.random.normal(jax.random.key(1), (3200, 256))
    matmul = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(matmul(a, b))
    return 2 * 4096 * 3200 * 256 / _median_time(lambda: matmul(a, b), 5) / 1e9


def _time_step(p: int, input_size: int, fast_apply: bool, backbone) -> dict:
    net = teacher.patch_net(p)
    decoder = nn.Dense(backbone.feature_dim)
    tx = teacher.make_optimizer(2e-4, 1e-5)
    step = teacher.make_train_step(
        net,
        decoder,
        backbone.features_fn,
        tx,
        backbone_input_size=input_size or None,
        fast_apply=fast_apply,
    )
    holder = {"state": teacher.make_init(net, decoder, tx, 3)(jax.random.key(0))}
    with patches.ContextSampler(sources.natural_photos(), p, jax.random.key(1)) as sampler:
        contexts = jax.device_put(sampler.sample(0, FLAGS.batch))
    key = jax.random.key(2)

    def run_step():
        holder["state"], metrics = step(
            holder["state"], backbone.variables, contexts, key, np.int32(0)
        )
        return metrics["loss"]

    def features(variables, crops):
        return backbone.features_fn(variables, backbone_inputs(crops, 3, input_size))

    features_jit = jax.jit(features)
    # XLA's FLOP count of the lowered step (no second compilation).
    lowered = step.lower(holder["state"], backbone.variables, contexts, key, np.int32(0))
    flops = float(lowered.cost_analysis().get("flops", 0.0)) or None
    start = time.perf_counter()
    jax.block_until_ready(run_step())  # compile + first step
    first_s = time.perf_counter() - start
    step_s = _median_time(run_step, FLAGS.repeats)
    jax.block_until_ready(features_jit(backbone.variables, contexts))
    backbone_s = _median_time(lambda: features_jit(backbone.variables, contexts), FLAGS.repeats)
    return {
        "compile_and_first_step_s": round(first_s, 2),
        "median_s_per_step": round(step_s, 4),
        "steps_per_s": round(1 / step_s, 3),
        "patches_per_s": round(FLAGS.batch / step_s, 1),
        "backbone_forward_s": round(backbone_s, 4),
        "backbone_share": round(backbone_s / step_s, 3),
        "step_gflops": round(flops / 1e9, 1) if flops else None,
        "gflops_per_s": round(flops / step_s / 1e9, 1) if flops else None,
    }


def _short_run(p: int, input_size: int, fast_apply: bool, backbone) -> dict:
    from configs.teacher import get_config

    config = get_config(f"p{p}")
    config.num_steps = FLAGS.train_steps
    config.batch_size = FLAGS.batch
    config.backbone_input_size = input_size
    config.compactness_mode = FLAGS.compactness_mode
    config.fast_apply = fast_apply
    config.log_every_steps = 10
    config.checkpoint_every_steps = 0
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        teacher.train_and_evaluate(config, workdir, backbone=backbone)
        wall_s = time.perf_counter() - start
        with open(f"{workdir}/metrics.jsonl") as f:
            records = [json.loads(line) for line in f]
    tail = records[-5:]  # the last 50 steps
    distillation = float(np.mean([r["distillation"] for r in tail]))
    # Variance of P's features over fresh patches (steps the run did not see).
    with patches.ContextSampler(sources.natural_photos(), p, jax.random.key(99)) as sampler:
        crops = np.concatenate([sampler.sample(s, FLAGS.batch) for s in range(4)])
    inputs = backbone_inputs(jax.numpy.asarray(crops), 3, input_size)
    targets = np.asarray(jax.jit(backbone.features_fn)(backbone.variables, inputs))
    target_variance = float(np.mean(np.sum((targets - targets.mean(0)) ** 2, axis=-1)))
    return {
        "train_steps": FLAGS.train_steps,
        "compactness_mode": FLAGS.compactness_mode,
        "first_distillation": round(records[0]["distillation"], 4),
        "final_distillation": round(distillation, 4),
        "final_compactness": round(float(np.mean([r["compactness"] for r in tail])), 4),
        "target_variance": round(target_variance, 4),
        "unexplained": round(distillation / target_variance, 4),
        "train_wall_s": round(wall_s, 1),
    }


def main(argv):
    del argv
    device = device_name()
    backbone = load_pretrained(FLAGS.backbone)
    matmul_gflops = round(_matmul_gflops(), 1)
    for p in map(int, FLAGS.patch_sizes):
        for input_size in map(int, FLAGS.input_sizes):
            for fast_apply in (x.lower() == "true" for x in FLAGS.fast_apply):
                record = {
                    "benchmark": "teacher_step",
                    "device": device,
                    "p": p,
                    "batch": FLAGS.batch,
                    "backbone": FLAGS.backbone,
                    "backbone_input": f"{input_size}x{input_size}" if input_size else f"{p}x{p}",
                    "fast_apply": fast_apply,
                    "machine_matmul_gflops_per_s": matmul_gflops,
                }
                record.update(_time_step(p, input_size, fast_apply, backbone))
                record["pytorch_reference_s_per_step"] = REFERENCE_S.get(p)
                if FLAGS.train_steps:
                    record.update(_short_run(p, input_size, fast_apply, backbone))
                emit(record)


if __name__ == "__main__":
    app.run(main)
