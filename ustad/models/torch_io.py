"""PyTorch and safetensors weight files read as NumPy arrays, without importing torch.

Readers for the three formats pretrained vision weights come in:

* the zip format ``torch.save`` writes since PyTorch 1.6 (``<root>/data.pkl`` plus one raw
  record ``<root>/data/<key>`` per storage),
* the legacy pre-1.6 format (pickled magic number, protocol version and system info, then the
  main pickle, then the sorted storage keys and the raw storages, each preceded by its element
  count as an 8-byte integer),
* safetensors (8-byte header length, JSON header, raw little-endian buffer).

Pickles are read with a restricted unpickler: only ``collections.OrderedDict``, torch's tensor
rebuild functions and the typed-storage classes resolve, so a weight file cannot run code.

The writers are in :mod:`ustad.models.torch_save`; the torch -> Flax conversion helpers in
:mod:`ustad.models.convert`.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "WeightFileError",
    "detect_format",
    "load_safetensors",
    "load_state_dict",
    "load_torch",
]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# torch typed-storage class name -> NumPy dtype. Storages are raw bytes in the saving machine's
# byte order (recorded for zip files, assumed little-endian for legacy ones).
STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


class WeightFileError(ValueError):
    """A weight file is of an unknown format, truncated, corrupt or unsafe to load."""


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: np.dtype
    numel: int
    # Legacy files may point a persistent id at a slice of another storage.
    view_offset: int = 0


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *unused_grad_hooks_metadata):
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused_grad_and_hooks):
    return data


def _safe_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }
    for name, dtype in STORAGE_DTYPES.items():
        allowed["torch", name] = _StorageType(dtype)
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a tensor state dict needs; storages become references."""

    _ALLOWED = _safe_globals()

    def __init__(self, file, path: str, legacy: bool):
        super().__init__(file)
        self._path = path
        self._legacy = legacy
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[module, name]
        except KeyError:
            raise WeightFileError(
                f"{self._path}: refusing to unpickle {module}.{name}; only tensor state dicts "
                "(OrderedDict of tensors) are loaded"
            ) from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise WeightFileError(f"{self._path}: unsupported persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise WeightFileError(f"{self._path}: persistent id {pid!r} names no storage type")
        root = _StorageRef(str(key), storage_type.dtype, int(numel))
        self.storages.setdefault(root.key, root)
        view = pid[5] if self._legacy and len(pid) > 5 else None
        if view is not None:
            # Pre-1.0 storage views: (view_key, offset, size) into the root storage.
            _, offset, size = view
            return _StorageRef(root.key, root.dtype, int(size), int(offset))
        return root


def _materialize(tensor: _TensorRef, buffers: Mapping[str, np.ndarray], path: str) -> np.ndarray:
    storage = tensor.storage
    flat = buffers[storage.key][storage.view_offset : storage.view_offset + storage.numel]
    shape, stride = tensor.shape, tensor.stride
    if len(shape) != len(stride) or any(n < 0 for n in shape) or any(s < 0 for s in stride):
        raise WeightFileError(f"{path}: bad tensor layout shape={shape} stride={stride}")
    if 0 in shape:
        return np.zeros(shape, flat.dtype)
    last = tensor.offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    if tensor.offset < 0 or last >= flat.size:
        raise WeightFileError(
            f"{path}: tensor (offset {tensor.offset}, shape {shape}, stride {stride}) reads past "
            f"its storage of {flat.size} elements; the file is truncated or corrupt"
        )
    view = np.lib.stride_tricks.as_strided(
        flat[tensor.offset :], shape, [s * flat.itemsize for s in stride], writeable=False
    )
    # A copy owns its memory (no alias into the file buffer) and is C-contiguous.
    return np.array(view, order="C")


def _flatten_tensors(obj: Any, buffers: Mapping[str, np.ndarray], path: str) -> dict:
    """Nested mappings -> {dotted key: array}; non-tensor leaves (epoch counters...) are dropped."""
    out: dict[str, np.ndarray] = {}

    def visit(node: Any, prefix: str) -> None:
        if isinstance(node, _TensorRef):
            out[prefix] = _materialize(node, buffers, path)
        elif isinstance(node, Mapping):
            for key, value in node.items():
                visit(value, f"{prefix}.{key}" if prefix else str(key))

    if isinstance(obj, _TensorRef):
        raise WeightFileError(f"{path}: holds a single tensor, not a state dict")
    visit(obj, "")
    return out


# What a corrupt pickle or zip directory raises besides pickle's and zipfile's own errors (calls
# with wrong arguments, lookups of absent storages or records, bad values, unsupported zip
# features: RuntimeError covers NotImplementedError and RecursionError). MemoryError: CPython's
# unpickler allocates a bytes opcode's buffer from its (corrupt, huge) length before reading it.
_MALFORMED = (
    MemoryError,
    KeyError,
    IndexError,
    TypeError,
    ValueError,
    AttributeError,
    OverflowError,
    OSError,
    RuntimeError,
)


def _read_zip_torch(path: str) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise WeightFileError(f"{path}: zip file without a single <root>/data.pkl")
            root = pickles[0][: -len("data.pkl")]
            byteorder = "little"
            if f"{root}byteorder" in names:
                byteorder = archive.read(f"{root}byteorder").decode().strip()
            unpickler = _RestrictedUnpickler(
                io.BytesIO(archive.read(pickles[0])), path, legacy=False
            )
            obj = unpickler.load()
            buffers = {}
            for key, ref in unpickler.storages.items():
                raw = archive.read(f"{root}data/{key}")
                dtype = ref.dtype.newbyteorder("<" if byteorder == "little" else ">")
                if len(raw) < ref.numel * dtype.itemsize:
                    raise WeightFileError(f"{path}: storage {key} is truncated")
                buffers[key] = np.frombuffer(raw, dtype, ref.numel).astype(ref.dtype)
        return _flatten_tensors(obj, buffers, path)
    except WeightFileError:
        raise
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, *_MALFORMED) as err:
        raise WeightFileError(f"{path}: truncated or corrupt torch zip file ({err!r})") from err


def _read_legacy_torch(path: str) -> dict[str, np.ndarray]:
    try:
        # From memory: a corrupt pickle length then cannot make a file read allocate gigabytes.
        with open(path, "rb") as file:
            data = file.read()
        size = len(data)
        with io.BytesIO(data) as f:
            # Every pickle, the small header ones too, goes through the restricted unpickler.
            magic = _RestrictedUnpickler(f, path, legacy=True).load()
            if magic != LEGACY_MAGIC:
                raise WeightFileError(f"{path}: a pickle, but not a torch.save file")
            version = _RestrictedUnpickler(f, path, legacy=True).load()
            if version != LEGACY_PROTOCOL_VERSION:
                raise WeightFileError(f"{path}: unsupported torch legacy version {version}")
            sys_info = _RestrictedUnpickler(f, path, legacy=True).load()
            if not sys_info.get("little_endian", True):
                raise WeightFileError(f"{path}: big-endian legacy torch files are not supported")
            unpickler = _RestrictedUnpickler(f, path, legacy=True)
            obj = unpickler.load()
            keys = _RestrictedUnpickler(f, path, legacy=True).load()
            buffers = {}
            for key in keys:
                ref = unpickler.storages[key]
                (numel,) = struct.unpack("<q", f.read(8))
                # Check the count before reading, so a corrupt one cannot ask for terabytes.
                if not ref.numel <= numel <= (size - f.tell()) // ref.dtype.itemsize:
                    raise WeightFileError(f"{path}: truncated (storage {key} is incomplete)")
                buffers[key] = np.frombuffer(f.read(numel * ref.dtype.itemsize), ref.dtype)
            return _flatten_tensors(obj, buffers, path)
    except WeightFileError:
        raise
    except (EOFError, pickle.UnpicklingError, struct.error, *_MALFORMED) as err:
        raise WeightFileError(f"{path}: truncated or corrupt legacy torch file ({err!r})") from err


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a safetensors file.

    Args:
        path: the file.

    Returns:
        ``{name: array}`` in the file's dtypes (bfloat16 and float8 as ``ml_dtypes`` types).

    Raises:
        WeightFileError: the header or buffer is malformed or truncated.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise WeightFileError(f"{path}: truncated safetensors file (no header length)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if 8 + header_len > len(data):
        raise WeightFileError(f"{path}: truncated safetensors file (header past end of file)")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightFileError(f"{path}: corrupt safetensors header ({err})") from err
    if not isinstance(header, dict):
        raise WeightFileError(f"{path}: corrupt safetensors header (not a JSON object)")
    buffer = memoryview(data)[8 + header_len :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(n) for n in info["shape"])
            begin, end = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise WeightFileError(f"{path}: bad safetensors entry {name!r}: {info!r}") from err
        if end > len(buffer):
            raise WeightFileError(f"{path}: truncated safetensors file ({name!r} past the end)")
        if end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise WeightFileError(f"{path}: {name!r} byte range does not match shape {shape}")
        out[name] = np.frombuffer(buffer[begin:end], dtype.newbyteorder("<")).reshape(shape)
        out[name] = out[name].astype(dtype)  # native byte order, own (writable) memory
    return out


def detect_format(path: str | os.PathLike) -> str:
    """Names a weight file's format from its first bytes.

    Args:
        path: the file.

    Returns:
        ``"torch_zip"``, ``"torch_legacy"`` or ``"safetensors"``.

    Raises:
        WeightFileError: the format is none of these (or the file is too short to tell).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:4] == b"PK\x03\x04":
        return "torch_zip"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "torch_legacy"
    if head[257:262] == b"ustar":
        raise WeightFileError(f"{path}: pre-0.4 tar-format torch files are not supported")
    raise WeightFileError(
        f"{path}: unknown weight file format (not a torch zip, legacy torch.save or safetensors "
        f"file; first bytes {head[:8]!r})"
    )


def load_torch(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a ``torch.save`` file (zip or legacy format) without torch.

    Args:
        path: the file.

    Returns:
        ``{key: array}``; nested mappings (e.g. ``{"state_dict": {...}}``) are flattened to dotted
        keys, non-tensor leaves dropped. Arrays keep the saved dtype and are C-contiguous copies.

    Raises:
        WeightFileError: the file is not a torch file, is truncated or corrupt, or pickles
            anything besides (ordered) dicts of tensors.
    """
    path = os.fspath(path)
    kind = detect_format(path)
    if kind == "torch_zip":
        return _read_zip_torch(path)
    if kind == "torch_legacy":
        return _read_legacy_torch(path)
    raise WeightFileError(f"{path}: a {kind} file, not a torch.save file")


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads torch (zip or legacy) or safetensors weights, whichever ``path`` holds.

    Args:
        path: the file.

    Returns:
        ``{key: array}`` as :func:`load_torch` / :func:`load_safetensors` return it.

    Raises:
        WeightFileError: unknown format, truncated, corrupt or unsafe file (message names path).
    """
    path = os.fspath(path)
    if detect_format(path) == "safetensors":
        return load_safetensors(path)
    return load_torch(path)
