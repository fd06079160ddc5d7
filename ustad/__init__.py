"""ustad: student–teacher anomaly detection in JAX/Flax: Uninformed Students (Bergmann et al.,
CVPR 2020) and STFPM (Wang et al., BMVC 2021).

The public names below are imported on first use (module ``__getattr__``), so that importing a
module that needs neither Flax nor the networks, such as :mod:`ustad.deploy.runtime` behind
``ustad.deploy.load``, does not import them. Where things live: ARCHITECTURE.md.
"""

import importlib
from typing import TYPE_CHECKING

from ustad import xla_flags  # noqa: F401  (must run before JAX starts a backend)

__version__ = "0.1.0"

_TEACHERS = "ustad.uninformed_students.teacher.catalog"
# Public name → the module that defines it.
_EXPORTS = {
    "Detector": "ustad.uninformed_students.score",
    "PatchNet": "ustad.uninformed_students.nets",
    "STFPMDetector": "ustad.stfpm.score",
    "apply_ensemble": "ustad.ensemble",
    "dense_apply": "ustad.uninformed_students.dense",
    "family_of": "ustad.families",
    "init_ensemble": "ustad.ensemble",
    "list_teachers": _TEACHERS,
    "load_detector": "ustad.families",
    "load_teacher": _TEACHERS,
    "patch_net": "ustad.uninformed_students.nets",
}

__all__ = [
    "Detector",
    "PatchNet",
    "STFPMDetector",
    "apply_ensemble",
    "dense_apply",
    "family_of",
    "init_ensemble",
    "list_teachers",
    "load_detector",
    "load_teacher",
    "patch_net",
]

if TYPE_CHECKING:
    from ustad.ensemble import apply_ensemble, init_ensemble
    from ustad.families import family_of, load_detector
    from ustad.stfpm.score import STFPMDetector
    from ustad.uninformed_students.dense import dense_apply
    from ustad.uninformed_students.nets import PatchNet, patch_net
    from ustad.uninformed_students.score import Detector
    from ustad.uninformed_students.teacher.catalog import list_teachers, load_teacher


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ustad' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
