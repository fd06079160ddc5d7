"""ustad: Uninformed Students anomaly detection (Bergmann et al., CVPR 2020) in JAX/Flax."""

from ustad import _xla_flags  # noqa: F401  (must run before JAX starts a backend)
from ustad.dense import dense_apply
from ustad.ensemble import apply_ensemble, init_ensemble
from ustad.models.patch_net import PatchNet, patch_net

__version__ = "0.1.0"

__all__ = ["PatchNet", "apply_ensemble", "dense_apply", "init_ensemble", "patch_net"]
