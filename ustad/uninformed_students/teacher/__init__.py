"""Teacher pretraining (paper §3) and teacher files: distil an ImageNet network P into the patch
network T̂.

``sources`` (photo folders and other image sources) · ``patches`` (crops, triplet
perturbations) · ``losses`` · ``steps`` (jitted step) · ``train`` · ``distillation`` (how well
T̂ regresses P: the distillation probe) · ``files`` (the teacher file format) · ``catalog``
(teachers by name: list, resolve, load, export, install) · ``shipping`` (maintainers: a
finished run into ``ustad/teachers/`` with its manifest entry).
"""
