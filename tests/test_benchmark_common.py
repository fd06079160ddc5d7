"""benchmarks/common.py: the device name that every raw line carries."""

from benchmarks import common


def test_vector_isa_names_the_widest_extension():
    assert common.vector_isa(["fpu", "sse2", "avx", "avx2", "fma"]) == "AVX2"
    assert common.vector_isa(["avx2", "avx512f", "avx512bw"]) == "AVX-512"
    assert common.vector_isa(["avx2", "avx512f", "avx512_bf16"]) == "AVX-512 bf16"
    assert common.vector_isa(["neon", "asimd"]) == ""


def test_cpu_device_name_counts_the_cores():
    name = common.device_name()
    assert name.startswith("cpu: ") and " cores" in name
