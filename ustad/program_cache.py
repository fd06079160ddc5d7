"""Jitted functions whose traced program is kept on disk, so a later process skips tracing.

JAX's persistent compilation cache (turned on by the commands,
:func:`ustad.cli.main.enable_compilation_cache`) skips XLA's compilation in a second process,
but not the Python tracing and lowering in front of it, which for a detector's networks
(Flax modules, every layer traced) costs more than reading the compiled program back.
:func:`cached_jit` keeps the lowered program as a ``jax.export`` file in
``<compilation cache>/ustad-programs/``: a later process with the same key reads it (a few
milliseconds) instead of tracing, and the program it compiles is the same one, so it is found in
the compilation cache too.

A file is used only when everything the program depends on matches, hashed into its name: the
caller's key (the static arguments of the function: networks, sizes, options), the source of
every module of the ``ustad`` package, the versions of Python, JAX, jaxlib and Flax, JAX's
configuration, the device kind and count, and each argument's tree structure, shape and dtype.
A key whose text names a memory address (an object without a stable ``repr``) is not cached.
Without a compilation cache folder (library use), :func:`cached_jit` is ``jax.jit``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
import re
import sys
from pathlib import Path

import jax

from ustad.io import atomic_write

logger = logging.getLogger(__name__)
SUBDIR = "ustad-programs"
# Configuration options that say where and when compiled programs are cached, not what they
# compute.
_IGNORED_CONFIG = re.compile(r"compilation_cache|persistent_cache|log_compiles|explain_cache")


def program_folder() -> Path | None:
    """Where programs are kept: ``ustad-programs/`` in JAX's compilation cache folder, or None
    when no compilation cache is configured."""
    folder = jax.config.jax_compilation_cache_dir
    return Path(folder) / SUBDIR if folder else None


@functools.cache
def code_fingerprint() -> str:
    """sha256 of the path and text of every ``.py`` file of the ``ustad`` package."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _environment() -> str:
    import flax
    import jaxlib

    devices = jax.devices()
    config = sorted(
        (name, repr(value))
        for name, value in jax.config.values.items()
        if not _IGNORED_CONFIG.search(name)
    )
    return repr(
        (
            sys.version,
            platform.machine(),
            jax.__version__,
            jaxlib.__version__,
            flax.__version__,
            devices[0].platform,
            devices[0].device_kind,
            len(devices),
            config,
        )
    )


def _signature(args) -> tuple:
    leaves, tree = jax.tree.flatten(args)
    return tree, tuple(
        (x.shape, str(x.dtype), bool(getattr(x, "weak_type", False))) for x in leaves
    )


def _abstract(x) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=bool(getattr(x, "weak_type", False)))


class CachedJit:
    """``jax.jit(fn)`` whose lowered program is read from / written to :func:`program_folder`;
    see the module docstring. Call it as the jitted function (positional arguments only)."""

    def __init__(self, fn, key: tuple):
        self._jitted = jax.jit(fn)
        self._key = repr(key)
        self._cacheable = " at 0x" not in self._key
        self._programs: dict[tuple, object] = {}  # signature → jitted program call

    def __call__(self, *args):
        folder = program_folder()
        if folder is None or not self._cacheable:
            return self._jitted(*args)
        signature = _signature(args)
        call = self._programs.get(signature)
        if call is None:
            call = self._programs[signature] = self._load_or_export(folder, signature, args)
        return call(*args)

    def file_for(self, folder: Path, signature: tuple) -> Path:
        """The file of the program for arguments of ``signature`` (:func:`_signature`)."""
        text = "\0".join((self._key, repr(signature), code_fingerprint(), _environment()))
        return folder / f"{hashlib.sha256(text.encode()).hexdigest()}.jaxexport"

    def _load_or_export(self, folder: Path, signature: tuple, args):
        path = self.file_for(folder, signature)
        exported = None
        if path.is_file():
            try:
                exported = jax.export.deserialize(bytearray(path.read_bytes()))
            except Exception as error:  # a damaged file: export again over it
                logger.warning("re-tracing: %s could not be read (%s)", path, error)
        if exported is None:
            exported = jax.export.export(self._jitted)(*jax.tree.map(_abstract, args))
            try:
                atomic_write(path, exported.serialize())
            except OSError as error:  # a read-only cache: this process still runs
                logger.warning("the traced program was not kept: %s", error)
        return jax.jit(exported.call)


def cached_jit(fn, key: tuple) -> CachedJit:
    """``jax.jit(fn)`` whose traced program a later process reads instead of tracing again.

    Args:
      fn: the function (positional array arguments; everything else bound in it).
      key: what, besides the arguments' shapes and the package's code, determines the program
        ``fn`` traces to: a name for ``fn`` and its bound static values (networks, sizes,
        options), each with a ``repr`` that states its value.

    Returns:
      A callable with ``fn``'s results (the same program, so the same numbers as ``jax.jit``).
    """
    return CachedJit(fn, key)
