"""Deploy a trained detector: one file that scores images without ustad's training code.

* :mod:`ustad.deploy.writer` writes it (``.onnx`` or ``.jaxexport``; Uninformed Students
  workdirs) and checks it against the checkpoint;
* :mod:`ustad.deploy.runtime` reads and runs it with NumPy and JAX (or ONNX Runtime) only.

The names below are imported on first use, so ``from ustad.deploy import load`` imports neither
Flax nor the training code (tests/test_deploy.py checks it).
"""

import importlib

# Public name → the module that defines it.
_EXPORTS = {
    "ExportedDetector": "ustad.deploy.runtime",
    "SUFFIXES": "ustad.deploy.runtime",
    "load": "ustad.deploy.runtime",
    "read_header": "ustad.deploy.runtime",
    "CHECK_TOLERANCE": "ustad.deploy.writer",
    "DEFAULT_METHOD": "ustad.deploy.writer",
    "FORMAT": "ustad.deploy.writer",
    "check_export": "ustad.deploy.writer",
    "export": "ustad.deploy.writer",
    "export_jax": "ustad.deploy.writer",
    "export_onnx": "ustad.deploy.writer",
    "header": "ustad.deploy.writer",
    "load_scales": "ustad.deploy.writer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ustad.deploy' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
