"""`ustad score`'s folder path reads the next batches in a background thread while one is scored
(image_batches.read_batches) and writes each batch's files in another while the next is scored:
the same batches in the same order as reading in turn, the same files written, reading and
writing overlapped with scoring, an unreadable file still named with nothing written, a failed
write still reported with exactly the images written, and no thread left behind."""

import errno
import threading

import numpy as np
import pytest

from ustad import image_batches as ib
from ustad import score_files as sf
from ustad.data.images import write_png


class MeanDetector:
    """A stand-in detector: the map is the channel mean, the score its maximum (deterministic)."""

    batch_size = 3

    def __init__(self):
        self.calls = []

    def score(self, images):
        self.calls.append(len(images))
        maps = images.mean(axis=-1).astype(np.float32)
        return maps, maps.reshape(len(maps), -1).max(axis=1)


def _images(folder, count, sizes=((16, 16), (12, 20))):
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        h, w = sizes[i % len(sizes)]
        path = folder / f"{i:02d}.png"
        write_png(path, rng.integers(0, 256, (h, w, 3), np.uint8))
        paths.append(path)
    return paths


def _reader_threads():
    names = ("ustad-read-images", "ustad-write-outputs")
    return [t for t in threading.enumerate() if t.name in names]


def test_read_batches_yields_what_reading_in_turn_does(tmp_path):
    paths = _images(tmp_path / "in", 7)
    chunks = [[0, 2, 4], [6], [1, 3], [5]]
    ahead = list(ib.read_batches(paths, chunks, prefetch=2))
    in_turn = list(ib.read_batches(paths, chunks, prefetch=0))
    assert [c for c, _ in ahead] == chunks == [c for c, _ in in_turn]
    for (_, a), (_, b) in zip(ahead, in_turn, strict=True):
        assert a.dtype == np.float32 and a.shape[0] in (1, 2, 3)
        np.testing.assert_array_equal(a, b)
    assert not _reader_threads()


def test_reading_runs_ahead_while_the_caller_works(tmp_path, monkeypatch):
    paths = _images(tmp_path / "in", 4, sizes=((8, 8),))
    second_read = threading.Event()
    real_read = ib.read_image

    def read(path):
        image = real_read(path)
        if path == paths[1]:
            second_read.set()
        return image

    monkeypatch.setattr(ib, "read_image", read)
    batches = ib.read_batches(paths, [[0], [1], [2], [3]], prefetch=1)
    next(batches)
    # While the caller holds batch 0 (scoring it), batch 1 is read in the background.
    assert second_read.wait(timeout=5), "the next batch was not read while the caller worked"
    batches.close()
    assert not _reader_threads()

    second_read.clear()
    in_turn = ib.read_batches(paths, [[0], [1], [2], [3]], prefetch=0)
    next(in_turn)
    assert not second_read.wait(timeout=0.2)  # prefetch=0: read only when asked for
    in_turn.close()


def test_score_files_writes_the_same_with_and_without_prefetch(tmp_path):
    paths = _images(tmp_path / "in", 8)
    results = {}
    for prefetch in (0, 2):  # 0: read and write in turn, as before; 2: both overlapped
        out = tmp_path / f"out{prefetch}"
        detector = MeanDetector()
        results[prefetch] = sf.score_files(
            detector, paths, out, prefetch=prefetch, write_behind=prefetch, vmin=0.0, vmax=1.0
        )
        assert detector.calls == [3, 1, 3, 1]  # 4 of each size, in batches of 3
    assert results[0].rows == results[2].rows
    np.testing.assert_array_equal(results[0].scores, results[2].scores)
    assert results[0].colour_scale == results[2].colour_scale
    assert [r["path"] for r in results[2].rows] == [str(p) for p in paths]  # input order
    written = {
        p: sorted(q.relative_to(tmp_path / p) for q in (tmp_path / p).rglob("*"))
        for p in ("out0", "out2")
    }
    assert written["out0"] == written["out2"] and written["out0"]
    for name in written["out0"]:
        assert (tmp_path / "out0" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes()
    assert not _reader_threads()


def test_an_unreadable_file_is_named_at_its_turn_and_stops_the_reader(tmp_path):
    paths = _images(tmp_path / "in", 6, sizes=((8, 8),))
    paths[3].write_bytes(b"not a png")
    batches = ib.read_batches(paths, [[0, 1], [2, 3], [4, 5]], prefetch=2)
    chunk, images = next(batches)
    assert chunk == [0, 1] and images.shape == (2, 8, 8, 3)
    with pytest.raises(ValueError, match="03.png"):
        next(batches)
    assert not _reader_threads()


def test_score_files_with_an_unreadable_file_writes_nothing(tmp_path):
    paths = _images(tmp_path / "in", 5, sizes=((8, 8),))
    paths[4].write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="04.png"):
        sf.score_files(MeanDetector(), paths, out)
    assert not out.exists()
    assert not _reader_threads()


def test_a_scoring_error_ends_the_reader(tmp_path):
    paths = _images(tmp_path / "in", 12, sizes=((8, 8),))

    class Broken(MeanDetector):
        batch_size = 1

        def score(self, images):
            raise RuntimeError("scoring broke")

    with pytest.raises(RuntimeError, match="scoring broke"):
        sf.score_files(Broken(), paths, tmp_path / "out", prefetch=2)
    assert not _reader_threads()


def test_the_run_scale_path_writes_the_same_with_and_without_overlap(tmp_path):
    paths = _images(tmp_path / "in", 5)
    for overlap in (0, 2):  # no colour scale given: the maps are kept, overlays drawn at the end
        sf.score_files(
            MeanDetector(),
            paths,
            tmp_path / f"out{overlap}",
            prefetch=overlap,
            write_behind=overlap,
        )
    for path in sorted((tmp_path / "out0").iterdir()):
        assert path.read_bytes() == (tmp_path / "out2" / path.name).read_bytes(), path.name


def test_writing_runs_behind_while_the_next_batch_is_scored(tmp_path, monkeypatch):
    paths = _images(tmp_path / "in", 6, sizes=((8, 8),))
    second_batch = threading.Event()
    overlapped = []
    real_write = sf._write_one

    class Signalling(MeanDetector):
        def score(self, images):
            if self.calls:
                second_batch.set()
            return super().score(images)

    def write(*args):
        # The first image's files wait for the scoring of the next batch to start.
        if not overlapped:
            overlapped.append(second_batch.wait(timeout=5))
        return real_write(*args)

    monkeypatch.setattr(sf, "_write_one", write)
    sf.score_files(Signalling(), paths, tmp_path / "out", vmin=0.0, vmax=1.0, write_behind=1)
    assert overlapped == [True], "batch 1 was not scored while batch 0 was written"
    assert not _reader_threads()


@pytest.mark.parametrize("write_behind", [0, 2])
def test_a_failed_write_lists_exactly_the_images_written(tmp_path, monkeypatch, write_behind):
    paths = _images(tmp_path / "in", 7, sizes=((8, 8),))
    real_write = sf.atomic_write
    maps = []

    def write(path, data):
        if str(path).endswith(".npz"):
            maps.append(path)
            if len(maps) == 4:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, data)

    monkeypatch.setattr(sf, "atomic_write", write)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="disk full.* 3 of 7 images scored"):
        sf.score_files(MeanDetector(), paths, out, vmin=0.0, vmax=1.0, write_behind=write_behind)
    assert (out / "scores.csv").read_text().count("\n") == 1 + 3  # header and the 3 written
    assert len(maps) == 4  # nothing was written after the failure
    assert not _reader_threads()


@pytest.mark.parametrize("prefetch", [-1, 1.5, True])
def test_a_bad_prefetch_or_write_behind_is_refused(tmp_path, prefetch):
    with pytest.raises(ValueError, match="prefetch"):
        list(ib.read_batches([], [], prefetch=prefetch))
    paths = _images(tmp_path / "in", 1)
    with pytest.raises(ValueError, match="write_behind"):
        sf.score_files(MeanDetector(), paths, tmp_path / "out", write_behind=prefetch)
    assert not (tmp_path / "out").exists()
