"""program_cache.cached_jit: a later process reads the traced program instead of tracing again,
gets the same numbers as jax.jit, and never reuses a program whose key, code, arguments or
environment differ."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ustad import program_cache as pc


@pytest.fixture
def cache_dir(tmp_path):
    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))
    yield tmp_path / "jax" / pc.SUBDIR
    jax.config.update("jax_compilation_cache_dir", previous)


def _counting(scale):
    traces = []

    def fn(params, images):
        traces.append(images.shape)  # runs only while tracing
        return jnp.tanh(images @ params["w"] + params["b"]) * scale

    return fn, traces


def _args(batch=3, seed=0):
    rng = np.random.default_rng(seed)
    params = {"w": rng.normal(size=(5, 4)).astype(np.float32), "b": np.float32(0.5)}
    return jax.device_put(params), jnp.asarray(rng.normal(size=(batch, 5)).astype(np.float32))


def test_a_new_process_reads_the_program_instead_of_tracing(cache_dir):
    args = _args()
    fn, traces = _counting(2.0)
    first = pc.cached_jit(fn, ("toy", 2.0))(*args)
    assert len(traces) == 1 and len(list(cache_dir.glob("*.jaxexport"))) == 1
    np.testing.assert_array_equal(first, jax.jit(fn)(*args))  # the same numbers as jax.jit
    # A new function object and wrapper (as in a new process; JAX's own trace cache does not
    # know it) with the same key: no tracing, the same numbers.
    fresh, fresh_traces = _counting(2.0)
    again = pc.cached_jit(fresh, ("toy", 2.0))
    np.testing.assert_array_equal(again(*args), first)
    np.testing.assert_array_equal(again(*_args(seed=1)), jax.jit(fn)(*_args(seed=1)))
    assert fresh_traces == []
    assert len(list(cache_dir.glob("*.jaxexport"))) == 1


def test_another_key_shape_or_code_traces_anew(cache_dir, monkeypatch):
    args = _args()
    fn, traces = _counting(2.0)
    pc.cached_jit(fn, ("toy", 2.0))(*args)
    other, other_traces = _counting(3.0)
    # The bound value differs and so does the key: its own program, never the 2.0 one.
    np.testing.assert_allclose(pc.cached_jit(other, ("toy", 3.0))(*args), jax.jit(other)(*args))
    assert len(other_traces) == 1
    pc.cached_jit(fn, ("toy", 2.0))(*_args(batch=4))  # another batch: another program
    assert traces == [(3, 5), (4, 5)]
    monkeypatch.setattr(pc, "code_fingerprint", lambda: "edited source")
    fresh, fresh_traces = _counting(2.0)  # a new process after the package's code changed
    pc.cached_jit(fresh, ("toy", 2.0))(*args)
    assert fresh_traces == [(3, 5)]
    assert len(list(cache_dir.glob("*.jaxexport"))) == 4


def test_without_a_cache_folder_or_a_stable_key_it_is_plain_jit(cache_dir, tmp_path):
    args = _args()
    fn, traces = _counting(2.0)
    pc.cached_jit(fn, ("toy", object()))(*args)  # repr names an address: not kept
    assert not cache_dir.exists()
    jax.config.update("jax_compilation_cache_dir", None)
    np.testing.assert_array_equal(pc.cached_jit(fn, ("toy", 2.0))(*args), jax.jit(fn)(*args))
    assert pc.program_folder() is None and not cache_dir.exists()


def test_a_damaged_program_file_is_traced_again_and_replaced(cache_dir):
    args = _args()
    fn, traces = _counting(2.0)
    pc.cached_jit(fn, ("toy", 2.0))(*args)
    (path,) = cache_dir.glob("*.jaxexport")
    path.write_bytes(b"damaged")
    fresh, fresh_traces = _counting(2.0)
    np.testing.assert_array_equal(pc.cached_jit(fresh, ("toy", 2.0))(*args), jax.jit(fn)(*args))
    assert len(fresh_traces) == 1 and path.read_bytes() != b"damaged"
