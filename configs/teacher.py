"""Teacher pretraining configs (paper §3): ``get_config("p17" | "p33" | "p65" | "smoke")``.

Run from the repository root::

    ustad train-teacher --config configs/teacher.py:p65 --workdir runs/teacher_p65

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

from ustad.uninformed_students.config import teacher_config


def get_config(arg: str = "p65") -> ml_collections.ConfigDict:
    """Configs by name.

    * ``p17``, ``p33``, ``p65``: one receptive field, the paper's settings on the bundled
      natural photos. Command: ``ustad train-teacher --config configs/teacher.py:p65
      --workdir runs/teacher_p65`` (then ``ustad teachers export --workdir runs/teacher_p65
      --out p65.teacher.npz --install NAME`` to use it by name; the students' configs default
      to the shipped teachers). Runtime: see the module docstring (hours on 2 CPU cores,
      minutes on one H100). The shipped teachers were trained on
      ``--config.source=folder --config.source_path=../shared/data/photos``.
    * ``p17_small``, ``p33_small``, ``p65_small``: the small family (⅛ widths, d = 32), for
      students that train in minutes on a CPU. The shipped ``p65_small`` and the teachers shipped
      as ``p17_small_head`` and ``p33_small_head`` were trained with these; the shipped
      ``p33_small`` (issue 23) with ``p33_small_live --config.lambda_c=0.3`` (below), the
      shipped ``p17_small`` with ``p17_small_live --config.lambda_c=0.3`` for 12,000 steps
      (6,000, then ``--config.init_from=<that snapshot> --config.num_steps=12000``).
    * ``<any of the above>_live`` (issue 23): the live target. P's pooled head is mostly dead at
      T̂'s native window (1,160 of 1,280 dimensions exactly 0 at 17 px, 494 at 32 px on 512
      photo crops: ``benchmarks/teacher_targets.py``); these distil P's stage-3 and stage-4
      maps, each averaged over the window, standardised per dimension with statistics of
      1,024 fixed photo crops stored in the teacher (``--config.target_stages=3,4
      --config.target_standardize=True``), refuse a target with dead dimensions
      (``--config.target_check=refuse``), start D by least squares
      (``--config.init_decoder=lstsq``, not a zero kernel), train at Adam 1e-3 for 6,000
      steps and keep a snapshot every 1,000. Command: ``ustad train-teacher --config
      configs/teacher.py:p17_small_live --workdir runs/p17_small_live
      --config.source=folder --config.source_path=../shared/data/photos``. Every run logs
      each loss term's gradient norm w.r.t. T̂ (``grad_norm_*``, ``grad_ratio_c_k``).
      ``--config.backbone_input_scale=2`` shows P the window resized to twice its side.
    * ``smoke``: p=17 with 1/16 widths, 20 steps of 8 patches, all three losses: ``ustad
      train-teacher --config configs/teacher.py:smoke --workdir /tmp/ustad_teacher``
      runs end to end in well under a minute on CPU (EfficientNet-Lite0 from its pip package).
    """
    return teacher_config(arg)
