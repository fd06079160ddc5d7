"""Pieces of ``benchmarks/gpu_paper.py`` that do not read its flags: the JSON-line emitter, the
students' step probe and config, scoring timer and the Markdown tables (kept apart so the script
stays readable; nothing here is a command)."""

from __future__ import annotations

import json
import os
import statistics
import time

START = time.perf_counter()

STFPM, STUDENTS = "stfpm", "uninformed_students"


def elapsed() -> float:
    return time.perf_counter() - START


class Emitter:
    """Prints each record as one JSON line and appends it to a file."""

    def __init__(self, path: str, common: dict):
        self.path, self.common, self.records = path, common, []
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def __call__(self, kind: str, **fields) -> dict:
        record = {"benchmark": "gpu_paper", "kind": kind, **self.common, **fields}
        record["elapsed_s"] = round(elapsed(), 1)
        self.records.append(record)
        line = json.dumps(record, default=str)
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")
        return record


def default_mvtec_dir() -> str:
    for candidate in (os.environ.get("MVTEC_DIR"), ".gpu_data/mvtec_ad", "../shared/data/mvtec_ad"):
        if candidate and os.path.isdir(candidate):
            return candidate
    return ""


def probe_step(network, size: int, num_students: int, dtype, steps: int, key) -> dict:
    """Compile time, median step time and FLOPs of one M-student step on one image."""
    import jax
    import jax.numpy as jnp

    from ustad.ensemble import resolve_member_strategy
    from ustad.uninformed_students.budget import StepTiming
    from ustad.uninformed_students.dense import dense_apply
    from ustad.uninformed_students.flops import dense_conv_flops, train_step_flops
    from ustad.uninformed_students.steps import init_students, make_optimizer, make_train_step

    channels = 3
    sample = jnp.zeros((1, network.patch_size, network.patch_size, channels))
    variables = jax.jit(network.init)(key, sample)
    images = jax.random.uniform(jax.random.fold_in(key, 1), (1, size, size, channels))
    teacher_fn = jax.jit(lambda v, x: dense_apply(network, v, x))
    t0 = time.perf_counter()
    targets = jax.block_until_ready(teacher_fn(variables, images))
    teacher_compile_s = time.perf_counter() - t0
    teacher_times = []
    for _ in range(max(2, steps // 2)):
        t0 = time.perf_counter()
        jax.block_until_ready(teacher_fn(variables, images))
        teacher_times.append(time.perf_counter() - t0)
    student = network.clone(dtype=jnp.dtype(dtype))
    tx = make_optimizer(1e-4, 1e-5)
    strategy = resolve_member_strategy("auto")
    state = init_students(student, tx, jax.random.fold_in(key, 2), num_students, channels)
    step = make_train_step(student, tx, member_strategy=strategy)
    t0 = time.perf_counter()
    state, losses = step(state, images, targets)  # compiles
    jax.block_until_ready(losses)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, losses = step(state, images, targets)
        jax.block_until_ready(losses)
        times.append(time.perf_counter() - t0)
    flops = train_step_flops(network, size, size, num_students)
    forward = dense_conv_flops(network, size, size)[0]
    step_s = statistics.median(times)
    return {
        "step_ms": round(step_s * 1e3, 2),
        "compile_s": round(compile_s + teacher_compile_s, 1),
        "gflop_per_step": round(flops / 1e9, 1),
        "tflop_per_s": round(flops / step_s / 1e12, 3),
        "teacher_ms_per_image": round(statistics.median(teacher_times) * 1e3, 2),
        "forward_gflop_per_image": round(forward / 1e9, 2),
        "member_strategy": strategy,
        "_timing": StepTiming(
            step_s=step_s,
            compile_s=compile_s + teacher_compile_s,
            teacher_s=statistics.median(teacher_times),
        ),
    }


def students_config(p: int, teacher: str, epochs: int, size: int, args) -> object:
    from configs import students as students_configs

    config = students_configs.get_config(f"p{p}")
    config.teacher_workdir = teacher
    config.image_size = size
    config.num_students = args["num_students"]
    config.epochs = epochs
    config.min_train_steps = 0  # the time plan sets the epochs: no floor above them
    config.batch_size = 1
    config.learning_rate = 1e-4
    config.weight_decay = 1e-5
    config.compute_dtype = args["dtype"]
    config.num_devices = 1
    config.checkpoint_every_steps = 10**9  # one checkpoint, at the end (saves cost GPU time)
    config.log_every_steps = args["log_every"]
    if args["prng_impl"]:
        config.prng_impl = args["prng_impl"]
    return config


def train_log_img_per_s(workdir) -> float | None:
    """Median training img/s over the logged intervals (the first, with compilation, left out)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rates = [json.loads(line).get("img_per_s") for line in f if line.strip()]
    rates = [r for r in rates if r]
    return round(statistics.median(rates[1:] or rates), 2) if rates else None


def time_scoring(detector, images, batch: int, repeats: int) -> float:
    """Median seconds of ``detector.score`` on ``batch`` images (after one warm-up call)."""
    chunk = images[:batch]
    if len(chunk) < batch:
        chunk = images[(list(range(len(images))) * batch)[:batch]]
    detector.score(chunk)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        detector.score(chunk)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def markdown(records: list[dict]) -> str:
    steps = [r for r in records if r["kind"] == "step"]
    trains = [r for r in records if r["kind"] == "train"]
    scales = {r["p"]: r for r in trains if r.get("family") == STUDENTS}
    quality = [r for r in records if r["kind"] == "quality"]
    speed = [r for r in records if r["kind"] == "scoring_speed" and "img_per_s" in r]
    lines = [
        "| p | network | step ms | TFLOP/s | compile s |",
        "|---|---|---|---|---|",
        *(
            f"| {r['p']} | {r['network']} | {r['step_ms']} | {r['tflop_per_s']} | "
            f"{r['compile_s']} |"
            for r in steps
        ),
        "",
        "| scores | teachers | epochs | AU-PRO@0.3 | pixel AUROC | image AUROC |",
        "|---|---|---|---|---|---|",
    ]
    for r in quality:
        if r.get("family") == STFPM:
            teachers, epochs = r["teacher"], f"{r['epochs']} of {r['max_epochs']}"
        else:
            ps = r["patch_sizes"]
            teachers = ", ".join(scales[p]["teacher"] for p in ps if p in scales)
            epochs = "/".join(str(scales[p]["epochs"]) for p in ps if p in scales)
        lines.append(
            f"| {r['scores']} | {teachers} | {epochs} | {r['au_pro']:.3f} | "
            f"{r['pixel_auroc']:.3f} | {r['image_auroc']:.3f} |"
        )
    lines += ["", "| scores | batch | img/s | TFLOP/s |", "|---|---|---|---|"]
    lines += [
        f"| {r['scores']} | {r['batch']} | {r['img_per_s']} | {r.get('tflop_per_s', '–')} |"
        for r in speed
    ]
    return "\n".join(lines)
