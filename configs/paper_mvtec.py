"""The paper's MVTec AD experiment (Table 1): ``get_config("paper" | "reduced" | "smoke")``.

    python -m benchmarks.paper_mvtec --data_dir /data/mvtec_ad --categories bottle,carpet \\
        --config configs/paper_mvtec.py:paper --out runs/paper_mvtec

* ``paper``: 256×256, p = 17, 33, 65 and multi-scale, M = 3, 100 epochs, batch 1, teachers of
  50,000 steps (trained into ``<out>/<category>/teacher_p<p>`` unless
  ``--config.teacher_workdir=runs/teacher_p{p}`` points at finished ones, which is what you want
  for more than one category: the teachers never see MVTec data, so one set serves all). Runtime:
  days per category on 2 CPU cores; on one H100 about 10 minutes of student training per scale
  and category plus the teachers once.
* ``reduced``: the same pipeline at 128×128, p = 33 only, 20 epochs, a 5,000-step teacher: the
  schedule a CPU can finish in a few hours. The table states which schedule produced it.
* ``cpu``: the students' ``cpu`` preset (configs/students.py): the shipped small teachers at
  128×128, p = 17, 33 and multi-scale, M = 3, batch 2, Adam 3e-3, 10 / 12 epochs: about
  27 minutes of student training on 2 AVX2 CPU cores for one category, 14 on 2 AVX-512 cores
  (RESULTS.md).
* ``cpu_p33``: the former ``cpu`` schedule: 128×128, p = 33 only, M = 3, 2 epochs at the paper's
  rate, a teacher given by ``--config.teacher_workdir``.
* ``smoke``: tiny networks and 2 epochs, to check the wiring (seconds).
"""

from __future__ import annotations

import ml_collections

from ustad.uninformed_students.config import students_config, teacher_config


def get_config(arg: str = "paper") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.schedule = arg
    config.data_dir = ""  # set by --data_dir
    config.category = ""  # set per category
    config.image_size = 256
    config.grayscale = False
    config.synthetic = None
    config.patch_sizes = (17, 33, 65)
    config.teacher_workdir = ""
    config.teacher = teacher_config("p65")
    students = students_config("p65")
    students.num_students = 3
    students.epochs = 100
    students.batch_size = 1
    config.students = students
    config.report = ml_collections.ConfigDict({"examples_per_type": 2})
    if arg == "paper":
        return config
    # The reduced schedules count their epochs: students_config's floor of updates for small
    # categories (the paper's 18,800) would turn smoke's 1 epoch into 18,800 updates.
    config.students.min_train_steps = 0
    if arg == "reduced":
        config.image_size = 128
        config.patch_sizes = (33,)
        config.teacher.num_steps = 5000
        config.students.epochs = 20
        return config
    if arg == "cpu":
        # configs/students.py:cpu, the preset measured in benchmarks/convergence.py.
        students = students_config("cpu")
        config.image_size = students.image_size
        config.patch_sizes = students.patch_sizes
        config.teacher_workdir = students.teacher_workdir
        config.students = students
        return config
    if arg == "cpu_p33":
        # The former cpu schedule (RESULTS.md: bottle AU-PRO 0.525): p = 33, 2 epochs, the
        # paper's rate, a teacher given by --config.teacher_workdir.
        config.image_size = 128
        config.patch_sizes = (33,)
        config.teacher.num_steps = 3000
        config.students.epochs = 2
        return config
    if arg == "smoke":
        config.image_size = 32
        config.patch_sizes = (17, 33)
        config.teacher = teacher_config("smoke")
        config.students.epochs = 1
        config.students.num_students = 2
        config.students.val_fraction = 0.25
        config.report.examples_per_type = 1
        return config
    raise ValueError(f"unknown config {arg!r}; choose paper, reduced, cpu, cpu_p33 or smoke")
