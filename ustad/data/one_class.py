"""MNIST, Fashion-MNIST and CIFAR-10 for one-class classification.

Protocol (paper, section 4.3): train on the training images of one "normal" class, test on the
whole test set, where every image of another class is an anomaly.

Sources: TFDS (`tfds.data_source`, ArrayRecord, works without TensorFlow once the data is
prepared) or local files, which need no network:
- npz with `x_train, y_train, x_test, y_test` (like keras' `mnist.npz`);
- a folder of idx files (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
  `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, optionally `.gz`, or with
  `.idx3-ubyte` spelt with a dot), e.g. Debian's `/usr/share/datasets/fashion-mnist/`;
- CIFAR-10's python pickles (`cifar-10-batches-py/data_batch_1..5`, `test_batch`), as a
  folder or as the downloaded `cifar-10-python.tar.gz`.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np

DATASETS = ("mnist", "fashion_mnist", "cifar10")
CLASS_NAMES = {
    "mnist": tuple(str(d) for d in range(10)),
    "fashion_mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "cifar10": (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),
}


@dataclasses.dataclass(frozen=True)
class OneClassDataset:
    """A labelled image classification dataset, kept as uint8 to save memory (CIFAR-10 in
    float32 would take 0.7 GB); `one_class_split` returns float32.

    Attributes:
        name: one of `DATASETS` (or "custom").
        x_train: `[N, H, W, C]` uint8.
        y_train: `[N]` int32 class ids.
        x_test: `[M, H, W, C]` uint8.
        y_test: `[M]` int32 class ids.
        class_names: names indexed by class id.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class OneClassSplit:
    """Training and test data for one normal class.

    Attributes:
        normal_class: the class id treated as normal.
        train_images: `[N, H, W, C]` float32 in [0, 1], only the normal class.
        test_images: `[M, H, W, C]` float32 in [0, 1], the whole test set.
        test_labels: `[M]` int32, 1 = anomalous (another class), 0 = normal.
        test_classes: `[M]` int32, the original class ids.
    """

    normal_class: int
    train_images: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    test_classes: np.ndarray


def _as_nhwc(images: np.ndarray, source: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"{source}: expected images [N, H, W] or [N, H, W, C], got {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"{source}: expected uint8 images, got {images.dtype}")
    return images


def _dataset(name, x_train, y_train, x_test, y_test, source) -> OneClassDataset:
    x_train, x_test = _as_nhwc(x_train, source), _as_nhwc(x_test, source)
    y_train = np.asarray(y_train).astype(np.int32).reshape(-1)
    y_test = np.asarray(y_test).astype(np.int32).reshape(-1)
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ValueError(
            f"{source}: {len(x_train)} training images but {len(y_train)} labels, "
            f"{len(x_test)} test images but {len(y_test)} labels"
        )
    num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    names = CLASS_NAMES.get(name, tuple(str(c) for c in range(num_classes)))
    return OneClassDataset(name, x_train, y_train, x_test, y_test, names)


def load_npz(path: str | os.PathLike, name: str = "mnist") -> OneClassDataset:
    """Loads an npz with `x_train, y_train, x_test, y_test` (images uint8 [N, H, W(, C)])."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except KeyError as err:
        raise ValueError(
            f"{path} lacks array {err}; needs x_train, y_train, x_test, y_test"
        ) from err
    except (OSError, ValueError) as err:
        raise ValueError(f"Cannot read npz file {path}: {err}") from err
    return _dataset(name, source=str(path), **arrays)


_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an idx file (LeCun's MNIST format), gzip-compressed or not (detected by content).

    Returns:
        The array with the shape and dtype the header declares.
    """
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"Corrupt gzip idx file {path}: {err}") from err
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], ">u4"))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: header {shape} needs {expected} bytes, file has {len(raw)}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(directory: Path, prefix: str, kind: str, idx: str) -> Path:
    """E.g. `train-images-idx3-ubyte`, `train-images.idx3-ubyte`, either with `.gz`."""
    bases = (f"{prefix}-{kind}-{idx}-ubyte", f"{prefix}-{kind}.{idx}-ubyte")
    for name in (n for base in bases for n in (base, base + ".gz")):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"No {bases[0]} (or .gz, or {bases[1]}) in {directory}")


def load_idx_dir(directory: str | os.PathLike, name: str = "fashion_mnist") -> OneClassDataset:
    """Loads the four idx files of MNIST / Fashion-MNIST from `directory`."""
    directory = Path(directory)
    files = {
        "x_train": _find_idx(directory, "train", "images", "idx3"),
        "y_train": _find_idx(directory, "train", "labels", "idx1"),
        "x_test": _find_idx(directory, "t10k", "images", "idx3"),
        "y_test": _find_idx(directory, "t10k", "labels", "idx1"),
    }
    arrays = {key: read_idx(path) for key, path in files.items()}
    return _dataset(name, source=str(directory), **arrays)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays: a CIFAR batch cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("copy_reg", "_reconstructor"),
        ("copyreg", "_reconstructor"),
        ("__builtin__", "object"),
        ("builtins", "object"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(data: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """`([N, 32, 32, 3] uint8, [N] int32)` from the bytes of one CIFAR-10 python batch."""
    try:
        batch = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        images = np.asarray(batch["data"], np.uint8)
        labels = np.asarray(batch["labels"], np.int32)
    except (pickle.UnpicklingError, EOFError, KeyError, AttributeError, ValueError) as err:
        raise ValueError(f"{source} is not a CIFAR-10 python batch: {err!r}") from err
    if images.ndim != 2 or images.shape[1] != 3072 or len(images) != len(labels):
        raise ValueError(f"{source}: expected data [N, 3072] and N labels, got {images.shape}")
    # Rows are channel-major (1024 red, 1024 green, 1024 blue values).
    return images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


def load_cifar10(path: str | os.PathLike) -> OneClassDataset:
    """Loads CIFAR-10's python version from its folder, its parent, or `cifar-10-python.tar.gz`.

    The pickles are read with an unpickler that only builds numpy arrays.
    """
    path = Path(path)
    batches: dict[str, bytes] = {}
    if path.is_file():
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar.getmembers():
                    base = Path(member.name).name
                    if member.isfile() and base in (*_CIFAR_TRAIN, "test_batch"):
                        batches[base] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ValueError(f"Cannot read CIFAR-10 archive {path}: {err}") from err
        where = lambda b: f"{path}:{b}"  # noqa: E731
    else:
        folder = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
        for base in (*_CIFAR_TRAIN, "test_batch"):
            if (folder / base).is_file():
                batches[base] = (folder / base).read_bytes()
        where = lambda b: str(folder / b)  # noqa: E731
    missing = [b for b in (*_CIFAR_TRAIN, "test_batch") if b not in batches]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 batches {missing} not found in {path}")
    train = [_read_cifar_batch(batches[b], where(b)) for b in _CIFAR_TRAIN]
    x_test, y_test = _read_cifar_batch(batches["test_batch"], where("test_batch"))
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return _dataset("cifar10", x_train, y_train, x_test, y_test, source=str(path))


def load_tfds(
    name: str, *, data_dir: str | os.PathLike | None = None, download: bool = True
) -> OneClassDataset:
    """Loads a dataset through TFDS's ArrayRecord data source (no TensorFlow needed to read).

    Args:
        name: "mnist", "fashion_mnist" or "cifar10" (the TFDS names).
        data_dir: TFDS data folder (default `~/tensorflow_datasets`).
        download: download and prepare if missing. Preparing these datasets from their
            original files encodes PNGs with TensorFlow, so the first preparation needs TF
            (or data already prepared in ArrayRecord format); reading never does.
    """
    import tensorflow_datasets as tfds

    train, test = tfds.data_source(
        name,
        split=["train", "test"],
        data_dir=None if data_dir is None else os.fspath(data_dir),
        download=download,
        builder_kwargs={"file_format": "array_record"},
    )

    def read(source) -> tuple[np.ndarray, np.ndarray]:
        examples = [source[i] for i in range(len(source))]
        return (
            np.stack([e["image"] for e in examples]),
            np.array([e["label"] for e in examples], np.int32),
        )

    x_train, y_train = read(train)
    x_test, y_test = read(test)
    return _dataset(name, x_train, y_train, x_test, y_test, source=f"tfds:{name}")


def load_one_class_dataset(
    name: str,
    *,
    path: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> OneClassDataset:
    """Loads MNIST, Fashion-MNIST or CIFAR-10 from local files or TFDS.

    Args:
        name: one of `DATASETS`.
        path: local copy: an `.npz` file, a folder of idx files, a CIFAR-10 python folder or
            its `.tar.gz`. None loads through TFDS.
        data_dir: TFDS data folder (only without `path`).
        download: let TFDS download (only without `path`).
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; choose from {DATASETS}")
    if path is None:
        return load_tfds(name, data_dir=data_dir, download=download)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No such file or folder: {path}")
    if path.is_file() and path.suffix == ".npz":
        return load_npz(path, name)
    if name == "cifar10":
        return load_cifar10(path)
    if path.is_dir():
        return load_idx_dir(path, name)
    raise ValueError(f"{path}: expected an .npz file or a folder of idx files for {name}")


def one_class_split(dataset: OneClassDataset, normal_class: int) -> OneClassSplit:
    """The one-class protocol: train on `normal_class` only, test on everything.

    Args:
        dataset: the full dataset.
        normal_class: class id in `[0, num_classes)`.

    Returns:
        See `OneClassSplit`; images float32 in [0, 1], `[N, H, W, C]`.
    """
    if not 0 <= normal_class < len(dataset.class_names):
        raise ValueError(
            f"normal_class {normal_class} out of range for {len(dataset.class_names)} classes"
        )
    train = dataset.x_train[dataset.y_train == normal_class]
    if len(train) == 0:
        raise ValueError(f"No training images of class {normal_class} in {dataset.name}")
    return OneClassSplit(
        normal_class=normal_class,
        train_images=train.astype(np.float32) / 255.0,
        test_images=dataset.x_test.astype(np.float32) / 255.0,
        test_labels=(dataset.y_test != normal_class).astype(np.int32),
        test_classes=dataset.y_test,
    )


def subsample_test_set(
    labels: np.ndarray, size: int, rng: np.random.Generator, *, balanced: bool = False
) -> np.ndarray:
    """Indices of a test subsample of `size` images, drawn at random or balanced.

    ROC-AUC does not depend on the share of normal images, but its sampling error does: with
    `n0` normal and `n1` anomalous images it grows roughly like `1/n0 + 1/n1`, so 50 + 50
    images measure about as well as ~500 drawn at random (~50 of them normal, on a 10-class set).

    Args:
        labels: `[M]` int, 1 = anomalous, 0 = normal (`OneClassSplit.test_labels`).
        size: how many to draw, at most `M`.
        rng: the generator to draw from.
        balanced: draw `size // 2` normal images (all of them if there are fewer) and the rest
            from the anomalous ones, each at random; otherwise `size` at random from all.

    Returns:
        `[size]` int64 indices into `labels`, sorted.
    """
    labels = np.asarray(labels)
    if not 0 < size <= len(labels):
        raise ValueError(f"size {size} out of range for {len(labels)} test images")
    if not balanced:
        return np.sort(rng.choice(len(labels), size, replace=False))
    normal, anomalous = np.flatnonzero(labels == 0), np.flatnonzero(labels != 0)
    num_normal = min(size // 2, len(normal))
    if size - num_normal > len(anomalous):
        raise ValueError(f"{len(anomalous)} anomalous test images, {size - num_normal} needed")
    pick = (
        rng.choice(normal, num_normal, replace=False),
        rng.choice(anomalous, size - num_normal, replace=False),
    )
    return np.sort(np.concatenate(pick))
