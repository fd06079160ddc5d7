"""Student training configs (paper §4): ``get_config("p17" | "p33" | "p65" | "multiscale" |
"smoke")``.

Run from the repository root::

    python scripts/train_students.py --config configs/students.py:p65 --workdir runs/students_p65
    python scripts/score.py --workdirs runs/students_p65 \\
        --images 'data/mvtec_ad/bottle/test/*/*.png' --out runs/students_p65/maps

Each ``--config.<field>=<value>`` overrides a field, e.g. ``--config.category=carpet``.

Runtimes are for MVTec AD "bottle" (209 train/good images, 188 trained after the validation
hold-out), 100 epochs, batch 1, M = 3, i.e. 18 800 steps. One step (exact dense extraction,
forward + backward of 3 students) costs at 256²: 3.6 TFLOP for p=17, 2.1 for p=33, 3.2 for
p=65 (0.93 TFLOP for p=65 at 128²):

* 2-core CPU (AMD EPYC, AVX2; shared with other jobs, load ≈ 5): 31 s per step at 128²
  (benchmarks/student_step.py, 30 GFLOP/s), so 256² would take weeks: train on a GPU.
* One H100 (not measured here): at a conservative 100 TFLOP/s, 20–40 ms per step at 256², i.e.
  ~10 minutes per scale plus the teacher pass; ``multiscale`` about 3× that.
"""

from __future__ import annotations

import ml_collections

PATCH_SIZES = {"p17": (17,), "p33": (33,), "p65": (65,), "multiscale": (17, 33, 65)}
# Epochs per scale of the ``cpu`` preset (a p = 33 step costs ~2× a p = 17 one on CPU).
CPU_EPOCHS = {"p17": 10, "p33": 12}


def base_config() -> ml_collections.ConfigDict:
    """The paper's settings; every other config starts from these."""
    config = ml_collections.ConfigDict()
    # Data: an MVTec-AD-layout category; train/good is split into training and validation.
    config.data_dir = "data/mvtec_ad"
    config.category = "bottle"
    # An int (square) or "(H, W)"; keep_aspect: the short side to image_size, the long side
    # by the same factor, both rounded to the pooling stride (non-square inspection images).
    config.image_size = ml_collections.FieldReference(256, field_type=object)
    config.keep_aspect = False
    config.grayscale = False
    config.val_fraction = 0.1  # paper: "a validation set"; its size is unstated
    config.synthetic_data = False  # write a synthetic category into data_dir first (smoke)

    # Networks. The teacher: a name (the teachers shipped with ustad: `ustad teachers` lists
    # them), a teacher file or a teacher workdir; "{p}" is replaced by the patch size; "random"
    # = an untrained teacher (smoke only).
    config.patch_sizes = (65,)
    config.teacher_workdir = "p{p}"
    config.teacher_widths = None  # only for a random teacher: None = paper widths
    config.out_dim = 128  # only for a random teacher; a loaded teacher brings its own
    config.num_students = 3  # M

    # Optimisation (paper §4): Adam 1e-4, weight decay 1e-5 (L2, as PyTorch), batch 1.
    config.epochs = 100
    config.batch_size = 1
    config.learning_rate = 1e-4
    config.weight_decay = 1e-5
    # Options beyond the paper (benchmarks/convergence.py measures them; RESULTS.md):
    # lr_schedule "constant" (paper) or "cosine" (decay to 0 at the last step), after a linear
    # warm-up of warmup_steps; crop_size c > 0 trains each step on batch_size exact-context
    # c×c crops of different images instead of whole images (ustad/train/student_crops.py).
    config.lr_schedule = "constant"
    config.warmup_steps = 0
    config.crop_size = 0
    config.compute_dtype = "float32"  # "bfloat16": students in bf16, params/loss in float32
    config.padding = "reflect"  # mode of the p − 1 padding of dense extraction (dense.py)
    # How the M students are run in the step: "vmap" (batched) or "sequential" (one after another
    # in one program); "auto" = sequential on CPU (measured faster), vmap on accelerators.
    config.member_strategy = "auto"
    config.seed = 0
    config.prng_impl = "threefry2x32"  # "rbg": faster to compile on CPU, sharding-dependent

    # Teacher targets: "auto" caches them in float32 if they fit in the budget, else float16,
    # else runs the teacher in every step ("none"). Budget 0 = half the available host memory.
    config.target_cache = "auto"
    config.target_cache_max_gb = 0.0
    config.stats_batch_size = 4  # images per teacher call (statistics, cache)
    config.eval_batch_size = 4  # images per call for the score normalisation

    # Devices: a ("data", "ensemble") mesh over num_devices (0 = all) devices.
    config.num_devices = 0
    config.ensemble_axis_size = 1  # > 1 splits the M students over that many devices

    # Bookkeeping.
    config.checkpoint_every_steps = 0  # 0 = at the end of every epoch
    config.keep_checkpoints = 2
    config.log_every_steps = 50
    return config


def get_config(arg: str = "p65") -> ml_collections.ConfigDict:
    """Configs by name.

    * ``p17``, ``p33``, ``p65``: one receptive field, the paper's settings. Command:
      ``python scripts/train_students.py --config configs/students.py:p65 --workdir
      runs/students_p65`` (teacher: the shipped ``p65``, or any name/file/workdir in
      ``--config.teacher_workdir``). Runtime: see the module
      docstring (weeks on 2 CPU cores at 256², minutes on one H100).
    * ``multiscale``: all three in one run, each into ``<workdir>/p17``, ``p33``, ``p65``;
      ``scripts/score.py --workdirs <workdir>`` averages them. About 3× the p65 runtime.
    * ``p17_small``, ``p33_small``, ``p65_small``, ``multiscale_small``: the same with the
      shipped small teachers (an eighth of the widths, d = 32): ~40× fewer FLOPs per step.
    * ``cpu``: the preset for 2 CPU cores: the small p = 17 and p = 33 teachers at 128², batch 2,
      Adam 3e-3 constant, ``scale_epochs`` p17 10 / p33 12 (~30 minutes of student training;
      RESULTS.md has its bottle figures). ``ustad train-students --config=configs/students.py:cpu
      --workdir=runs/bottle_cpu --config.data_dir=<mvtec root> --config.category=bottle``.
    * ``smoke``: tiny random teacher, 32² synthetic images written to ``/tmp`` on the fly, 2
      epochs: ``python scripts/train_students.py --config configs/students.py:smoke --workdir
      /tmp/ustad_smoke`` runs end to end in under a minute on CPU (no data, no teacher needed;
      45 s on the shared 2-core CPU, mostly compilation).
    """
    config = base_config()
    if arg in PATCH_SIZES:
        config.patch_sizes = PATCH_SIZES[arg]
        return config
    if arg == "cpu":
        # The most bottle AU-PRO measured per CPU-minute (benchmarks/convergence.py, RESULTS.md
        # "Students per CPU-minute"): the shipped small teachers at 128², p = 17 and 33 (p65_small
        # reached only 0.53 in 10 minutes; 256² gave p = 17 0.64 after 8 epochs against 0.76 at
        # 128²), whole images in pairs at a constant Adam rate of 3e-3 (30× the paper's: 1e-3
        # plateaued lower, 1e-2 broke the students; a cosine decay and exact-context crops both
        # measured worse), epochs per scale sized to ~30 minutes of training on 2 AVX2 CPU cores.
        config.image_size = 128
        config.patch_sizes = (17, 33)
        config.teacher_workdir = "p{p}_small"
        config.batch_size = 2
        config.learning_rate = 3e-3
        config.epochs = CPU_EPOCHS["p33"]
        config.scale_epochs = dict(CPU_EPOCHS)
        return config
    if arg.endswith("_small") and arg[: -len("_small")] in PATCH_SIZES:
        # The shipped small teachers (⅛ widths, d = 32); students share their architecture.
        config.patch_sizes = PATCH_SIZES[arg[: -len("_small")]]
        config.teacher_workdir = "p{p}_small"
        return config
    if arg == "smoke":
        config.data_dir = "/tmp/ustad_smoke_data"
        config.category = "synthetic"
        config.synthetic_data = True
        config.image_size = 32
        config.patch_sizes = (17,)
        config.teacher_workdir = "random"
        config.teacher_widths = 1 / 16
        config.out_dim = 8
        config.epochs = 2
        config.batch_size = 2
        config.num_devices = 1
        config.val_fraction = 0.25
        config.log_every_steps = 2
        return config
    raise ValueError(
        f"unknown config {arg!r}; choose p17, p33, p65, multiscale (each also with _small), cpu or "
        f"smoke"
    )
