"""Uninformed Students' settings: the paper's teacher (§3) and students (§4), and their presets.

The shared bases of the files in ``configs/`` (``students.py``, ``teacher.py``, ``demo.py``,
``paper_mvtec.py``, ``paper_one_class.py``), which build on these instead of importing each
other. Only the trainers and the CLI read the resulting ``ml_collections.ConfigDict`` s.
"""

from __future__ import annotations

import ml_collections

# Students.
PATCH_SIZES = {"p17": (17,), "p33": (33,), "p65": (65,), "multiscale": (17, 33, 65)}
# Updates per scale of the ``cpu`` preset (a p = 33 step costs ~2× a p = 17 one on CPU): the
# 10 and 12 epochs it was measured with on bottle (188 training images in pairs: 94 updates an
# epoch), now a count that holds for a category of any size.
CPU_UPDATES = {"p17": 940, "p33": 1128}
PAPER_UPDATES = 18_800  # 100 epochs of bottle's 188 training images at batch 1


def students_base_config() -> ml_collections.ConfigDict:
    """The paper's settings; every other config starts from these."""
    config = ml_collections.ConfigDict()
    # Data: an MVTec-AD-layout category; train/good is split into training and validation.
    config.data_dir = "data/mvtec_ad"
    config.category = "bottle"
    # An int (square) or "(H, W)"; keep_aspect: the short side to image_size, the long side
    # by the same factor, both rounded to the pooling stride (non-square inspection images);
    # "auto": that when the training images are not square (ustad.data.mvtec.
    # resolve_keep_aspect), else image_size as it is.
    config.image_size = ml_collections.FieldReference(256, field_type=object)
    config.keep_aspect = ml_collections.FieldReference("auto", field_type=object)
    # True: train on exact-context image_size² crops of the native-size images (keep_aspect
    # unused) and normalise and calibrate on their tiles; score with `ustad score --tile`.
    config.train_tiles = False
    config.grayscale = False
    config.val_fraction = 0.1  # paper: "a validation set"; its size is unstated
    # ... but at least this many images (at most a quarter): 10 % of a 54-image category is 5
    # images, too few pixels for stable score statistics.
    config.val_min_images = 8
    config.synthetic_data = False  # write a synthetic category into data_dir first (smoke)

    # Networks. The teacher: a name (the teachers shipped with ustad: `ustad teachers` lists
    # them), a teacher file or a teacher workdir; "{p}" is replaced by the patch size; "random"
    # = an untrained teacher (smoke only). An optional ``scale_teachers`` ({"p33": name, ...})
    # names one scale's teacher instead (e.g. a scale's teacher as it was before a new one was
    # shipped under its name).
    config.patch_sizes = (65,)
    config.teacher_workdir = "p{p}"
    config.teacher_widths = None  # only for a random teacher: None = paper widths
    config.out_dim = 128  # only for a random teacher; a loaded teacher brings its own
    config.num_students = 3  # M

    # Optimisation (paper §4): Adam 1e-4, weight decay 1e-5 (L2, as PyTorch), batch 1.
    config.epochs = 100
    # > 0: train at least this many updates (whole epochs) instead of ``epochs``;
    # ``scale_train_steps`` ({"p17": n, ...}) sets it per scale.
    config.train_steps = 0
    # A floor of updates whatever the category's size (whole epochs reaching it); 0: none.
    config.min_train_steps = 0
    # > 0: stop training after this many minutes (ustad.training_budget.Budget)
    config.max_minutes = 0.0
    # Validation (the students' loss on the held-out images, every eval_every_epochs epochs and
    # at the end): "best_val" keeps each student's variables of lowest validation loss, "last"
    # the last ones.
    config.select = "best_val"
    config.eval_every_epochs = 1
    # The score statistics on the held-out images (ustad.ensemble.score_statistics): "quantile"
    # (median and (q90 - q50) / 1.2816: a heavy tail of a few pixels cannot inflate them) or
    # "moments" (the paper's mean and σ).
    config.score_normalization = "quantile"
    config.batch_size = 1
    config.learning_rate = 1e-4
    config.weight_decay = 1e-5
    # Options beyond the paper (benchmarks/convergence.py measures them; RESULTS.md):
    # lr_schedule "constant" (paper) or "cosine" (decay to 0 at the last step), after a linear
    # warm-up of warmup_steps; crop_size c > 0 trains each step on batch_size exact-context
    # c×c crops of different images instead of whole images (crops.py).
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


def students_config(arg: str = "p65") -> ml_collections.ConfigDict:
    """The students' configs by name: ``p17``, ``p33``, ``p65``, ``multiscale`` (each also with
    ``_small``: the shipped small teachers), ``cpu`` (the 2-CPU-core preset) and ``smoke``.

    ``configs/students.py`` says each one's command, runtime and result.

    Raises:
      ValueError: for an unknown name.
    """
    config = students_base_config()
    if arg in PATCH_SIZES or (arg.endswith("_small") and arg[: -len("_small")] in PATCH_SIZES):
        # The paper's 100 epochs as a floor of updates: bottle's 188 training images at batch
        # 1 are 18,800 updates, which a 40-image category (32 trained) then gets too.
        config.min_train_steps = PAPER_UPDATES
    if arg in PATCH_SIZES:
        config.patch_sizes = PATCH_SIZES[arg]
        return config
    if arg == "cpu":
        # The most bottle AU-PRO measured per CPU-minute (benchmarks/convergence.py, RESULTS.md
        # "Students per CPU-minute"): the shipped small teachers at 128², p = 17 and 33 (p65_small
        # reached only 0.53 in 10 minutes; 256² gave p = 17 0.64 after 8 epochs against 0.76 at
        # 128²), whole images in pairs at a constant Adam rate of 3e-3 (30× the paper's: 1e-3
        # plateaued lower, 1e-2 broke the students; a cosine decay and exact-context crops both
        # measured worse), updates per scale sized to ~30 minutes of training on 2 AVX2 CPU cores
        # (bottle's 10 / 12 epochs, as a count of updates that does not shrink with the data).
        config.image_size = 128
        config.patch_sizes = (17, 33)
        config.teacher_workdir = "p{p}_small"
        config.batch_size = 2
        config.learning_rate = 3e-3
        config.scale_train_steps = dict(CPU_UPDATES)
        # A scale without its own count (e.g. --config.patch_sizes='(17, 33, 65)') would count
        # epochs: it still gets at least the fewest updates of the preset's scales.
        config.min_train_steps = min(CPU_UPDATES.values())
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


# Teachers.
SMALL_WIDTHS = 0.125
SMALL_OUT_DIM = 32
LIVE_SUFFIX = "_live"


def teacher_base_config() -> ml_collections.ConfigDict:
    """The paper's settings; every other config starts from these."""
    config = ml_collections.ConfigDict()
    # T̂: the paper's patch network for p; widths None = paper widths (a float scales them).
    config.patch_size = 65
    config.out_dim = 128
    # A placeholder, so that --config.widths=0.125 can override it on the command line.
    config.widths = ml_collections.config_dict.placeholder(float)
    config.channels = 3  # 1: grayscale teacher (T̂ sees luma; P sees it repeated to RGB)

    # P: an ImageNet network. The paper uses ResNet-18 (512-d), whose weights need a download;
    # EfficientNet-Lite0 (1280-d) ships with a pip package and works offline.
    config.backbone = "efficientnet_lite0"
    config.backbone_weights = ""  # a local weight file instead of the default
    # How a p×p patch reaches P (not stated in the paper): 0 = the native p×p patch; N = the
    # patch resized to N×N first. Native is the default: on a 300-step p=33 run with the
    # paper's losses it reached the same distillation loss as 224² (within noise) at a fraction
    # of the cost (224² made P 10-30x more expensive than T̂'s step); see the module docstring of
    # benchmarks/teacher_step.py for the numbers.
    config.backbone_input_size = 0
    # Or P's input as a factor of T̂'s window R: 0 = not used (native, or backbone_input_size);
    # e.g. 2.0 shows P the window resized to 2R×2R (at most one of the two is set).
    config.backbone_input_scale = 0.0
    # The distillation target (issue 23). () = the paper's: P's globally pooled head. At T̂'s
    # native 17 / 32 px window, EfficientNet-Lite0's head is mostly dead (1,161 of 1,280
    # dimensions exactly 0 at 17 px); (3, 4) = its stage-3 and stage-4 maps, each averaged over
    # the window, concatenated (40 + 80 = 120 dimensions, live at native size).
    # target_standardize: each dimension less its mean, over its std, both measured once on
    # target_sample_crops fixed crops and stored with the teacher. target_check: "refuse" (a
    # DeadTargetError) or "warn" when the target has dead or near-constant dimensions.
    config.target_stages = ()
    config.target_standardize = False
    config.target_sample_crops = 1024
    config.target_check = "warn"

    # Patches: "natural" (photos bundled with scikit-image/scikit-learn), "folder" (source_path:
    # a folder tree of photos, e.g. ../shared/data/photos or ImageNet's train/, less a fixed 5 %
    # held-out split; or a glob) or "tfds" (tfds_name via tfds.data_source, array_record).
    config.source = "natural"
    config.source_path = ""
    config.tfds_name = "imagenet2012"
    config.tfds_split = "train"
    config.tfds_data_dir = ""
    config.tfds_download = False
    config.crop_size = 0  # > p: a crop_size² region shrunk to p² (images scaled by p/crop_size)
    # Augmentation (the paper only says "random crops"): each crop is taken at one of these
    # resize factors of the photo (a crop covers 1×, 2× or 4× the pixels: several scales of
    # texture and structure), mirrored left-right half the time, and its brightness, contrast
    # and saturation scaled by factors in [1 − j, 1 + j].
    config.crop_levels = (1.0, 0.5, 0.25)
    config.flip = True
    config.color_jitter = 0.1
    config.pool_size = 1024  # images in memory at a time (a larger source is visited in pools)
    config.steps_per_pool = 64
    config.loader_workers = 8
    # Positives p⁺ (only drawn when lambda_m > 0): shift ±max_shift px, zoom ±zoom, noise.
    config.max_shift = 2.0
    config.zoom = 0.1
    config.noise_std = 0.02

    # Loss λ_k L_k + λ_m L_m + λ_c L_c (paper, MVTec AD: 1, 0, 1). The margin is not in the
    # paper. compactness_mode "squared" (Σ_{i≠j} c_ij², the default) was chosen by the probes
    # (RESULTS.md, Teachers): the paper's signed Σ_{i≠j} c_ij ("signed") reaches its floor −d
    # within a few hundred steps and then decorrelates nothing; "abs" is Σ_{i≠j} |c_ij|.
    config.lambda_k = 1.0
    config.lambda_m = 0.0
    config.lambda_c = 1.0
    config.margin = 1.0
    config.compactness_mode = "squared"
    # D's initialisation (not in the paper): "mean" = zero kernel and bias = P's mean feature
    # over 256 patches, so L_k starts at the variance of P's features (but no distillation
    # gradient reaches T̂ through a zero kernel at first); "lstsq" = the least-squares read-out
    # of the targets from the initial T̂ on those patches; "random" (or "default") = Flax's.
    config.init_decoder = "mean"
    # Log each weighted loss term's gradient norm (w.r.t. T̂) on the logged steps, and their
    # ratio grad_ratio_c_k (compactness / distillation): one extra backward pass per term there.
    config.log_grad_norms = True
    # Continue a teacher file or name (T̂, D and its step count; Adam restarts), e.g. to train a
    # shipped teacher further: --config.init_from=p33 --config.num_steps=40000.
    config.init_from = ""

    # Optimisation (paper): Adam 2e-4, weight decay 1e-5 (L2, as PyTorch), 64 patches, 50k steps.
    config.learning_rate = 2e-4
    config.weight_decay = 1e-5
    config.batch_size = 64
    config.num_steps = 50_000
    config.fast_apply = True  # T̂ via teacher.steps.train_apply: same net, faster on CPU
    config.seed = 0
    config.prng_impl = "threefry2x32"  # "rbg": compiles faster on CPU

    # Bookkeeping.
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 2
    config.log_every_steps = 100
    # > 0: also keep a float16 teacher file every this many steps in <workdir>/snapshots/, so
    # the probes (benchmarks/teacher_quality.py) can draw quality against training length.
    config.snapshot_every_steps = 0
    return config


def teacher_config(arg: str = "p65") -> ml_collections.ConfigDict:
    """The teachers' configs by name: ``p17``, ``p33``, ``p65``, ``p17_small``, ``p33_small``,
    ``p65_small`` (⅛ widths, d = 32) and ``smoke``; each also with ``_live`` (the live target
    of issue 23: standardised stage-3+4 features, D by least squares, lr 1e-3, 6,000 steps).

    ``configs/teacher.py`` says each one's command, runtime and result.

    Raises:
      ValueError: for an unknown name.
    """
    config = teacher_base_config()
    name = arg
    if arg in ("p17", "p33", "p65"):
        config.patch_size = int(arg[1:])
        return config
    live = arg.endswith(LIVE_SUFFIX)
    if live:
        arg = arg[: -len(LIVE_SUFFIX)]
        # The live target of issue 23: standardised stage-3+4 features of P's native window,
        # refused if any dimension is dead, D by least squares, Adam 1e-3, 6,000 steps.
        config.target_stages = (3, 4)
        config.target_standardize = True
        config.target_check = "refuse"
        config.init_decoder = "lstsq"
        config.learning_rate = 1e-3
        config.num_steps = 6000
        config.snapshot_every_steps = 1000
    if arg in ("p17", "p33", "p65"):
        config.patch_size = int(arg[1:])
        return config
    if arg in ("p17_small", "p33_small", "p65_small"):
        # The small family for CPU users: an eighth of the paper's widths, d = 32.
        config.patch_size = int(arg[1:3])
        config.widths = SMALL_WIDTHS
        config.out_dim = SMALL_OUT_DIM
        return config
    if arg == "smoke":
        config.patch_size = 17
        config.widths = 1 / 16
        config.out_dim = 16
        config.batch_size = 8
        config.num_steps = 20
        config.lambda_m = 1.0
        config.checkpoint_every_steps = 10
        config.log_every_steps = 5
        config.loader_workers = 2
        return config
    raise ValueError(
        f"unknown config {name!r}; choose p17, p33, p65, p17_small, p33_small, p65_small or smoke"
        f" (each also with {LIVE_SUFFIX})"
    )


# Validation: bad settings and a workdir that holds another run are refused before the trainer
# loads data or compiles anything (each of these once surfaced only after 17–37 s of set-up).
_POSITIVE_INTS = (
    "epochs", "num_students", "batch_size", "stats_batch_size", "eval_batch_size",
    "eval_every_epochs",
)  # fmt: skip
_NON_NEGATIVE_INTS = (
    "warmup_steps", "crop_size", "checkpoint_every_steps", "train_steps", "val_min_images",
    "min_train_steps",
)  # fmt: skip
_CHOICES = {
    "select": ("best_val", "last"),
    "score_normalization": ("quantile", "moments"),
    "keep_aspect": (False, True, "auto"),
    "train_tiles": (False, True),
    "lr_schedule": ("constant", "cosine"),
    "compute_dtype": ("float32", "bfloat16"),
    "member_strategy": ("auto", "vmap", "sequential"),
    "target_cache": ("auto", "float32", "float16", "none"),
}


def validate(config: ml_collections.ConfigDict, workdir: str | None = None) -> None:
    """Refuse settings no run can use, a teacher that cannot be found, and a ``workdir`` that
    holds a run with other settings, in one line naming the ``--config.<field>`` at fault.

    Cheap: reads no image, compiles nothing, and reads only the checkpoints' JSON metadata.

    Args:
      config: a students config (:func:`students_config`, overridden on the command line).
      workdir: the run's ``--workdir``; ``None`` skips the resume check.

    Raises:
      ValueError: a bad setting, or a workdir holding a run that differs.
      FileNotFoundError: no teacher of the name in ``teacher_workdir``.
    """
    from ustad.training_budget import check_max_minutes
    from ustad.training_checks import check_settings

    check_settings(
        config,
        positive_ints=_POSITIVE_INTS,
        non_negative_ints=_NON_NEGATIVE_INTS,
        choices=_CHOICES,
    )
    check_max_minutes(config)
    for field in ("scale_epochs", "scale_train_steps"):
        for p_name, count in (config.get(field) or {}).items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"--config.{field}.{p_name}={count!r}: must be an integer ≥ 1")
    for p_name, name in (config.get("scale_teachers") or {}).items():
        if p_name not in ("p17", "p33", "p65") or not isinstance(name, str) or not name:
            raise ValueError(
                f"--config.scale_teachers.{p_name}={name!r}: a teacher name, file or workdir "
                f"per scale p17, p33 or p65"
            )
    sizes = tuple(config.patch_sizes)
    if not sizes or any(p not in (17, 33, 65) for p in sizes) or len(set(sizes)) != len(sizes):
        raise ValueError(
            f"--config.patch_sizes={sizes!r}: distinct receptive fields among 17, 33 and 65"
        )
    _check_teachers(config)
    if workdir is not None:
        _check_resume(config, workdir)


def _check_teachers(config) -> None:
    """Each scale's teacher resolves (a workdir, a file or a name), or the error lists the
    teachers that exist and how to train or pass one."""
    from ustad.uninformed_students.teacher.catalog import resolve_teacher

    for p in config.patch_sizes:
        name = scale_teacher_name(config, p)
        if name != "random":
            resolve_teacher(name)


def scale_teacher_name(config, patch_size: int) -> str:
    """The teacher of one scale: ``scale_teachers["p<p>"]`` when given, else ``teacher_workdir``
    with ``{p}`` replaced (``"random"``: an untrained one)."""
    by_scale = config.get("scale_teachers") or {}
    name = by_scale.get(f"p{patch_size}")
    return str(name) if name else str(config.teacher_workdir).format(p=patch_size)


def _check_resume(config, workdir: str) -> None:
    """The checks the trainer makes on resuming (:func:`ustad.uninformed_students.checkpoints.
    check_compatible`), on the checkpoints' metadata only: the same message, before set-up."""
    from pathlib import Path

    from ustad.checkpointing import workdir_metadata
    from ustad.uninformed_students.checkpoints import check_same_settings

    sizes = tuple(config.patch_sizes)
    folders = [Path(workdir)] if len(sizes) == 1 else [Path(workdir) / f"p{p}" for p in sizes]
    for folder, p in zip(folders, sizes, strict=True):
        meta = workdir_metadata(folder)
        if meta is not None:
            expected = {"patch_size": p, "num_students": int(config.num_students)}
            check_same_settings(meta, config, folder, expected)
