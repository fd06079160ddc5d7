"""STFPM's settings (Wang et al., BMVC 2021): the paper's, the authors' code's where the paper is
silent, and their presets; the base of ``configs/stfpm.py``. Only the trainer and the CLI read
the resulting ``ml_collections.ConfigDict``.
"""

from __future__ import annotations

import ml_collections


def stfpm_base_config() -> ml_collections.ConfigDict:
    """The paper's settings (the authors' code where the paper is silent)."""
    config = ml_collections.ConfigDict()
    config.family = "stfpm"  # ustad train-students dispatches on it
    # Data: an MVTec-AD-layout category; only train/good is read.
    config.data_dir = "data/mvtec_ad"
    config.category = "bottle"
    config.image_size = 256
    config.synthetic_data = False  # write a synthetic category into data_dir first (smoke)
    config.val_fraction = 0.2  # the authors' code: 20 % of train/good, seed 0

    # Networks: teacher and student share the architecture.
    config.backbone = "efficientnet_lite0"  # or "resnet18" (the paper's)
    # Stages returned (None: resnet18 layer1-3; efficientnet_lite0 stages 2, 3, 5).
    config.levels = ml_collections.FieldReference(None, field_type=object)
    config.tiny = False  # narrow, shallow random networks (tests, smoke)
    config.teacher_weights = "imagenet"  # or "random" (tests and smoke runs only)
    config.backbone_weights = ""  # a local weight file instead of the default
    config.num_students = 1  # M; > 1 adds the ensemble scores

    # Scores (stored with the model; ustad score/evaluate use them).
    config.score = "error"  # or "error_variance" (normalised e + v, M > 1)
    config.combination = "product"  # over levels: "product" (paper), "sum", "mean"

    # Optimisation: the authors' code (the paper body was not readable here).
    config.epochs = 100
    config.batch_size = 32
    config.learning_rate = 0.4
    config.momentum = 0.9
    config.weight_decay = 1e-4
    config.level_weights = ml_collections.FieldReference(None, field_type=object)  # α_l = 1
    config.select = "best_val"  # each student's epoch of lowest validation loss, or "last"
    config.eval_every_epochs = 1
    config.seed = 0
    config.prng_impl = "threefry2x32"
    config.member_strategy = "auto"  # vmap on accelerators, members in turn on CPU

    # Teacher maps: computed once per training image when they fit ("none": every step).
    config.teacher_cache = "auto"
    config.teacher_cache_max_gb = 4.0
    config.eval_batch_size = 8

    # Devices: a ("data", "ensemble") mesh over num_devices (0 = all).
    config.num_devices = 0
    config.ensemble_axis_size = 1

    # Bookkeeping.
    config.checkpoint_every_epochs = 1
    config.keep_checkpoints = 2
    config.log_every_steps = 5
    return config


def stfpm_config(arg: str = "lite0") -> ml_collections.ConfigDict:
    """STFPM's configs by name: ``lite0``, ``resnet18``, ``ensemble``, ``cpu``, ``cpu_ensemble``
    and ``smoke``; ``configs/stfpm.py`` says each one's command, runtime and result.

    Raises:
      ValueError: for an unknown name.
    """
    config = stfpm_base_config()
    if arg == "lite0":
        return config
    if arg == "resnet18":
        config.backbone = "resnet18"
        return config
    if arg in ("ensemble", "cpu_ensemble"):
        config.num_students = 3
        config.score = "error_variance"
        config.combination = "mean"
    if arg in ("cpu", "cpu_ensemble"):
        config.epochs = 3
        config.batch_size = 8
        config.log_every_steps = 5
        return config
    if arg == "ensemble":
        return config
    if arg == "smoke":
        config.data_dir = "/tmp/ustad_smoke_data"
        config.category = "synthetic"
        config.synthetic_data = True
        config.image_size = 32
        config.backbone = "resnet18"
        config.tiny = True
        config.teacher_weights = "random"
        config.epochs = 2
        config.batch_size = 4
        config.num_devices = 1
        config.val_fraction = 0.25
        config.log_every_steps = 1
        return config
    raise ValueError(
        f"unknown config {arg!r}; choose lite0, resnet18, ensemble, cpu, cpu_ensemble or smoke"
    )
