"""The paper's MVTec AD bottle run on one GPU, time-boxed: what ``benchmarks/gpu_paper.sh`` runs.

Bottle at 256², p = 17, 33, 65 and their multi-scale average, M = 3 students per scale, batch 1,
Adam 1e-4 / weight decay 1e-5 (paper §4), as many of the paper's 100 epochs as fit in
``--budget_s`` (default 540 s = 9 min of wall time for everything, this process's start
included), stated in the output. In order:

1. **Teachers.** Per p the full-width shipped teacher (``p33``) when ustad has one, else the
   small shipped one (``p17_small``, ``p65_small``: ⅛ widths, d = 32); full-width p = 17 and 65
   teachers are not shipped and a teacher's 50,000 steps do not fit in the box. Each line names
   the teacher of its scale. ``--teachers`` overrides (``small``, or ``17=p17_small,33=p33``).
2. **Step probe.** Per p, a few jitted training steps of the M students (cached targets) with
   the teacher's own architecture, and the same with the paper's full-width network (random
   weights: the time does not depend on them): step time, compile time and achieved TFLOP/s
   (convolution FLOPs counted analytically, ``ustad.uninformed_students.flops``).
3. **Plan** (``ustad.uninformed_students.budget``). The epochs E ≤ 100 that fit: (budget − time
   so far − the estimated scoring and evaluation reserve − per-scale overheads) ÷ Σ_p (steps per
   epoch × step time). After each
   scale the plan is redone from the measured time, so later scales may get fewer epochs (each
   line says how many it got).
4. **Training** with ``ustad.uninformed_students.train.train_students`` (the library's own
   trainer), one
   scale after another into ``<out>/students/p<p>``; a finished scale is reused if the script
   runs again with the same settings.
5. **Quality**: AU-PRO@0.3, pixel and image AUROC (max of the map) on the 83 test images for each
   scale and the multi-scale average (``ustad.uninformed_students.score.score_sets``,
   ``ustad.evaluation.reports``).
6. **Scoring speed**: ``Detector.score`` img/s for each scale and multi-scale at batch 1 and 16
   (after a warm-up, median of repeats, host transfer included) and achieved TFLOP/s.

One JSON line per fact (``"kind"``: setup, step, plan, train, quality, scoring_speed, summary) on
stdout and appended to ``--results``; a Markdown table at the end. ``--tiny``: 40², 8 training
and 8 test images, the small teachers, 1 epoch, a few timed repeats, the paper-width probe at the
smallest p only: the whole path in minutes on a CPU (synthetic data when the bottle folder is
missing).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

START = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import ustad  # noqa: E402,F401  (fast CPU flags before JAX starts)

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "mvtec_dir",
    None,
    "MVTec AD root (default: $MVTEC_DIR, .gpu_data/mvtec_ad, "
    "../shared/data/mvtec_ad, the first that exists)",
)
flags.DEFINE_string("category", "bottle", "category")
flags.DEFINE_integer("image_size", 256, "square image size")
flags.DEFINE_list("patch_sizes", ["17", "33", "65"], "receptive fields p")
flags.DEFINE_integer("num_students", 3, "M")
flags.DEFINE_integer("max_epochs", 100, "the paper's epochs; fewer when they do not fit")
flags.DEFINE_float("budget_s", 540.0, "wall-time box for the whole run, this process included")
flags.DEFINE_string("teachers", "auto", "auto | small | p=name,... (see the module docstring)")
flags.DEFINE_string("dtype", "float32", "students' compute dtype (float32: the paper's)")
flags.DEFINE_integer("probe_steps", 5, "timed steps per network in the step probe")
flags.DEFINE_bool("probe_paper_width", True, "also time the paper's full-width step per p")
flags.DEFINE_list("score_batches", ["1", "16"], "batch sizes of the scoring-speed lines")
flags.DEFINE_integer("score_repeats", 5, "timed scoring calls per (set, batch)")
flags.DEFINE_string("out", None, "work folder: students, synthetic data (default: runs/gpu_paper)")
flags.DEFINE_string(
    "results", None, "JSON-lines file to append to (default: $OUT/gpu_paper.jsonl, else in --out)"
)
flags.DEFINE_bool("tiny", False, "40², 8+8 images, small teachers, 1 epoch: the CPU check")


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
    trains = {r["p"]: r for r in records if r["kind"] == "train"}
    quality = [r for r in records if r["kind"] == "quality"]
    speed = [r for r in records if r["kind"] == "scoring_speed"]
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
        ps = r["patch_sizes"]
        teachers = ", ".join(trains[p]["teacher"] for p in ps if p in trains)
        epochs = "/".join(str(trains[p]["epochs"]) for p in ps if p in trains)
        lines.append(
            f"| {r['scores']} | {teachers} | {epochs} | {r['au_pro']:.3f} | "
            f"{r['pixel_auroc']:.3f} | {r['image_auroc']:.3f} |"
        )
    lines += ["", "| scores | batch | img/s | TFLOP/s |", "|---|---|---|---|"]
    lines += [
        f"| {r['scores']} | {r['batch']} | {r['img_per_s']} | {r['tflop_per_s']} |" for r in speed
    ]
    return "\n".join(lines)


def main(argv):
    del argv
    import jax
    import numpy as np

    from benchmarks.common import device_name
    from ustad.data.mvtec import category_folder, load_mvtec_test, load_mvtec_train
    from ustad.data.split import split_validation
    from ustad.evaluation import metrics
    from ustad.uninformed_students.budget import (
        epochs_that_fit,
        scale_overhead_s,
        scoring_reserve_s,
    )
    from ustad.uninformed_students.flops import scoring_flops
    from ustad.uninformed_students.inputs import size_multiple
    from ustad.uninformed_students.nets import patch_net
    from ustad.uninformed_students.score import Detector, score_sets
    from ustad.uninformed_students.teacher.catalog import choose_teachers, load_teacher
    from ustad.uninformed_students.train import train_students

    tiny = FLAGS.tiny
    size = 40 if tiny else FLAGS.image_size  # 40: p = 65 reflect-pads by up to 34
    patch_sizes = [int(p) for p in FLAGS.patch_sizes]
    max_epochs = 1 if tiny else FLAGS.max_epochs
    probe_steps = 2 if tiny else FLAGS.probe_steps
    repeats = 2 if tiny else FLAGS.score_repeats
    # Checkpoints stay out of $OUT (the device tool returns only small, shallow files from it).
    out = FLAGS.out or os.path.join("runs", "gpu_paper")
    results = FLAGS.results or os.path.join(os.environ.get("OUT") or out, "gpu_paper.jsonl")
    os.makedirs(out, exist_ok=True)

    mvtec_dir = FLAGS.mvtec_dir or default_mvtec_dir()
    data_source = os.path.join(mvtec_dir, FLAGS.category) if mvtec_dir else ""
    if not (data_source and os.path.isdir(data_source)):
        if not tiny:
            raise FileNotFoundError(
                f"no {FLAGS.category} folder under {mvtec_dir!r}: pass --mvtec_dir (on the GPU "
                f"machine: carry .gpu_data, see benchmarks/gpu_paper.sh --prepare)"
            )
        from ustad.data.synthetic import make_synthetic_category

        mvtec_dir = os.path.join(out, "data")
        make_synthetic_category(
            mvtec_dir,
            FLAGS.category,
            image_size=size,
            num_train=10,
            num_test_good=4,
            num_test_per_defect=1,
        )
        data_source = f"synthetic ({os.path.join(mvtec_dir, FLAGS.category)})"
    train, _ = load_mvtec_train(
        mvtec_dir, FLAGS.category, image_size=size, multiple=size_multiple(patch_sizes)
    )
    test = load_mvtec_test(category_folder(mvtec_dir, FLAGS.category), image_size=(size, size))
    test_images, masks, labels = test.images, test.masks, test.labels
    if tiny:
        train = train[:8]
        good, bad = np.flatnonzero(labels == 0)[:4], np.flatnonzero(labels == 1)[:4]
        pick = np.concatenate([good, bad])
        test_images, masks, labels = test_images[pick], masks[pick], labels[pick]

    teachers = choose_teachers(patch_sizes, "small" if tiny else FLAGS.teachers)
    described = {}
    for p, name in teachers.items():
        module, _, meta = load_teacher(name)
        widths = [getattr(layer, "features", None) for layer in module.layers]
        described[p] = {
            "name": name,
            "out_dim": module.out_dim,
            "first_width": next(w for w in widths if w),
            "full_width": not name.endswith("_small"),
            "steps": meta.get("step"),
            "module": module,
        }
    emit = Emitter(
        results,
        {"device": device_name(), "tiny": tiny, "image_size": size, "category": FLAGS.category},
    )
    emit(
        "setup",
        jax_version=jax.__version__,
        backend=jax.default_backend(),
        data=data_source,
        train_images=len(train),
        test_images=len(test_images),
        defective=int(labels.sum()),
        patch_sizes=patch_sizes,
        num_students=FLAGS.num_students,
        max_epochs=max_epochs,
        budget_s=FLAGS.budget_s,
        dtype=FLAGS.dtype,
        teachers={
            str(p): {k: v for k, v in d.items() if k != "module"} for p, d in described.items()
        },
        note="p17/p65 full-width teachers are not shipped: those scales use the ⅛-width ones",
    )

    # 2. Step probe.
    key = jax.random.key(0)
    probes = {}
    for p in patch_sizes:
        networks = [(described[p]["name"], described[p]["module"])]
        # --tiny times the paper width at the smallest p only (seconds per step on a CPU).
        wanted = FLAGS.probe_paper_width and (not tiny or p == min(patch_sizes))
        if wanted and described[p]["full_width"] is False:
            networks.append(("paper width (random weights)", patch_net(p, out_dim=128)))
        for label, network in networks:
            probe = probe_step(
                network,
                size,
                FLAGS.num_students,
                FLAGS.dtype,
                probe_steps,
                jax.random.fold_in(key, p),
            )
            if label == described[p]["name"]:
                probes[p] = probe
            emit(
                "step",
                p=p,
                network=label,
                batch=1,
                num_students=FLAGS.num_students,
                dtype=FLAGS.dtype,
                **{k: v for k, v in probe.items() if not k.startswith("_")},
            )

    # 3. Plan.
    steps_per_epoch = len(split_validation(len(train), 0.1, 0)[0])  # the trainer's split
    timings = {p: probe["_timing"] for p, probe in probes.items()}
    overhead = {p: scale_overhead_s(t, len(train)) for p, t in timings.items()}
    reserve = scoring_reserve_s(
        list(timings.values()),
        num_students=FLAGS.num_students,
        num_test=len(test_images),
        score_batches=[int(b) for b in FLAGS.score_batches],
        repeats=repeats,
    )
    per_epoch = sum(steps_per_epoch * t.step_s for t in timings.values())
    fit = {"steps_per_epoch": steps_per_epoch, "reserve_s": reserve, "num_train": len(train)}
    epochs = epochs_that_fit(
        FLAGS.budget_s - elapsed(), list(timings.values()), **fit, max_epochs=max_epochs
    )
    emit(
        "plan",
        epochs=epochs,
        max_epochs=max_epochs,
        steps_per_epoch=steps_per_epoch,
        estimated_epoch_s=round(per_epoch, 1),
        estimated_overhead_s={str(p): round(v, 1) for p, v in overhead.items()},
        reserve_s=round(reserve, 1),
        fits_paper=epochs >= FLAGS.max_epochs,
    )

    # 4. Training, re-planned after each scale from the time it took.
    args = {
        "num_students": FLAGS.num_students,
        "dtype": FLAGS.dtype,
        "log_every": 1 if tiny else 25,
    }
    scales, trained_epochs = [], {}
    for i, p in enumerate(patch_sizes):
        rest = [timings[q] for q in patch_sizes[i:]]
        left = FLAGS.budget_s - elapsed()
        scale_epochs = min(epochs, epochs_that_fit(left, rest, **fit, max_epochs=max_epochs))
        # Named by the epochs: the trainer refuses to resume a run with other settings.
        workdir = os.path.join(out, "students", f"p{p}_e{scale_epochs}")
        t0 = time.perf_counter()
        scale = train_students(
            students_config(p, teachers[p], scale_epochs, size, args), workdir, train, patch_size=p
        )
        wall = time.perf_counter() - t0
        scales.append(scale)
        trained_epochs[p] = scale_epochs
        emit(
            "train",
            p=p,
            teacher=teachers[p],
            epochs=scale_epochs,
            steps=scale_epochs * steps_per_epoch,
            wall_s=round(wall, 1),
            train_img_per_s=train_log_img_per_s(workdir),
            probe_step_ms=probes[p]["step_ms"],
            normalization=scale.normalization.as_dict(),
        )

    # 5. Quality on the test set.
    t0 = time.perf_counter()
    score_maps, image_scores = score_sets(scales, test_images, batch_size=16)
    scoring_s = time.perf_counter() - t0
    for name, maps in score_maps.items():
        ps = patch_sizes if name == "multiscale" else [int(name[1:].split("_")[0])]
        emit(
            "quality",
            scores=name,
            patch_sizes=ps,
            epochs={str(q): trained_epochs[q] for q in ps},
            teachers={str(q): teachers[q] for q in ps},
            au_pro=float(metrics.au_pro(maps, masks, 0.3)),
            pixel_auroc=float(metrics.pixel_auroc(maps, masks)),
            image_auroc=float(metrics.image_auroc(image_scores[name], labels)),
            image_score="max of the map",
            scoring_all_sets_s=round(scoring_s, 1),
        )

    # 6. Scoring speed.
    score_flops = {
        s.patch_size: scoring_flops(s.network, size, size, s.num_students) for s in scales
    }
    speed_sets = [([s], f"p{s.patch_size}") for s in scales]
    if len(scales) > 1:
        speed_sets.append((scales, "multiscale"))
    for members, name in speed_sets:
        for batch in (int(b) for b in FLAGS.score_batches):
            if elapsed() > FLAGS.budget_s - 5:
                emit("scoring_speed", scores=name, batch=batch, skipped="out of time")
                continue
            detector = Detector(members, batch_size=batch)
            seconds = time_scoring(detector, test_images, batch, repeats)
            flops = sum(score_flops[s.patch_size] for s in members) * batch
            emit(
                "scoring_speed",
                scores=name,
                batch=batch,
                img_per_s=round(batch / seconds, 2),
                ms_per_image=round(seconds / batch * 1e3, 2),
                tflop_per_s=round(flops / seconds / 1e12, 3),
                gflop_per_image=round(flops / batch / 1e9, 2),
            )
    emit("summary", total_s=round(elapsed(), 1), budget_s=FLAGS.budget_s, epochs=trained_epochs)
    print(markdown(emit.records), flush=True)


if __name__ == "__main__":
    app.run(main)
