"""Atomic file writes (readers never see a half-written file, and a failed write leaves none)
and ustad's user cache folder.

Files get the permissions a plain ``open(path, "w")`` would give (0644 under the usual umask
022), not the 0600 of the temporary file they are written to.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file next to ``path``, then rename it into place.

    Returns:
      ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, 0o666 & ~_umask())
        with os.fdopen(handle, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return path


def _umask() -> int:
    # The only portable way to read the umask is to set it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_cache_dir() -> str:
    """``$USTAD_CACHE`` if set, else ``$XDG_CACHE_HOME/ustad``, else ``~/.cache/ustad``: where
    downloaded weights and the commands' compilation cache are kept (here, in a module that
    imports nothing heavy, so that every command can find it before importing JAX)."""
    if "USTAD_CACHE" in os.environ:
        return os.environ["USTAD_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ustad")
