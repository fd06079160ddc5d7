"""Datasets and input pipelines: MVTec AD, one-class sets, image folders, synthetic defects.

Every public name is imported from its module on first use (module ``__getattr__``): ``ustad
score`` reads images with :mod:`ustad.data.images` alone, without the synthetic-defect and
download modules (SciPy's ``ndimage``, ``urllib``) that importing them all would start.
"""

import importlib
from typing import TYPE_CHECKING

# Public name → the module of ustad.data that defines it.
_EXPORTS = {
    **dict.fromkeys(
        (
            "MVTEC_SHA256",
            "MVTEC_URLS",
            "download_file",
            "download_mvtec_ad",
            "extract_categories",
            "fetch_url",
            "sha256_file",
        ),
        "download",
    ),
    **dict.fromkeys(
        (
            "IMAGE_EXTENSIONS",
            "as_size",
            "list_image_files",
            "load_images",
            "read_image",
            "read_mask",
            "resize_image",
            "resize_mask",
            "resolve_image_paths",
            "to_uint8",
            "write_png",
        ),
        "images",
    ),
    **dict.fromkeys(
        (
            "MVTEC_CATEGORIES",
            "MVTEC_TEXTURES",
            "MVTecCategory",
            "MVTecIndex",
            "MVTecTestSet",
            "TestEntry",
            "category_folder",
            "index_mvtec_category",
            "load_mvtec_category",
            "load_mvtec_test",
            "load_mvtec_train",
        ),
        "mvtec",
    ),
    **dict.fromkeys(
        (
            "CLASS_NAMES",
            "DATASETS",
            "OneClassDataset",
            "OneClassSplit",
            "load_cifar10",
            "load_idx_dir",
            "load_npz",
            "load_one_class_dataset",
            "load_tfds",
            "one_class_split",
            "read_idx",
            "subsample_test_set",
        ),
        "one_class",
    ),
    **dict.fromkeys(
        (
            "PatchSampler",
            "data_axis_size",
            "epoch_permutation",
            "iterate_batches",
            "num_batches",
            "numpy_rng",
            "sample_patches",
        ),
        "pipeline",
    ),
    **dict.fromkeys(("split_validation",), "split"),
    **dict.fromkeys(
        (
            "DEFECT_TYPES",
            "PHOTOS",
            "TEXTURES",
            "add_defect",
            "load_texture",
            "make_synthetic_category",
            "random_view",
        ),
        "synthetic",
    ),
    # The TFDS builder: TensorFlow Datasets is heavy, and machines that only train and score
    # from image folders (e.g. a GPU image without it) need not have it.
    **dict.fromkeys(("MvtecAd", "MvtecAdConfig", "load_mvtec_tfds"), "tfds_mvtec"),
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ustad.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ustad.data.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # what type checkers and IDEs see
    from ustad.data.download import (
        MVTEC_SHA256,
        MVTEC_URLS,
        download_file,
        download_mvtec_ad,
        extract_categories,
        fetch_url,
        sha256_file,
    )
    from ustad.data.images import (
        IMAGE_EXTENSIONS,
        as_size,
        list_image_files,
        load_images,
        read_image,
        read_mask,
        resize_image,
        resize_mask,
        resolve_image_paths,
        to_uint8,
        write_png,
    )
    from ustad.data.mvtec import (
        MVTEC_CATEGORIES,
        MVTEC_TEXTURES,
        MVTecCategory,
        MVTecIndex,
        MVTecTestSet,
        TestEntry,
        category_folder,
        index_mvtec_category,
        load_mvtec_category,
        load_mvtec_test,
        load_mvtec_train,
    )
    from ustad.data.one_class import (
        CLASS_NAMES,
        DATASETS,
        OneClassDataset,
        OneClassSplit,
        load_cifar10,
        load_idx_dir,
        load_npz,
        load_one_class_dataset,
        load_tfds,
        one_class_split,
        read_idx,
        subsample_test_set,
    )
    from ustad.data.pipeline import (
        PatchSampler,
        data_axis_size,
        epoch_permutation,
        iterate_batches,
        num_batches,
        numpy_rng,
        sample_patches,
    )
    from ustad.data.split import split_validation
    from ustad.data.synthetic import (
        DEFECT_TYPES,
        PHOTOS,
        TEXTURES,
        add_defect,
        load_texture,
        make_synthetic_category,
        random_view,
    )

__all__ = [
    "CLASS_NAMES",
    "DATASETS",
    "DEFECT_TYPES",
    "IMAGE_EXTENSIONS",
    "MVTEC_CATEGORIES",
    "MVTEC_SHA256",
    "MVTEC_TEXTURES",
    "MVTEC_URLS",
    "PHOTOS",
    "TEXTURES",
    "MVTecCategory",
    "MVTecIndex",
    "MVTecTestSet",
    "MvtecAd",
    "MvtecAdConfig",
    "OneClassDataset",
    "OneClassSplit",
    "PatchSampler",
    "TestEntry",
    "add_defect",
    "as_size",
    "data_axis_size",
    "download_file",
    "download_mvtec_ad",
    "epoch_permutation",
    "extract_categories",
    "fetch_url",
    "category_folder",
    "index_mvtec_category",
    "iterate_batches",
    "list_image_files",
    "load_cifar10",
    "load_idx_dir",
    "load_images",
    "load_mvtec_category",
    "load_mvtec_test",
    "load_mvtec_train",
    "load_mvtec_tfds",
    "load_npz",
    "load_one_class_dataset",
    "load_texture",
    "load_tfds",
    "make_synthetic_category",
    "num_batches",
    "numpy_rng",
    "one_class_split",
    "random_view",
    "read_idx",
    "read_image",
    "read_mask",
    "resize_image",
    "resize_mask",
    "resolve_image_paths",
    "sample_patches",
    "sha256_file",
    "split_validation",
    "subsample_test_set",
    "to_uint8",
    "write_png",
]
