"""Images read from disk a batch at a time, a background thread decoding the next batches while
the caller scores the current one (at most ``prefetch`` batches ahead, so no more than a few
batches are held at native size).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np

from ustad.data.images import read_image

# Batches decoded ahead of the one being scored: two keep the scorer fed when one batch's
# decoding takes longer than usual, and bound the memory to a few batches.
PREFETCH_BATCHES = 2


def check_batches(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer ≥ 0 (batches), got {value!r}")


def read_batches(
    paths: Sequence[str | os.PathLike],
    chunks: Sequence[Sequence[int]],
    prefetch: int = PREFETCH_BATCHES,
) -> Iterator[tuple[Sequence[int], np.ndarray]]:
    """``(chunk, images [B, H, W, C] float32)`` for each index chunk, in order, the images read by
    a background thread up to ``prefetch`` batches ahead of the caller.

    Decoding (PIL, zlib) and the jitted scoring both release the GIL, so reading the next
    batches overlaps scoring the current one; ``prefetch=0`` reads each batch in the caller's
    thread when it is asked for (no thread).

    Args:
        paths: the image files.
        chunks: lists of indices into ``paths``; the images of a chunk share one size.
        prefetch: batches read ahead (≥ 0).

    Raises:
        FileNotFoundError, ValueError: an unreadable image (named by
            :func:`ustad.data.images.read_image`), raised at its batch's turn: every batch
            before it is yielded first, none after it is read.
    """
    check_batches("prefetch", prefetch)

    def read(chunk):
        return np.stack([read_image(paths[i]) for i in chunk])

    if prefetch == 0:
        for chunk in chunks:
            yield chunk, read(chunk)
        return
    ready: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        for chunk in chunks:
            try:
                item = (chunk, read(chunk), None)
            except BaseException as error:  # handed to the caller, raised in its thread
                put((chunk, None, error))
                return
            if stop.is_set() or not put(item):
                return
        put(None)

    thread = threading.Thread(target=reader, name="ustad-read-images", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not None:
            chunk, images, error = item
            if error is not None:
                raise error
            yield chunk, images
    finally:
        stop.set()  # the caller stopped early (an error, a closed generator): end the reader
        thread.join()
