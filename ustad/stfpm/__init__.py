"""STFPM (Wang et al., BMVC 2021): a frozen ImageNet backbone as teacher and students of the same
architecture matching its L2-normalised feature pyramid.

``nets`` (pyramid networks) · ``maps`` (the maths: loss, level scores, anomaly map) · ``steps``
(jitted training step, validation) · ``run`` (a run's set-up) · ``train`` · ``checkpoints``
(workdir format, trained model) · ``score`` (the detector). The same file names as
:mod:`ustad.uninformed_students`.
"""
