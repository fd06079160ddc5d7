"""The paper's MVTec AD bottle run on one GPU, time-boxed: what ``benchmarks/gpu_paper.sh`` runs.

Two families on bottle at 256², as many of the papers' 100 epochs as fit in ``--budget_s``
(default 540 s = 9 min of wall time for everything, this process's start included), stated in
the output:

* **STFPM** (Wang et al.), ``configs/stfpm.py:lite0``: the paper's schedule (SGD 0.4, momentum
  0.9, weight decay 1e-4, batch 32, 100 epochs, EfficientNet-Lite0 ImageNet teacher), trained
  with :func:`ustad.families.train` (hold-out, best-validation selection, calibration, as
  ``ustad train-students``).
* **Uninformed Students**: p = 17, 33, 65 and their multi-scale average, M = 3 students per
  scale, batch 1, Adam 1e-4 / weight decay 1e-5 (paper §4).

STFPM goes **first**: its 100 epochs are a few hundred updates of a small network (500 on
bottle; expected well inside the cap on a GPU, not yet measured), and its training clock is
capped at ``--stfpm_share`` of the budget (``config.max_minutes``; default 0.2 = 108 s; its
compilation, teacher cache, calibration and scoring are outside that clock), so it cannot eat
the box; the Uninformed Students' plan, made after it, then divides the time actually left.
(Last, it would need a reserve guessed before it ran, and an overrun of the students' plan would
cost it its epochs.) In order:

1. **STFPM**: train (or reuse a finished run in ``<out>/stfpm/``), then its quality and scoring
   speed (steps 6 and 7 below); the ``train`` line says how many of the 100 epochs it got
   (``epochs``, ``updates``, ``stopped_by``: ``schedule`` or ``max_minutes``).
2. **Teachers.** Per p the full-width shipped teacher (``p33``) when ustad has one, else the
   small shipped one (``p17_small``, ``p65_small``: ⅛ widths, d = 32); full-width p = 17 and 65
   teachers are not shipped and a teacher's 50,000 steps do not fit in the box. Each line names
   the teacher of its scale. ``--teachers`` overrides (``small``, or ``17=p17_small,33=p33``).
3. **Step probe.** Per p, a few jitted training steps of the M students (cached targets) with
   the teacher's own architecture, and the same with the paper's full-width network (random
   weights: the time does not depend on them): step time, compile time and achieved TFLOP/s
   (convolution FLOPs counted analytically, ``ustad.uninformed_students.flops``).
4. **Plan** (``ustad.uninformed_students.budget``). The epochs E ≤ 100 that fit: (budget − time
   so far − the estimated scoring and evaluation reserve − per-scale overheads) ÷ Σ_p (steps per
   epoch × step time). After each scale the plan is redone from the measured time, so later
   scales may get fewer epochs (each line says how many it got).
5. **Training** with ``ustad.uninformed_students.train.train_students`` (the library's own
   trainer), one scale after another into ``<out>/students/p<p>``; a finished scale is reused
   if the script runs again with the same settings.
6. **Quality**: AU-PRO@0.3, pixel and image AUROC (max of the map) on the 83 test images for
   each scale, the multi-scale average and STFPM (``ustad.uninformed_students.score.score_sets``,
   :class:`ustad.stfpm.score.STFPMDetector`, ``ustad.evaluation.metrics``).
7. **Scoring speed**: ``score`` img/s of each family's detector, for each scale, multi-scale and
   STFPM at batch 1 and 16 (after a warm-up, median of repeats, host transfer included), and
   the Uninformed Students' achieved TFLOP/s.

One JSON line per fact (``"kind"``: setup, step, plan, train, quality, scoring_speed, summary;
``"family"``: ``stfpm`` or ``uninformed_students``) on stdout and appended to ``--results``; a
Markdown table at the end. ``--tiny``, the CPU check CI runs after the tests (``.ci/run``;
under a minute on 2 idle cores, nearly all of it compilation): 32², 8 training and 4 + 4 test
images of a synthetic category written into ``--out`` (the bottle folder only when
``--mvtec_dir`` names one), STFPM's ``smoke`` networks (a narrow random ResNet, batch 4), p = 17
alone with ``p17_small`` and M = 2, 1 epoch each, 2 probe steps, no paper-width probe, 2 timed
repeats and ``rbg`` random keys (threefry's initialisers compile ~4× slower on CPU): every kind
of line for both families, measuring nothing (no multi-scale lines: one scale). ``--patch_sizes``
and ``--num_students`` given with ``--tiny`` are kept (48² when p = 65 is among them).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

START = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import ustad  # noqa: E402,F401  (fast CPU flags before JAX starts)
from benchmarks.gpu_paper_parts import (  # noqa: E402
    STFPM,
    STUDENTS,
    Emitter,
    default_mvtec_dir,
    elapsed,
    markdown,
    probe_step,
    students_config,
    time_scoring,
    train_log_img_per_s,
)

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
flags.DEFINE_string("out", None, "work folder: models, synthetic data (default: runs/gpu_paper)")
flags.DEFINE_string(
    "results", None, "JSON-lines file to append to (default: $OUT/gpu_paper.jsonl, else in --out)"
)
flags.DEFINE_bool("stfpm", True, "train and measure STFPM first (see the module docstring)")
flags.DEFINE_float("stfpm_share", 0.2, "STFPM's training clock cap, a fraction of --budget_s")
flags.DEFINE_bool("tiny", False, "32², 8+8 images, smallest networks, 1 epoch: the CPU check")

# --tiny: the CPU check (under a minute on 2 cores, mostly compilation): the smallest shipped
# teacher and the fewest students that are an ensemble (on CPU the members run in turn inside
# the step, so each one adds to the compilation). 32² holds p ≤ 33 (reflect padding < the
# side) and STFPM's stride 16; 48² also p = 65 (stride 8) when --patch_sizes asks for it.
TINY_PATCH_SIZES = [17]
TINY_NUM_STUDENTS = 2


@dataclasses.dataclass(frozen=True)
class Settings:
    """What this run does, ``--tiny`` resolved (only :func:`settings` reads the flags for it)."""

    tiny: bool
    size: int
    patch_sizes: list[int]
    num_students: int
    max_epochs: int
    probe_steps: int
    probe_paper_width: bool
    repeats: int
    score_batches: list[int]
    out: str
    results: str
    # --tiny: "rbg" keys (XLA compiles threefry's random initialisers ~4× slower on CPU, and
    # the tiny run is mostly compilation); None: each config's own (threefry, the default).
    prng_impl: str | None


def settings() -> Settings:
    if not 0 < FLAGS.stfpm_share <= 1:  # (max_minutes = 0 would mean no cap at all)
        raise ValueError(f"--stfpm_share={FLAGS.stfpm_share}: in (0, 1]; --nostfpm skips STFPM")
    tiny = FLAGS.tiny
    patch_sizes = [int(p) for p in FLAGS.patch_sizes]
    if tiny and not FLAGS["patch_sizes"].present:
        patch_sizes = TINY_PATCH_SIZES
    num_students = FLAGS.num_students
    if tiny and not FLAGS["num_students"].present:
        num_students = TINY_NUM_STUDENTS
    # Checkpoints stay out of $OUT (the device tool returns only small, shallow files from it).
    out = FLAGS.out or os.path.join("runs", "gpu_paper")
    return Settings(
        tiny=tiny,
        size=(32 if max(patch_sizes) <= 33 else 48) if tiny else FLAGS.image_size,
        patch_sizes=patch_sizes,
        num_students=num_students,
        max_epochs=1 if tiny else FLAGS.max_epochs,
        probe_steps=2 if tiny else FLAGS.probe_steps,
        # (--tiny: seconds per paper-width step on a CPU, and its compilation, for no check)
        probe_paper_width=FLAGS.probe_paper_width and not tiny,
        repeats=2 if tiny else FLAGS.score_repeats,
        score_batches=[int(b) for b in FLAGS.score_batches],
        out=out,
        results=FLAGS.results or os.path.join(os.environ.get("OUT") or out, "gpu_paper.jsonl"),
        prng_impl="rbg" if tiny else None,
    )


def load_data(s: Settings):
    """``(mvtec_dir, description, train [N, H, W, 3], test)``: the category at ``s.size``;
    ``test`` has ``images``, ``masks`` and ``labels`` (``--tiny``: 8 train, 4 + 4 test images;
    a synthetic category written into ``s.out`` unless ``--mvtec_dir`` names a folder)."""
    import numpy as np

    from ustad.data.mvtec import category_folder, load_mvtec_test, load_mvtec_train
    from ustad.uninformed_students.inputs import size_multiple

    # --tiny does not look for the bottle folder: reading its 900² images takes minutes.
    mvtec_dir = FLAGS.mvtec_dir or ("" if s.tiny else default_mvtec_dir())
    source = os.path.join(mvtec_dir, FLAGS.category) if mvtec_dir else ""
    if not (source and os.path.isdir(source)):
        if not s.tiny:
            raise FileNotFoundError(
                f"no {FLAGS.category} folder under {mvtec_dir!r}: pass --mvtec_dir (on the GPU "
                f"machine: carry .gpu_data, see benchmarks/gpu_paper.sh --prepare)"
            )
        from ustad.data.synthetic import make_synthetic_category

        mvtec_dir = os.path.join(s.out, "data")
        source = make_synthetic_category(
            mvtec_dir,
            FLAGS.category,
            image_size=s.size,
            num_train=10,
            num_test_good=4,
            num_test_per_defect=1,
            overwrite=True,  # (the same images again: they depend only on the arguments)
        )
        source = f"synthetic ({source})"
    train, _ = load_mvtec_train(
        mvtec_dir, FLAGS.category, image_size=s.size, multiple=size_multiple(s.patch_sizes)
    )
    test = load_mvtec_test(category_folder(mvtec_dir, FLAGS.category), image_size=(s.size,) * 2)
    if s.tiny:
        train = train[:8]
        good, bad = np.flatnonzero(test.labels == 0)[:4], np.flatnonzero(test.labels == 1)[:4]
        pick = np.concatenate([good, bad])
        test = dataclasses.replace(
            test, images=test.images[pick], masks=test.masks[pick], labels=test.labels[pick]
        )
    return mvtec_dir, source, train, test


def describe_teachers(s: Settings) -> tuple[dict, dict]:
    """``(names, described)``: the teacher of each p (``--tiny``: the small ones) and what the
    setup line says of it (its module under ``"module"``)."""
    from ustad.uninformed_students.teacher.catalog import choose_teachers, load_teacher

    teachers = choose_teachers(s.patch_sizes, "small" if s.tiny else FLAGS.teachers)
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
    return teachers, described


def stfpm_config(s: Settings, mvtec_dir: str, max_minutes: float):
    """``configs/stfpm.py:lite0`` (``--tiny``: ``smoke``'s random narrow ResNet, batch 4) on
    this run's category and size, ``max_minutes`` on its training clock."""
    from configs import stfpm as stfpm_configs

    config = stfpm_configs.get_config("smoke" if s.tiny else "lite0")
    config.data_dir, config.category = mvtec_dir, FLAGS.category
    config.synthetic_data = False  # (smoke) the data are already there
    config.image_size = s.size
    config.epochs = s.max_epochs
    config.min_train_steps = 0  # the paper's epochs as they are; the time box sets the work
    config.max_minutes = max_minutes
    config.num_devices = 1
    config.checkpoint_every_epochs = 10**9  # one checkpoint, at the end (saves cost GPU time)
    config.log_every_steps = 1 if s.tiny else 25
    if s.prng_impl:
        config.prng_impl = s.prng_impl
    return config


def run_stfpm(emit: Emitter, s: Settings, mvtec_dir: str, test) -> None:
    """STFPM's train, quality and scoring-speed lines (step 1 of the module docstring)."""
    from ustad import families
    from ustad.checkpointing import workdir_metadata
    from ustad.evaluation import metrics
    from ustad.stfpm.score import STFPMDetector

    cap_s = FLAGS.stfpm_share * FLAGS.budget_s
    config = stfpm_config(s, mvtec_dir, cap_s / 60)
    name = "smoke" if s.tiny else "lite0"
    # Named by the epochs: the trainer refuses to resume a run with other settings.
    workdir = os.path.join(s.out, "stfpm", f"{name}_e{config.epochs}")
    t0 = time.perf_counter()
    model = families.train(config, workdir)
    wall = time.perf_counter() - t0
    meta = workdir_metadata(workdir)
    updates, per_epoch = meta["updates"], meta["steps_per_epoch"]
    epochs = round(updates / per_epoch, 1)  # fractional when max_minutes stopped it
    epochs = int(epochs) if epochs.is_integer() else epochs
    common = {"family": STFPM, "scores": STFPM}
    emit(
        "train",
        **common,
        config=name,
        backbone=config.backbone,
        teacher=meta["teacher_source"],
        epochs=epochs,
        max_epochs=config.epochs,
        updates=updates,
        steps_per_epoch=per_epoch,
        stopped_by=meta.get("stopped_by"),
        training_clock_cap_s=round(cap_s, 1),
        training_clock_s=round(meta.get("budget_seconds", 0.0), 1),
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        train_images=meta["train_images"],
        val_images=meta["val_images"],
        selected_epochs=meta.get("selected_epochs"),
        wall_s=round(wall, 1),
        train_img_per_s=train_log_img_per_s(workdir),
    )
    t0 = time.perf_counter()
    maps, image_scores = STFPMDetector([model], batch_size=16).score(test.images)
    emit(
        "quality",
        **common,
        teacher=meta["teacher_source"],
        epochs=epochs,
        max_epochs=config.epochs,
        au_pro=float(metrics.au_pro(maps, test.masks, 0.3)),
        pixel_auroc=float(metrics.pixel_auroc(maps, test.masks)),
        image_auroc=float(metrics.image_auroc(image_scores, test.labels)),
        image_score="max of the map",
        scoring_s=round(time.perf_counter() - t0, 1),
    )
    for batch in s.score_batches:
        seconds = time_scoring(
            STFPMDetector([model], batch_size=batch), test.images, batch, s.repeats
        )
        emit(
            "scoring_speed",
            **common,
            batch=batch,
            img_per_s=round(batch / seconds, 2),
            ms_per_image=round(seconds / batch * 1e3, 2),
        )


def run_probes(emit: Emitter, s: Settings, described: dict) -> dict:
    """Step 3: the step lines; the probe of each p's own network, by p."""
    import jax

    from ustad.uninformed_students.nets import patch_net

    key = jax.random.key(0, impl=s.prng_impl)
    probes = {}
    for p in s.patch_sizes:
        networks = [(described[p]["name"], described[p]["module"])]
        if s.probe_paper_width and described[p]["full_width"] is False:
            networks.append(("paper width (random weights)", patch_net(p, out_dim=128)))
        for label, network in networks:
            probe = probe_step(
                network,
                s.size,
                s.num_students,
                FLAGS.dtype,
                s.probe_steps,
                jax.random.fold_in(key, p),
            )
            if label == described[p]["name"]:
                probes[p] = probe
            emit(
                "step",
                family=STUDENTS,
                p=p,
                network=label,
                batch=1,
                num_students=s.num_students,
                dtype=FLAGS.dtype,
                **{k: v for k, v in probe.items() if not k.startswith("_")},
            )
    return probes


def train_scales(emit: Emitter, s: Settings, train, num_test: int, teachers, probes):
    """Steps 4 and 5: the plan line, then each scale trained and re-planned from the time it
    took; returns ``(scales, epochs by p)``."""
    from ustad.data.split import split_validation
    from ustad.uninformed_students.budget import (
        epochs_that_fit,
        scale_overhead_s,
        scoring_reserve_s,
    )
    from ustad.uninformed_students.train import train_students

    steps_per_epoch = len(split_validation(len(train), 0.1, 0)[0])  # the trainer's split
    timings = {p: probe["_timing"] for p, probe in probes.items()}
    overhead = {p: scale_overhead_s(t, len(train)) for p, t in timings.items()}
    reserve = scoring_reserve_s(
        list(timings.values()),
        num_students=s.num_students,
        num_test=num_test,
        score_batches=s.score_batches,
        repeats=s.repeats,
    )
    per_epoch = sum(steps_per_epoch * t.step_s for t in timings.values())
    fit = {"steps_per_epoch": steps_per_epoch, "reserve_s": reserve, "num_train": len(train)}
    epochs = epochs_that_fit(
        FLAGS.budget_s - elapsed(), list(timings.values()), **fit, max_epochs=s.max_epochs
    )
    emit(
        "plan",
        family=STUDENTS,
        epochs=epochs,
        max_epochs=s.max_epochs,
        steps_per_epoch=steps_per_epoch,
        estimated_epoch_s=round(per_epoch, 1),
        estimated_overhead_s={str(p): round(v, 1) for p, v in overhead.items()},
        reserve_s=round(reserve, 1),
        fits_paper=epochs >= FLAGS.max_epochs,
    )
    args = {
        "num_students": s.num_students,
        "dtype": FLAGS.dtype,
        "log_every": 1 if s.tiny else 25,
        "prng_impl": s.prng_impl,
    }
    scales, trained_epochs = [], {}
    for i, p in enumerate(s.patch_sizes):
        rest = [timings[q] for q in s.patch_sizes[i:]]
        left = FLAGS.budget_s - elapsed()
        scale_epochs = min(epochs, epochs_that_fit(left, rest, **fit, max_epochs=s.max_epochs))
        # Named by the epochs: the trainer refuses to resume a run with other settings.
        workdir = os.path.join(s.out, "students", f"p{p}_e{scale_epochs}")
        t0 = time.perf_counter()
        config = students_config(p, teachers[p], scale_epochs, s.size, args)
        scale = train_students(config, workdir, train, patch_size=p)
        wall = time.perf_counter() - t0
        scales.append(scale)
        trained_epochs[p] = scale_epochs
        emit(
            "train",
            family=STUDENTS,
            p=p,
            teacher=teachers[p],
            epochs=scale_epochs,
            steps=scale_epochs * steps_per_epoch,
            wall_s=round(wall, 1),
            train_img_per_s=train_log_img_per_s(workdir),
            probe_step_ms=probes[p]["step_ms"],
            normalization=scale.normalization.as_dict(),
        )
    return scales, trained_epochs


def measure_scales(emit: Emitter, s: Settings, scales, test, teachers, trained_epochs) -> None:
    """Steps 6 and 7 for the Uninformed Students: quality and scoring speed lines."""
    from ustad.evaluation import metrics
    from ustad.uninformed_students.flops import scoring_flops
    from ustad.uninformed_students.score import Detector, score_sets

    t0 = time.perf_counter()
    score_maps, image_scores = score_sets(scales, test.images, batch_size=16)
    scoring_s = time.perf_counter() - t0
    for name, maps in score_maps.items():
        ps = s.patch_sizes if name == "multiscale" else [int(name[1:].split("_")[0])]
        emit(
            "quality",
            family=STUDENTS,
            scores=name,
            patch_sizes=ps,
            epochs={str(q): trained_epochs[q] for q in ps},
            teachers={str(q): teachers[q] for q in ps},
            au_pro=float(metrics.au_pro(maps, test.masks, 0.3)),
            pixel_auroc=float(metrics.pixel_auroc(maps, test.masks)),
            image_auroc=float(metrics.image_auroc(image_scores[name], test.labels)),
            image_score="max of the map",
            scoring_all_sets_s=round(scoring_s, 1),
        )
    score_flops = {
        sc.patch_size: scoring_flops(sc.network, s.size, s.size, sc.num_students) for sc in scales
    }
    speed_sets = [([sc], f"p{sc.patch_size}") for sc in scales]
    if len(scales) > 1:
        speed_sets.append((scales, "multiscale"))
    for members, name in speed_sets:
        for batch in s.score_batches:
            if elapsed() > FLAGS.budget_s - 5:
                emit(
                    "scoring_speed",
                    family=STUDENTS,
                    scores=name,
                    batch=batch,
                    skipped="out of time",
                )
                continue
            detector = Detector(members, batch_size=batch)
            seconds = time_scoring(detector, test.images, batch, s.repeats)
            flops = sum(score_flops[sc.patch_size] for sc in members) * batch
            emit(
                "scoring_speed",
                family=STUDENTS,
                scores=name,
                batch=batch,
                img_per_s=round(batch / seconds, 2),
                ms_per_image=round(seconds / batch * 1e3, 2),
                tflop_per_s=round(flops / seconds / 1e12, 3),
                gflop_per_image=round(flops / batch / 1e9, 2),
            )


def main(argv):
    del argv
    import jax

    from benchmarks.common import device_name

    s = settings()
    os.makedirs(s.out, exist_ok=True)
    mvtec_dir, source, train, test = load_data(s)
    teachers, described = describe_teachers(s)
    emit = Emitter(
        s.results,
        {"device": device_name(), "tiny": s.tiny, "image_size": s.size, "category": FLAGS.category},
    )
    emit(
        "setup",
        jax_version=jax.__version__,
        backend=jax.default_backend(),
        data=source,
        families=[STFPM, STUDENTS] if FLAGS.stfpm else [STUDENTS],
        train_images=len(train),
        test_images=len(test.images),
        defective=int(test.labels.sum()),
        patch_sizes=s.patch_sizes,
        num_students=s.num_students,
        max_epochs=s.max_epochs,
        budget_s=FLAGS.budget_s,
        stfpm_share=FLAGS.stfpm_share,
        dtype=FLAGS.dtype,
        teachers={
            str(p): {k: v for k, v in d.items() if k != "module"} for p, d in described.items()
        },
        note="p17/p65 full-width teachers are not shipped: those scales use the ⅛-width ones",
    )
    if FLAGS.stfpm:  # first: bounded, and the students' plan then sees what it left
        run_stfpm(emit, s, mvtec_dir, test)
    probes = run_probes(emit, s, described)
    scales, trained_epochs = train_scales(emit, s, train, len(test.images), teachers, probes)
    measure_scales(emit, s, scales, test, teachers, trained_epochs)
    epochs = {str(p): e for p, e in trained_epochs.items()}
    stfpm_train = [r for r in emit.records if r["kind"] == "train" and r["family"] == STFPM]
    if stfpm_train:
        epochs[STFPM] = stfpm_train[0]["epochs"]
    emit("summary", total_s=round(elapsed(), 1), budget_s=FLAGS.budget_s, epochs=epochs)
    print(markdown(emit.records), flush=True)


if __name__ == "__main__":
    app.run(main)
