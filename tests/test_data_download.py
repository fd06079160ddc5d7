"""MVTec AD download: caching, checksums and atomic extraction on a tar.xz made by the test."""

import hashlib
import tarfile

import numpy as np
import pytest
from PIL import Image

from ustad.data.download import FULL_ARCHIVE, MVTEC_URLS, download_mvtec_ad
from ustad.data.mvtec import load_mvtec_category


def _make_archive(tmp_path, names, wrap=None):
    """A tar.xz holding tiny MVTec-layout categories `names` (optionally under `wrap/`)."""
    src = tmp_path / "src"
    base = src / wrap if wrap else src
    for name in names:
        for folder in ("train/good", "test/good"):
            (base / name / folder).mkdir(parents=True)
            Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(base / name / folder / "0.png")
    (base / "license.txt").write_text("CC BY-NC-SA 4.0")
    archive = tmp_path / f"{'_'.join(names)}.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        for item in sorted(src.iterdir()):
            tar.add(item, arcname=item.name)
    return archive


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_known_urls():
    assert set(MVTEC_URLS) >= {"bottle", "zipper", FULL_ARCHIVE}
    assert all(u.startswith("https://") and u.endswith(".tar.xz") for u in MVTEC_URLS.values())


def test_per_category_via_file_url_with_cache(tmp_path):
    archive = _make_archive(tmp_path, ["bottle"])
    dest = tmp_path / "mvtec"
    calls = []

    def fetch(url, path):
        calls.append(url)
        path.write_bytes(archive.read_bytes())

    url = archive.as_uri()
    out = download_mvtec_ad(
        dest, ["bottle"], urls={"bottle": url}, checksums={"bottle": _sha(archive)}, fetch=fetch
    )
    assert out == dest and calls == [url]
    assert (dest / "license.txt").exists()
    assert load_mvtec_category(dest, "bottle", image_size=8).train_images.shape == (1, 8, 8, 3)
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]  # no temp leftovers
    # Extracted: nothing fetched again.
    download_mvtec_ad(dest, ["bottle"], urls={"bottle": url}, fetch=fetch)
    assert len(calls) == 1
    # Cached archive reused after the extracted folder is gone.
    import shutil

    shutil.rmtree(dest / "bottle")
    download_mvtec_ad(
        dest, ["bottle"], urls={"bottle": url}, checksums={"bottle": _sha(archive)}, fetch=fetch
    )
    assert len(calls) == 1 and (dest / "bottle/train/good/0.png").exists()


def test_default_fetch_reads_file_urls(tmp_path):
    archive = _make_archive(tmp_path, ["cable"])
    dest = download_mvtec_ad(tmp_path / "d", ["cable"], urls={"cable": archive.as_uri()})
    assert (dest / "cable/test/good/0.png").exists()
    assert (dest / "downloads/cable.tar.xz").read_bytes() == archive.read_bytes()


def test_checksum_mismatch_leaves_nothing(tmp_path):
    archive = _make_archive(tmp_path, ["pill"])
    dest = tmp_path / "d"
    with pytest.raises(ValueError, match="Checksum mismatch"):
        download_mvtec_ad(
            dest, ["pill"], urls={"pill": archive.as_uri()}, checksums={"pill": "0" * 64}
        )
    assert not (dest / "pill").exists()
    assert list((dest / "downloads").iterdir()) == []


def test_stale_cache_is_refetched(tmp_path):
    archive = _make_archive(tmp_path, ["grid"])
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "grid.tar.xz").write_bytes(b"stale")
    dest = download_mvtec_ad(
        tmp_path / "d",
        ["grid"],
        cache_dir=cache,
        urls={"grid": archive.as_uri()},
        checksums={"grid": _sha(archive)},
    )
    assert (dest / "grid/train/good/0.png").exists()
    assert _sha(cache / "grid.tar.xz") == _sha(archive)


def test_whole_archive_with_wrapping_folder(tmp_path):
    archive = _make_archive(tmp_path, ["bottle", "wood"], wrap="mvtec_anomaly_detection")
    urls = {FULL_ARCHIVE: archive.as_uri()}
    # categories=None asks for all 15; this archive only has two, which is an error...
    with pytest.raises(ValueError, match="has no folder"):
        download_mvtec_ad(tmp_path / "d", urls=urls, checksums={FULL_ARCHIVE: _sha(archive)})
    # ...raised before anything is moved into place; no temp folders are left either.
    dest = tmp_path / "d"
    assert sorted(p.name for p in dest.iterdir()) == ["downloads"]
    dest = download_mvtec_ad(
        dest, ["bottle", "wood"], urls=urls | {"bottle": archive.as_uri(), "wood": archive.as_uri()}
    )
    assert sorted(p.name for p in dest.iterdir()) == ["bottle", "downloads", "license.txt", "wood"]


def test_corrupt_unverified_archive_is_dropped(tmp_path):
    bad = tmp_path / "bad.tar.xz"
    bad.write_bytes(b"\xfd7zXZ\x00 truncated")
    dest = tmp_path / "d"
    with pytest.raises(ValueError, match="Cannot extract"):
        download_mvtec_ad(dest, ["screw"], urls={"screw": bad.as_uri()})
    assert not (dest / "screw").exists()
    assert not (dest / "downloads/screw.tar.xz").exists()


def test_unknown_category_needs_url(tmp_path):
    with pytest.raises(ValueError, match="No download URL"):
        download_mvtec_ad(tmp_path, ["my_parts"])
