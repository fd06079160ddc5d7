"""Test settings: 4 fake CPU devices, float32 matmuls at full precision."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

import ustad  # noqa: E402,F401  (sets XLA flags before the backend starts)

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_default_matmul_precision", "highest")
