"""Downloading MVTec AD for users with internet access.

Archives are cached, verified by SHA-256 where a checksum is known, and extracted atomically:
each category is unpacked into a temporary folder next to its destination and renamed into
place only when complete, so an interrupted run never leaves a half-extracted category that a
later run would mistake for a finished one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ustad.data.mvtec import MVTEC_CATEGORIES

FULL_ARCHIVE = "mvtec_anomaly_detection"

_SHARE = "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download"
# The mydrive.ch files that MVTec's download page
# (https://www.mvtec.com/company/research/datasets/mvtec-ad/downloads) has linked to, as used by
# public re-implementations. They may move; pass `urls=` to override.
MVTEC_URLS: dict[str, str] = {
    "bottle": f"{_SHARE}/420937370-1629951468/bottle.tar.xz",
    "cable": f"{_SHARE}/420937413-1629951498/cable.tar.xz",
    "capsule": f"{_SHARE}/420937454-1629951595/capsule.tar.xz",
    "carpet": f"{_SHARE}/420937484-1629951672/carpet.tar.xz",
    "grid": f"{_SHARE}/420937487-1629951814/grid.tar.xz",
    "hazelnut": f"{_SHARE}/420937545-1629951845/hazelnut.tar.xz",
    "leather": f"{_SHARE}/420937607-1629951964/leather.tar.xz",
    "metal_nut": f"{_SHARE}/420937637-1629952063/metal_nut.tar.xz",
    "pill": (
        "https://www.mydrive.ch/shares/43421/11a215a5749fcfb75e331ddd5f8e43ee/download/"
        "420938129-1629953099/pill.tar.xz"
    ),
    "screw": f"{_SHARE}/420938130-1629953152/screw.tar.xz",
    "tile": f"{_SHARE}/420938133-1629953189/tile.tar.xz",
    "toothbrush": f"{_SHARE}/420938134-1629953256/toothbrush.tar.xz",
    "transistor": f"{_SHARE}/420938166-1629953277/transistor.tar.xz",
    "wood": f"{_SHARE}/420938383-1629953354/wood.tar.xz",
    "zipper": f"{_SHARE}/420938385-1629953449/zipper.tar.xz",
    FULL_ARCHIVE: f"{_SHARE}/420938113-1629952094/mvtec_anomaly_detection.tar.xz",
}
# Only the whole archive (5,264,982,680 bytes) has a widely published checksum; the
# per-category archives are downloaded unverified unless the caller passes checksums.
MVTEC_SHA256: dict[str, str] = {
    FULL_ARCHIVE: "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
}

Fetch = Callable[[str, Path], None]


def fetch_url(url: str, destination: Path) -> None:
    """Streams `url` (http(s):// or file://) into the file `destination`."""
    request = urllib.request.Request(url, headers={"User-Agent": "ustad"})
    with urllib.request.urlopen(request, timeout=60) as response, open(destination, "wb") as f:
        shutil.copyfileobj(response, f, length=1 << 20)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_file(
    url: str, path: str | os.PathLike, *, sha256: str | None = None, fetch: Fetch = fetch_url
) -> Path:
    """Downloads `url` to `path` unless a good copy is already there.

    A cached file is reused if it matches `sha256` (or, with no checksum, if it exists). A new
    download goes to a temporary file that is checked and then renamed to `path`.

    Raises:
        ValueError: the downloaded bytes do not match `sha256` (the partial file is removed).
    """
    path = Path(path)
    if path.exists():
        if sha256 is None or sha256_file(path) == sha256.lower():
            return path
        path.unlink()  # a stale or corrupt cache entry: fetch again
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        fetch(url, tmp)
        if sha256 is not None and (actual := sha256_file(tmp)) != sha256.lower():
            raise ValueError(
                f"Checksum mismatch for {url} (saved as {path}): expected SHA-256 {sha256}, "
                f"got {actual}"
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _dataset_root(extracted: Path, names: Sequence[str]) -> Path:
    """The folder inside an extracted archive that holds the category folders."""
    if any((extracted / n).is_dir() for n in names):
        return extracted
    subdirs = [p for p in extracted.iterdir() if p.is_dir()]
    if len(subdirs) == 1 and any((subdirs[0] / n).is_dir() for n in names):
        return subdirs[0]
    return extracted


def extract_categories(archive: str | os.PathLike, dest: str | os.PathLike, names: Sequence[str]):
    """Extracts the category folders `names` from a tar archive into `dest`, atomically.

    Categories already present in `dest` are left alone. Top-level files of the archive
    (licence, readme) are copied if missing.

    Raises:
        ValueError: the archive is unreadable, or lacks one of `names`.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".extract-{archive.name}.", dir=dest))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                # The "data" filter refuses absolute paths, links out of the tree and devices.
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ValueError(f"Cannot extract archive {archive}: {err}") from err
        source = _dataset_root(tmp, names)
        todo = [name for name in names if not (dest / name).exists()]
        absent = [name for name in todo if not (source / name).is_dir()]
        if absent:
            raise ValueError(f"Archive {archive} has no folder(s) {absent}")
        for name in todo:
            os.replace(source / name, dest / name)
        for item in source.iterdir():
            if item.is_file() and not (dest / item.name).exists():
                os.replace(item, dest / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download_mvtec_ad(
    dest: str | os.PathLike,
    categories: Sequence[str] | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    urls: Mapping[str, str] | None = None,
    checksums: Mapping[str, str] | None = None,
    fetch: Fetch = fetch_url,
) -> Path:
    """Downloads and extracts MVTec AD so that `load_mvtec_category(dest, c)` works.

    MVTec AD is licensed CC BY-NC-SA 4.0 (non-commercial); by calling this you accept it.

    Args:
        dest: folder to extract into; afterwards it holds `<category>/train`, `test`, ...
        categories: category archives to fetch one by one (smaller downloads); None fetches the
            whole 5.3 GB archive (the only one with a known checksum) and extracts all 15.
        cache_dir: where archives are kept; default `<dest>/downloads`. A cached archive is
            reused instead of downloaded again.
        urls: overrides of `MVTEC_URLS`, keyed by category or "mvtec_anomaly_detection"
            (mirrors, or a `file://` URL to an archive already on disk).
        checksums: SHA-256 overrides of `MVTEC_SHA256`, same keys.
        fetch: `fetch(url, path)` writes the bytes at `url` to `path`.

    Returns:
        `Path(dest)`.
    """
    dest = Path(dest)
    cache = Path(cache_dir) if cache_dir is not None else dest / "downloads"
    all_urls = {**MVTEC_URLS, **(urls or {})}
    all_checksums = {**MVTEC_SHA256, **(checksums or {})}
    wanted = list(MVTEC_CATEGORIES) if categories is None else list(categories)
    missing = [c for c in wanted if not (dest / c).is_dir()]
    if not missing:
        return dest
    jobs = [(FULL_ARCHIVE, missing)] if categories is None else [(c, [c]) for c in missing]
    for archive_name, names in jobs:
        if archive_name not in all_urls:
            raise ValueError(
                f"No download URL for {archive_name!r}; known: {sorted(all_urls)} (pass urls=)"
            )
        archive = download_file(
            all_urls[archive_name],
            cache / f"{archive_name}.tar.xz",
            sha256=all_checksums.get(archive_name),
            fetch=fetch,
        )
        try:
            extract_categories(archive, dest, names)
        except ValueError:
            if archive_name not in all_checksums:
                # Unverified and unusable: drop it so the next call downloads afresh.
                archive.unlink(missing_ok=True)
            raise
    return dest
