"""One-class datasets from npz, idx(.gz), CIFAR-10 pickles and (mocked) TFDS."""

import gzip
import io
import pickle
import struct
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ustad.data.one_class import (
    load_cifar10,
    load_one_class_dataset,
    one_class_split,
    read_idx,
    subsample_test_set,
)


def _digits(n, seed, h=6, w=5):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h, w), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def _idx_bytes(array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def test_npz(tmp_path):
    x_train, y_train = _digits(20, 0)
    x_test, y_test = _digits(7, 1)
    np.savez(tmp_path / "m.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    d = load_one_class_dataset("mnist", path=tmp_path / "m.npz")
    assert d.x_train.shape == (20, 6, 5, 1) and d.x_train.dtype == np.uint8
    np.testing.assert_array_equal(d.x_test[..., 0], x_test)
    np.testing.assert_array_equal(d.y_train, y_train)
    assert d.class_names[3] == "3"


def test_npz_missing_key(tmp_path):
    np.savez(tmp_path / "m.npz", x_train=np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(ValueError, match="m.npz"):
        load_one_class_dataset("mnist", path=tmp_path / "m.npz")


@pytest.mark.parametrize("spelling", ["{}-{}-{}-ubyte.gz", "{}-{}-{}-ubyte", "{}-{}.{}-ubyte"])
def test_idx_dir(tmp_path, spelling):
    x_train, y_train = _digits(12, 2)
    x_test, y_test = _digits(5, 3)
    files = {
        ("train", "images", "idx3"): x_train,
        ("train", "labels", "idx1"): y_train,
        ("t10k", "images", "idx3"): x_test,
        ("t10k", "labels", "idx1"): y_test,
    }
    for parts, array in files.items():
        data = _idx_bytes(array)
        name = spelling.format(*parts)
        (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    d = load_one_class_dataset("fashion_mnist", path=tmp_path)
    np.testing.assert_array_equal(d.x_train[..., 0], x_train)
    np.testing.assert_array_equal(d.y_test, y_test)
    assert d.class_names[0] == "T-shirt/top"


def test_idx_errors(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="bad"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(_idx_bytes(np.zeros((4, 3, 3), np.uint8))[:-1])
    with pytest.raises(ValueError, match="short"):
        read_idx(tmp_path / "short")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_one_class_dataset("mnist", path=tmp_path)


def _cifar_batches(seed):
    rng = np.random.default_rng(seed)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, 4)]
        # Protocol 2, bytes keys and numpy 1's module path, as in the original Python 2 pickles.
        blob = pickle.dumps({b"data": data, b"labels": labels}, protocol=2)
        batches[name] = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    return batches


def test_cifar10_folder_and_tarball(tmp_path):
    batches = _cifar_batches(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, data in batches.items():
        (folder / name).write_bytes(data)
    d = load_one_class_dataset("cifar10", path=tmp_path)
    assert d.x_train.shape == (20, 32, 32, 3) and d.x_test.shape == (4, 32, 32, 3)
    first = pickle.loads(batches["data_batch_1"])[b"data"][0]
    np.testing.assert_array_equal(d.x_train[0, :, :, 1], first[1024:2048].reshape(32, 32))
    assert d.class_names[9] == "truck"

    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in batches.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    d2 = load_cifar10(archive)
    np.testing.assert_array_equal(d2.x_train, d.x_train)
    np.testing.assert_array_equal(d2.y_test, d.y_test)


def test_cifar10_refuses_code_in_pickles(tmp_path):
    batches = _cifar_batches(1)
    batches["test_batch"] = pickle.dumps({b"data": print, b"labels": []})
    for name, data in batches.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match="test_batch"):
        load_cifar10(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar10(tmp_path)


def test_one_class_split(tmp_path):
    x_train, y_train = _digits(40, 4)
    x_test, y_test = _digits(15, 5)
    np.savez(tmp_path / "m.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    d = load_one_class_dataset("mnist", path=tmp_path / "m.npz")
    s = one_class_split(d, 7)
    assert s.train_images.dtype == np.float32 and s.train_images.shape[1:] == (6, 5, 1)
    np.testing.assert_array_equal(s.train_images[..., 0] * 255, x_train[y_train == 7])
    assert s.test_images.shape == (15, 6, 5, 1) and s.test_images.max() <= 1.0
    np.testing.assert_array_equal(s.test_labels, (y_test != 7).astype(np.int32))
    assert s.test_labels.dtype == np.int32
    with pytest.raises(ValueError):
        one_class_split(d, 10)


def test_subsample_test_set():
    labels = (np.arange(1000) % 10 != 3).astype(np.int32)  # 100 normal, 900 anomalous
    pick = subsample_test_set(labels, 40, np.random.default_rng(0), balanced=True)
    assert len(np.unique(pick)) == 40 and np.all(np.diff(pick) > 0)
    assert np.sum(labels[pick] == 0) == 20 and np.sum(labels[pick] == 1) == 20
    # Fewer normal images than half: all of them, the rest anomalous.
    few = subsample_test_set(labels[:50], 30, np.random.default_rng(0), balanced=True)
    assert np.sum(labels[:50][few] == 0) == 5 and len(np.unique(few)) == 30
    # Random: exactly the draw the benchmark made before balanced sampling existed.
    np.testing.assert_array_equal(
        subsample_test_set(labels, 300, np.random.default_rng(1)),
        np.sort(np.random.default_rng(1).choice(1000, 300, replace=False)),
    )
    with pytest.raises(ValueError, match="out of range"):
        subsample_test_set(labels, 1001, np.random.default_rng(0))


def test_tfds_data_source_path():
    # mock_data serves random examples with the real feature specs, offline, without TF.
    with tfds.testing.mock_data(num_examples=6):
        d = load_one_class_dataset("mnist")
    assert d.x_train.shape == (6, 28, 28, 1) and d.x_train.dtype == np.uint8
    assert d.y_test.shape == (6,) and d.y_test.dtype == np.int32
    s = one_class_split(d, int(d.y_train[0]))
    assert len(s.train_images) >= 1


def test_unknown_dataset():
    with pytest.raises(ValueError, match="svhn"):
        load_one_class_dataset("svhn")
