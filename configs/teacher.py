"""Teacher pretraining configs (paper §3): ``get_config("p17" | "p33" | "p65" | "smoke")``.

Run from the repository root::

    python scripts/train_teacher.py --config configs/teacher.py:p65 --workdir runs/teacher_p65

Each ``--config.<field>=<value>`` overrides a field, e.g. ``--config.channels=1`` for a teacher of
grayscale data (MNIST) or ``--config.source=tfds --config.tfds_name=imagenet2012`` for ImageNet
crops. An interrupted run resumes from its newest checkpoint with the same command.

Runtimes of the paper's 50,000 steps of 64 patches, from benchmarks/teacher_step.py with
EfficientNet-Lite0 as P on native-size patches (see RUNTIME below):

* 2-core CPU (Xeon, AVX-512, shared with other jobs): p=17 ~0.3 s/step (~4 h), p=33 ~0.3 s/step
  (~4 h), p=65 ~0.6 s/step (~8 h).
* One H100: minutes per teacher.
"""

from __future__ import annotations

import ml_collections

SMALL_WIDTHS = 0.125
SMALL_OUT_DIM = 32


def base_config() -> ml_collections.ConfigDict:
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
    # over 256 patches, so L_k starts at the variance of P's features; "default" = Flax's.
    config.init_decoder = "mean"
    # Continue a teacher file or name (T̂, D and its step count; Adam restarts), e.g. to train a
    # shipped teacher further: --config.init_from=p33 --config.num_steps=40000.
    config.init_from = ""

    # Optimisation (paper): Adam 2e-4, weight decay 1e-5 (L2, as PyTorch), 64 patches, 50k steps.
    config.learning_rate = 2e-4
    config.weight_decay = 1e-5
    config.batch_size = 64
    config.num_steps = 50_000
    config.fast_apply = True  # T̂ via ustad.train.teacher.train_apply: same net, faster on CPU
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


def get_config(arg: str = "p65") -> ml_collections.ConfigDict:
    """Configs by name.

    * ``p17``, ``p33``, ``p65``: one receptive field, the paper's settings on the bundled
      natural photos. Command: ``python scripts/train_teacher.py --config
      configs/teacher.py:p65 --workdir runs/teacher_p65`` (export it with
      ``scripts/export_teacher.py --install NAME`` to use it by name; the students' configs
      default to the shipped teachers). Runtime: see the module docstring (hours on 2 CPU
      cores, minutes on one H100). The shipped teachers were trained on
      ``--config.source=folder --config.source_path=../shared/data/photos``.
    * ``p17_small``, ``p33_small``, ``p65_small``: the small family (⅛ widths, d = 32), for
      students that train in minutes on a CPU.
    * ``smoke``: p=17 with 1/16 widths, 20 steps of 8 patches, all three losses: ``python
      scripts/train_teacher.py --config configs/teacher.py:smoke --workdir /tmp/ustad_teacher``
      runs end to end in well under a minute on CPU (EfficientNet-Lite0 from its pip package).
    """
    config = base_config()
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
        f"unknown config {arg!r}; choose p17, p33, p65, p17_small, p33_small, p65_small or smoke"
    )
