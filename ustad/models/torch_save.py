"""PyTorch and safetensors weight files written from NumPy arrays, without importing torch.

:func:`save_torch` and :func:`save_safetensors` produce the same layout torch and the
``safetensors`` package write (formats described in :mod:`ustad.models.torch_io`), including
shared storages, storage offsets and strides of NumPy views; the tests use them to round-trip
what torchvision would save.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

# The format constants live next to the reader, so reading and writing cannot drift apart.
from ustad.models.torch_io import (
    LEGACY_MAGIC,
    LEGACY_PROTOCOL_VERSION,
    SAFETENSORS_DTYPES,
    STORAGE_DTYPES,
)

__all__ = ["save_safetensors", "save_torch"]

_STORAGE_NAMES = {dtype: name for name, dtype in STORAGE_DTYPES.items()}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


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
            f.write(pickle.dumps(LEGACY_MAGIC, protocol=2))
            f.write(pickle.dumps(LEGACY_PROTOCOL_VERSION, protocol=2))
            sys_info = {
                "protocol_version": LEGACY_PROTOCOL_VERSION,
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
