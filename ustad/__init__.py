"""ustad: Uninformed Students anomaly detection (Bergmann et al., CVPR 2020) in JAX/Flax.

The re-exports below are imported on first use (module ``__getattr__``), so that importing a
module that needs neither Flax nor the networks, such as :mod:`ustad.deploy_runtime` behind
``ustad.deploy.load``, does not import them.
"""

import importlib
from typing import TYPE_CHECKING

from ustad import _xla_flags  # noqa: F401  (must run before JAX starts a backend)

__version__ = "0.1.0"

# Public name → the module that defines it.
_EXPORTS = {
    "PatchNet": "ustad.models.patch_net",
    "apply_ensemble": "ustad.ensemble",
    "dense_apply": "ustad.dense",
    "init_ensemble": "ustad.ensemble",
    "patch_net": "ustad.models.patch_net",
}

__all__ = ["PatchNet", "apply_ensemble", "dense_apply", "init_ensemble", "patch_net"]

if TYPE_CHECKING:
    from ustad.dense import dense_apply
    from ustad.ensemble import apply_ensemble, init_ensemble
    from ustad.models.patch_net import PatchNet, patch_net


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ustad' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
