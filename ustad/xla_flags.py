"""Fast exact CPU convolutions by default.

XLA's default CPU convolution ran ~4× slower than oneDNN on the paper's 5×5 convs; the YNNPACK
dot fusion closes the gap with the same results (to ~1e-6, see benchmarks/RESULTS.md). XLA reads
``XLA_FLAGS`` once, when the first backend starts, so this must run before any computation.
Set ``USTAD_FAST_CPU=0`` to keep XLA's defaults.
"""

import os

FAST_CPU_FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot"


def enable_fast_cpu() -> bool:
    """Add :data:`FAST_CPU_FLAG` to ``XLA_FLAGS`` unless disabled or already set."""
    if os.environ.get("USTAD_FAST_CPU", "1") == "0":
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return False
    os.environ["XLA_FLAGS"] = (flags + " " + FAST_CPU_FLAG).strip()
    return True


enable_fast_cpu()
