"""PyTorch and safetensors weight files as NumPy arrays, without importing torch.

Readers for the three formats pretrained vision weights come in:

* the zip format ``torch.save`` writes since PyTorch 1.6 (``<root>/data.pkl`` plus one raw
  record ``<root>/data/<key>`` per storage),
* the legacy pre-1.6 format (pickled magic number, protocol version and system info, then the
  main pickle, then the sorted storage keys and the raw storages, each preceded by its element
  count as an 8-byte integer),
* safetensors (8-byte header length, JSON header, raw little-endian buffer).

Pickles are read with a restricted unpickler: only ``collections.OrderedDict``, torch's tensor
rebuild functions and the typed-storage classes resolve, so a weight file cannot run code.

The writers (:func:`save_torch`, :func:`save_safetensors`) produce the same layout torch and
the ``safetensors`` package write, including shared storages, storage offsets and strides of
NumPy views; the tests use them to round-trip what torchvision would save.

The module also holds what the backbone converters share: torch -> Flax layout transforms,
:func:`rules_from_template` (torch key per Flax variable) and :func:`assign_state_dict` (the
name-and-shape check that lists every missing, unexpected and mis-shaped key).
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "StateDictMismatchError",
    "WeightFileError",
    "assign_state_dict",
    "conv_kernel",
    "dense_kernel",
    "detect_format",
    "identity",
    "load_safetensors",
    "load_state_dict",
    "load_torch",
    "rules_from_template",
    "save_safetensors",
    "save_torch",
]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001

# torch typed-storage class name -> NumPy dtype. Storages are raw bytes in the saving machine's
# byte order (recorded for zip files, assumed little-endian for legacy ones).
_STORAGE_DTYPES: dict[str, np.dtype] = {
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
_STORAGE_NAMES = {dtype: name for name, dtype in _STORAGE_DTYPES.items()}

_SAFETENSORS_DTYPES: dict[str, np.dtype] = {
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
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


class WeightFileError(ValueError):
    """A weight file is of an unknown format, truncated, corrupt or unsafe to load."""


class StateDictMismatchError(ValueError):
    """A state dict does not fit a model; lists missing, unexpected and mis-shaped keys.

    Attributes:
        missing: keys the model needs that the state dict lacks.
        unexpected: keys of the state dict the model does not use.
        mismatched: ``{key: (shape found, shape expected)}``, both in the file's layout.
    """

    def __init__(
        self,
        missing: list[str],
        unexpected: list[str],
        mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
        source: str = "state dict",
    ):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = dict(sorted(mismatched.items()))
        lines = [f"{source} does not fit the model:"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(
                f"  unexpected keys ({len(self.unexpected)}): {', '.join(self.unexpected)}"
            )
        for key, (found, expected) in self.mismatched.items():
            lines.append(f"  mis-shaped {key}: file has {found}, model expects {expected}")
        super().__init__("\n".join(lines))


# ----------------------------------------------------------------------------------------------
# Reading


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
    for name, dtype in _STORAGE_DTYPES.items():
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
            if magic != _LEGACY_MAGIC:
                raise WeightFileError(f"{path}: a pickle, but not a torch.save file")
            version = _RestrictedUnpickler(f, path, legacy=True).load()
            if version != _LEGACY_PROTOCOL_VERSION:
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
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
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


# ----------------------------------------------------------------------------------------------
# Writing


class _PickleEmitter:
    """Writes protocol-2 pickle opcodes for the few value kinds a torch state dict contains.

    torch's pickle names torch globals that do not exist here, so the opcodes are written
    directly instead of through ``pickle.Pickler``.
    """

    def __init__(self):
        self.out = bytearray(b"\x80\x02")

    def value(self, obj: Any) -> None:
        if obj is None:
            self.out += b"N"
        elif obj is True or obj is False:
            self.out += b"\x88" if obj else b"\x89"
        elif isinstance(obj, int):
            if 0 <= obj < 256:
                self.out += b"K" + bytes([obj])
            elif -(2**31) <= obj < 2**31:
                self.out += b"J" + struct.pack("<i", obj)
            else:
                raw = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
                self.out += b"\x8a" + bytes([len(raw)]) + raw
        elif isinstance(obj, str):
            raw = obj.encode()
            self.out += b"X" + struct.pack("<I", len(raw)) + raw
        elif isinstance(obj, tuple):
            self.out += b"("
            for item in obj:
                self.value(item)
            self.out += b"t"
        else:
            raise TypeError(f"cannot emit {type(obj)}")

    def global_(self, module: str, name: str) -> None:
        self.out += f"c{module}\n{name}\n".encode()

    def ordered_dict(self) -> None:
        self.global_("collections", "OrderedDict")
        self.out += b")R"

    def tensor(self, persistent_id: tuple, storage_type: str, offset, shape, stride) -> None:
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.out += b"("
        # Persistent id: ('storage', torch.<Type>Storage, key, location, numel[, view]).
        self.out += b"("
        self.value(persistent_id[0])
        self.global_("torch", storage_type)
        for item in persistent_id[1:]:
            self.value(item)
        self.out += b"tQ"
        self.value(offset)
        self.value(tuple(shape))
        self.value(tuple(stride))
        self.value(False)  # requires_grad
        self.ordered_dict()  # backward hooks
        self.out += b"tR"

    def state_dict(self, entries: list, legacy: bool) -> bytes:
        self.ordered_dict()
        self.out += b"("
        for name, key, storage, offset, shape, stride in entries:
            self.value(name)
            pid = ("storage", key, "cpu", storage.size) + ((None,) if legacy else ())
            self.tensor(pid, _STORAGE_NAMES[storage.dtype], offset, shape, stride)
        self.out += b"u."
        return bytes(self.out)


def _storage_layout(state_dict: Mapping[str, np.ndarray]) -> tuple[list, dict[str, np.ndarray]]:
    """Shares storages between NumPy views of one buffer, as torch does for views.

    Returns:
        ``entries``: ``(name, storage key, storage, offset, shape, stride)`` per tensor, and
        ``storages``: ``{key: 1-D C-contiguous array}``.
    """
    entries, storages, key_of_root = [], {}, {}
    for name, value in state_dict.items():
        array = np.asarray(value)
        if array.dtype.newbyteorder("=") not in _STORAGE_NAMES:
            raise TypeError(f"{name}: dtype {array.dtype} has no torch storage type")
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        root = array
        while isinstance(root.base, np.ndarray):
            root = root.base
        itemsize = array.itemsize
        shareable = (
            root.flags.c_contiguous
            and root.dtype == array.dtype
            and all(s >= 0 and s % itemsize == 0 for s in array.strides)
            and array.size > 0
        )
        if shareable:
            flat = root.reshape(-1)
            offset = (array.ctypes.data - root.ctypes.data) // itemsize
            stride = tuple(s // itemsize for s in array.strides)
        else:
            root = flat = np.ascontiguousarray(array).reshape(-1)
            offset = 0
            stride = tuple(int(np.prod(array.shape[i + 1 :])) for i in range(array.ndim))
        if id(root) not in key_of_root:
            key_of_root[id(root)] = str(len(storages))
            storages[key_of_root[id(root)]] = flat
        key = key_of_root[id(root)]
        entries.append((name, key, storages[key], offset, array.shape, stride))
    return entries, storages


def save_torch(
    state_dict: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    *,
    legacy: bool = False,
    root: str = "archive",
) -> None:
    """Writes a state dict the way ``torch.save(model.state_dict(), path)`` does.

    NumPy views of one buffer share one storage (with offsets and strides), as torch views do.

    Args:
        state_dict: ``{key: array}``; dtypes with a torch storage type (float16/32/64, bfloat16,
            int8..int64, uint8, bool).
        path: destination.
        legacy: write the pre-1.6 format instead of the zip format.
        root: top-level folder inside the zip archive (``"archive"`` since torch 1.x).
    """
    entries, storages = _storage_layout(state_dict)
    main = _PickleEmitter().state_dict(entries, legacy)
    if legacy:
        with open(path, "wb") as f:
            f.write(pickle.dumps(_LEGACY_MAGIC, protocol=2))
            f.write(pickle.dumps(_LEGACY_PROTOCOL_VERSION, protocol=2))
            sys_info = {
                "protocol_version": _LEGACY_PROTOCOL_VERSION,
                "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4},
            }
            f.write(pickle.dumps(sys_info, protocol=2))
            f.write(main)
            keys = sorted(storages)
            f.write(pickle.dumps(keys, protocol=2))
            for key in keys:
                f.write(struct.pack("<q", storages[key].size))
                f.write(storages[key].tobytes())
        return
    records = [("data.pkl", main), ("byteorder", b"little")]
    records += [(f"data/{key}", storage.tobytes()) for key, storage in storages.items()]
    records += [("version", b"3\n")]
    with open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
        for name, payload in records:
            info = zipfile.ZipInfo(f"{root}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            # torch aligns record payloads to 64 bytes (so they can be memory-mapped) with
            # padding in a local-header extra field; do the same.
            header_end = f.tell() + 30 + len(info.filename.encode()) + 4
            pad = -header_end % 64
            info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # 'FB' id as torch's
            archive.writestr(info, payload)


def save_safetensors(
    state_dict: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes ``state_dict`` as a safetensors file (keys sorted, header padded to 8 bytes).

    Args:
        state_dict: ``{key: array}``.
        path: destination.
        metadata: optional ``__metadata__`` string map.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    chunks, offset = [], 0
    for name in sorted(state_dict):
        array = np.asarray(state_dict[name], order="C")  # (ascontiguousarray makes 0-d 1-d)
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        raw = array.tobytes()
        dtype = _SAFETENSORS_NAMES[array.dtype.newbyteorder("=")]
        header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in chunks:
            f.write(raw)


# ----------------------------------------------------------------------------------------------
# Converting to Flax variables


def conv_kernel(weight: np.ndarray) -> np.ndarray:
    """torch conv weight [O, I/groups, kh, kw] -> Flax kernel [kh, kw, I/groups, O]."""
    return np.transpose(weight, (2, 3, 1, 0))


def dense_kernel(weight: np.ndarray) -> np.ndarray:
    """torch linear weight [out, in] -> Flax kernel [in, out]."""
    return np.transpose(weight)


def identity(array: np.ndarray) -> np.ndarray:
    """Arrays whose layout is the same in torch and Flax (biases, BatchNorm statistics)."""
    return array


_INVERSE_SHAPE: dict[Callable, Callable[[tuple], tuple]] = {
    conv_kernel: lambda s: (s[3], s[2], s[0], s[1]) if len(s) == 4 else s,
    dense_kernel: lambda s: tuple(reversed(s)),
    identity: lambda s: tuple(s),
}


def assign_state_dict(
    state_dict: Mapping[str, np.ndarray],
    rules: Mapping[str, tuple[tuple[str, ...], Callable[[np.ndarray], np.ndarray]]],
    template: Any,
    *,
    optional: Callable[[str], bool] = lambda key: False,
    dtype: Any = np.float32,
    source: str = "state dict",
) -> dict:
    """Builds Flax variables from a torch state dict, checking names and shapes first.

    Args:
        state_dict: ``{torch key: array}``.
        rules: ``{torch key: (Flax variable path, layout transform)}``, the path starting with
            the collection (``("params", "conv1", "kernel")``); the transform is one of
            :func:`conv_kernel`, :func:`dense_kernel`, :func:`identity`.
        template: the model's variables (or their ``jax.eval_shape``), to check shapes against.
        optional: keys that may be present in the file without a rule (e.g. BatchNorm's
            ``num_batches_tracked``) and are ignored.
        dtype: dtype of the returned arrays.
        source: names the state dict (usually its path) in error messages.

    Returns:
        Nested ``{collection: {module: {name: np.ndarray}}}`` variables.

    Raises:
        StateDictMismatchError: listing every missing, unexpected and mis-shaped key.
    """
    missing = [key for key in rules if key not in state_dict]
    unexpected = [key for key in state_dict if key not in rules and not optional(key)]
    mismatched = {}
    variables: dict = {}
    for key, (path, transform) in rules.items():
        if key not in state_dict:
            continue
        expected = template
        for part in path:
            expected = expected[part]
        value = np.asarray(state_dict[key])
        if transform(value).shape != tuple(expected.shape):
            mismatched[key] = (value.shape, _INVERSE_SHAPE[transform](tuple(expected.shape)))
            continue
        node = variables
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = np.asarray(transform(value), dtype=dtype)
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(missing, unexpected, mismatched, source)
    return variables


_LEAF_NAMES = {"bias": "bias", "scale": "weight", "mean": "running_mean", "var": "running_var"}


def rules_from_template(
    template: Mapping[str, Any], torch_module: Callable[[tuple[str, ...]], str]
) -> dict[str, tuple[tuple[str, ...], Callable[[np.ndarray], np.ndarray]]]:
    """Derives :func:`assign_state_dict` rules from a model's own variable tree.

    Flax leaf names map to torch's (``kernel`` -> ``weight`` as conv [4-D] or linear [2-D],
    ``scale`` -> ``weight``, ``mean``/``var`` -> ``running_mean``/``running_var``); module paths
    map through ``torch_module``.

    Args:
        template: ``{collection: nested {module: {leaf: array-like}}}``.
        torch_module: Flax module path (without collection and leaf) -> torch module prefix,
            e.g. ``("layer1_0", "downsample_conv")`` -> ``"layer1.0.downsample.0"``.

    Returns:
        ``{torch key: (Flax variable path, layout transform)}`` covering every template leaf.
    """
    rules = {}

    def visit(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, Mapping):
            for name, child in node.items():
                visit(child, (*path, name))
            return
        leaf = path[-1]
        if leaf == "kernel":
            name, transform = "weight", conv_kernel if len(node.shape) == 4 else dense_kernel
        else:
            name, transform = _LEAF_NAMES[leaf], identity
        rules[f"{torch_module(path[1:-1])}.{name}"] = (path, transform)

    visit(template, ())
    return rules
