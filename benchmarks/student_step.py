"""One training step of M students: batched together vs one after another (paper §4).

One JSON line per (p, image size, compute dtype, member strategy): the median time of one jitted
step that updates all M students (cached teacher targets; members batched by ``jax.vmap`` or run
one after another inside the same program), the time of M jitted single-student steps called one
after another in the same process (also cached targets), their ratio, images per second,
achieved GFLOP/s (convolution FLOPs counted analytically, and XLA's own count of the compiled
step), XLA's memory estimate and the process's peak RSS, and the teacher's dense inference time
per image. The load average is recorded: on a shared machine it explains a lot.

    python -m benchmarks.student_step --patch_sizes=65 --sizes=128 --num_students=3
    python -m benchmarks.student_step --dtypes=float32,bfloat16 --sizes=128,256

Reference (PyTorch re-implementation, 2-core CPU, batch 1, p=65, students one after another with
the teacher recomputed every step): one student step 2.2 s at 128², 11.7 s at 256²; teacher dense
inference 0.56 s / 2.2 s.
"""

from __future__ import annotations

import os
import resource
import statistics
import time

# Importing ustad sets the fast CPU flag (unless USTAD_FAST_CPU=0); no backend starts before.
import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks.common import compiled_stats, device_name, emit, time_fn
from ustad.ensemble import member
from ustad.uninformed_students.dense import dense_apply
from ustad.uninformed_students.flops import train_step_flops
from ustad.uninformed_students.nets import patch_net
from ustad.uninformed_students.steps import (
    init_students,
    make_optimizer,
    make_train_step,
    student_step,
)

FLAGS = flags.FLAGS
flags.DEFINE_list("patch_sizes", ["65"], "receptive fields p")
flags.DEFINE_list("sizes", ["128"], "square image sizes")
flags.DEFINE_list("dtypes", ["float32"], "student compute dtypes (float32, bfloat16)")
flags.DEFINE_integer("num_students", 3, "M")
flags.DEFINE_float("widths", 1.0, "hidden widths as a fraction of the paper's (the demo: 0.125)")
flags.DEFINE_integer("out_dim", 128, "descriptor dimension d (the demo: 32)")
flags.DEFINE_integer("batch", 1, "images per step")
flags.DEFINE_integer("repeats", 3, "timed rounds (median reported)")
flags.DEFINE_float("budget_s", 300.0, "stop after this long once 2 rounds are done")
flags.DEFINE_list("strategies", ["vmap", "sequential"], "member strategies of the step")
flags.DEFINE_bool("sequential", True, "also time M separate single-student steps in turn")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ensemble_step_fn(student, tx, key, images, targets, num_students: int, strategy: str):
    """A call that runs one ensemble step (cached targets), and XLA's FLOPs/memory for it."""
    state = init_students(student, tx, key, num_students, images.shape[-1])
    step = make_train_step(student, tx, member_strategy=strategy)
    stats = compiled_stats(step, state, images, targets)
    holder = {"state": state}

    def run():
        holder["state"], losses = step(holder["state"], images, targets)
        return losses

    return run, stats


def separate_steps_fn(student, tx, key, images, targets, num_students: int):
    """A call that runs M jitted single-student steps one after another."""
    state = init_students(student, tx, key, num_students, images.shape[-1])
    single = jax.jit(
        lambda p, o, x, t: student_step(student, tx, p, o, x, t), donate_argnums=(0, 1)
    )
    members = [
        [member(state["params"], i), member(state["opt_state"], i)] for i in range(num_students)
    ]

    def run():
        for m in members:
            m[0], m[1], loss = single(m[0], m[1], images, targets)
        return loss

    return run


def interleaved_medians(calls: dict, repeats: int, budget_s: float) -> dict:
    """Median seconds of each call, timed in rotating order after one warm-up each.

    On a machine shared with other jobs the load drifts by minutes; timing the variants in
    turns, rather than one after the other, keeps their ratio fair.
    """
    for call in calls.values():
        jax.block_until_ready(call())
    times = {name: [] for name in calls}
    names = list(calls)
    start = time.perf_counter()
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            jax.block_until_ready(calls[name]())
            times[name].append(time.perf_counter() - t0)
        if r + 1 >= 2 and time.perf_counter() - start > budget_s:
            break
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv):
    del argv
    device = device_name()
    key = jax.random.key(0, impl="rbg")  # threefry's bits compile slowly on CPU; irrelevant here
    num_students, batch = FLAGS.num_students, FLAGS.batch
    tx = make_optimizer(1e-4, 1e-5)
    for p in map(int, FLAGS.patch_sizes):
        widths = None if FLAGS.widths == 1.0 else FLAGS.widths
        teacher = patch_net(p, widths=widths, out_dim=FLAGS.out_dim)
        teacher_vars = jax.jit(teacher.init)(key, jnp.zeros((1, p, p, 3)))
        teacher_fn = jax.jit(lambda v, x, t=teacher: dense_apply(t, v, x))
        for size in map(int, FLAGS.sizes):
            images = jax.random.uniform(jax.random.fold_in(key, size), (batch, size, size, 3))
            teacher_s = time_fn(
                teacher_fn, teacher_vars, images, repeats=FLAGS.repeats, budget_s=FLAGS.budget_s
            )
            targets = teacher_fn(teacher_vars, images)  # cached targets (normalisation omitted)
            step_flops = train_step_flops(teacher, size, size, num_students, batch)
            for dtype in FLAGS.dtypes:
                student = teacher.clone(dtype=jnp.dtype(dtype))
                init_key = jax.random.fold_in(key, 1)
                calls, stats = {}, {}
                for strategy in FLAGS.strategies:
                    calls[strategy], stats[strategy] = ensemble_step_fn(
                        student, tx, init_key, images, targets, num_students, strategy
                    )
                if FLAGS.sequential:
                    calls["separate"] = separate_steps_fn(
                        student, tx, init_key, images, targets, num_students
                    )
                load_before = os.getloadavg()[0]
                medians = interleaved_medians(calls, FLAGS.repeats, FLAGS.budget_s)
                load = round((load_before + os.getloadavg()[0]) / 2, 2)
                for strategy in FLAGS.strategies:
                    step_s = medians[strategy]
                    record = {
                        "benchmark": "student_step",
                        "device": device,
                        "load_avg_1min": load,
                        "p": p,
                        "widths": FLAGS.widths,
                        "out_dim": FLAGS.out_dim,
                        "image_size": size,
                        "num_students": num_students,
                        "batch": batch,
                        "dtype": dtype,
                        "member_strategy": strategy,
                        "step_ms": round(step_s * 1e3, 1),
                        "img_per_s": round(batch / step_s, 3),
                        "gflop_per_step": round(step_flops / 1e9, 1),
                        "gflop_per_s": round(step_flops / step_s / 1e9, 1),
                        "xla_gflop_per_step": stats[strategy]["flops"]
                        and round(stats[strategy]["flops"] / 1e9, 1),
                        "xla_memory_mb": stats[strategy]["temp_mb"],
                        "teacher_ms_per_image": round(teacher_s / batch * 1e3, 1),
                    }
                    if "separate" in medians:
                        record["separate_steps_ms"] = round(medians["separate"] * 1e3, 1)
                        record["separate_over_step"] = round(medians["separate"] / step_s, 3)
                    record["peak_rss_mb"] = round(peak_rss_mb(), 1)
                    emit(record)


if __name__ == "__main__":
    app.run(main)
