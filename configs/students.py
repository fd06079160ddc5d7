"""Student training configs (paper §4): ``get_config("p17" | "p33" | "p65" | "multiscale" |
"smoke")``.

Run from the repository root::

    ustad train-students --config configs/students.py:p65 --workdir runs/students_p65
    ustad score --workdirs runs/students_p65 \\
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

from ustad.uninformed_students.config import students_config


def get_config(arg: str = "p65") -> ml_collections.ConfigDict:
    """Configs by name.

    * ``p17``, ``p33``, ``p65``: one receptive field, the paper's settings. Command:
      ``ustad train-students --config configs/students.py:p65 --workdir
      runs/students_p65`` (teacher: the shipped ``p65``, or any name/file/workdir in
      ``--config.teacher_workdir``). Runtime: see the module
      docstring (weeks on 2 CPU cores at 256², minutes on one H100).
    * ``multiscale``: all three in one run, each into ``<workdir>/p17``, ``p33``, ``p65``;
      ``ustad score --workdirs <workdir>`` averages them. About 3× the p65 runtime.
    * ``p17_small``, ``p33_small``, ``p65_small``, ``multiscale_small``: the same with the
      shipped small teachers (an eighth of the widths, d = 32): ~40× fewer FLOPs per step.
    * ``cpu``: the preset for 2 CPU cores: the small p = 17 and p = 33 teachers at 128², batch 2,
      Adam 3e-3 constant, ``scale_train_steps`` p17 940 / p33 1128 updates (bottle's 10 / 12
      epochs; ~30 minutes of student training;
      RESULTS.md has its bottle figures). ``ustad train-students --config=configs/students.py:cpu
      --workdir=runs/bottle_cpu --config.data_dir=<mvtec root> --config.category=bottle``.
    * ``smoke``: tiny random teacher, 32² synthetic images written to ``/tmp`` on the fly, 2
      epochs: ``ustad train-students --config configs/students.py:smoke --workdir
      /tmp/ustad_smoke`` runs end to end in under a minute on CPU (no data, no teacher needed;
      45 s on the shared 2-core CPU, mostly compilation).

    Floors of updates, whatever the category's size: ``cpu`` its ``scale_train_steps``; the
    paper's names (``p17`` … ``multiscale_small``) 100 epochs but at least bottle's 18,800
    updates (``min_train_steps``; 0 turns the floor off, e.g. to train fewer epochs). Every
    name validates the students on the held-out good images after each epoch (their training
    loss there) and keeps each student's variables of lowest validation loss
    (``select="best_val"``; ``"last"``: the paper's last step); each scale's final checkpoint
    records ``selected_steps``, ``selected_val_loss``, ``val_history`` and
    ``val_loss_flattened``. ``--config.max_minutes=N`` stops each scale at the first update
    after N minutes of its training (compilation not counted; a resumed run gets the rest of
    its budget) and records ``stopped_by: "max_minutes"``. ``keep_aspect="auto"`` (default)
    keeps a non-square category's aspect (short side ``image_size``, both sides multiples of
    the pooling stride).
    """
    return students_config(arg)
