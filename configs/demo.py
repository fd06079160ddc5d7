"""The demo: the whole method at small scale, offline, on CPU (``make demo``).

    ustad demo --out demo_out                                  # synthetic data
    ustad demo --out bottle_out --config.data_dir=/data/mvtec_ad --config.category=bottle

Data: with ``data_dir`` empty (the default) the demo writes a synthetic category of
``synthetic`` texture (``synthetic_options``) into ``<out>/data``; with ``data_dir`` set it reads
``<data_dir>/<category>`` in the MVTec layout and makes nothing up (``synthetic`` is then
ignored; ``--config.synthetic=none`` with an empty ``data_dir`` is an error asking for one).

A synthetic category (real scikit-image texture, procedural defects with exact masks) → the
shipped small teachers ``p17_small`` and ``p33_small`` (distilled from EfficientNet-Lite0 on real
photographs, never the demo data; ``ustad teachers`` lists them) → M = 3 students → anomaly
maps → report (metrics table, PRO/ROC curves, heatmap overlays). ``--config.teacher_workdir=``
(empty) trains the teachers of ``config.teacher`` instead (500 steps each).

What is smaller than the paper, to fit a few minutes on 2 CPU cores: 64×64 images, p = 17 and 33
at an eighth of the paper's widths (d = 32), 12 student epochs (paper: 100). Everything else is
the paper's pipeline and the same code paths as the full configs.
"""

from __future__ import annotations

import ml_collections

from ustad.stfpm.config import stfpm_config
from ustad.uninformed_students.config import students_config, teacher_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg
    config = ml_collections.ConfigDict()
    config.data_dir = ""  # "": synthetic data in <out>/data; else read <data_dir>/<category>
    config.category = "grass_demo"
    config.image_size = 64
    config.grayscale = False
    config.synthetic = "grass"  # texture of the synthetic category ("none": never synthesise)
    config.synthetic_options = ml_collections.ConfigDict(
        {"num_train": 32, "num_test_good": 12, "num_test_per_defect": 6, "seed": 0}
    )
    config.patch_sizes = (17, 33)
    # The shipped small teachers by name; empty: train the teachers below into <out>/teacher_p<p>.
    config.teacher_workdir = "p{p}_small"

    teacher = teacher_config("p33")
    teacher.widths = 0.125
    teacher.out_dim = 32
    teacher.batch_size = 32
    teacher.num_steps = 500
    teacher.checkpoint_every_steps = 250
    teacher.log_every_steps = 50
    config.teacher = teacher

    students = students_config("p33")
    students.num_students = 3
    students.epochs = 12
    students.batch_size = 2
    students.val_fraction = 0.2
    students.log_every_steps = 20
    students.checkpoint_every_steps = 100
    # The demo counts its 12 epochs: students_config's floor of updates for small categories
    # (the paper's 18,800 at p = 33) would make its minute of student training 25 minutes.
    students.min_train_steps = 0
    config.students = students

    # STFPM beside, on the same data and test set: its CPU preset (60 updates of batch 8,
    # EfficientNet-Lite0 from the pip package, offline), so a first run shows both families.
    config.stfpm_beside = True
    config.stfpm = stfpm_config("cpu")

    config.report = ml_collections.ConfigDict({"examples_per_type": 1})
    return config
