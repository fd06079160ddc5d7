"""Uninformed Students (Bergmann et al., CVPR 2020): a patch-descriptor teacher distilled from an
ImageNet network, M students regressing its dense descriptors, scored by normalised regression
error + predictive variance, averaged over receptive fields.

``nets`` (patch networks) · ``dense`` (fast dense extraction) · ``maps`` (targets, e/v, score
normalisation) · ``steps`` (jitted training step) · ``targets`` (teacher targets, cache) ·
``crops`` · ``inputs`` (input checks) · ``train`` · ``checkpoints`` (workdir format, trained
scale) · ``score`` (the detector) · ``export_graph`` (the exported scorer) · ``probes`` ·
``experiment`` (teacher → students → report) · ``teacher/`` (pretraining and shipped files).
"""
