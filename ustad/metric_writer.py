"""Run logs: a JSON-lines metrics file and progress with rate and ETA.

Progress (:func:`progress`) is a bar on a terminal and a line per 10 % off one (a log file,
``nohup``, CI), so a run whose output goes to a file still says how far it is; ``USTAD_PROGRESS``
chooses: unset = by the terminal, ``bar``/``1`` = a bar, ``lines`` = lines, ``0`` = nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)
# Off a terminal: a line each time this fraction of the work is done, and at least this often.
LINE_FRACTION = 0.1
LINE_SECONDS = 300.0


class MetricWriter:
    """Append one JSON object per call to ``<workdir>/<filename>``.

    A resumed run appends to the same file; each line carries the step and wall time, so the file
    reads as a log of the whole run including restarts. The folder and file are created on the
    first write, so a run that fails before logging anything leaves no empty log behind.
    """

    def __init__(self, workdir: str | os.PathLike, filename: str = "metrics.jsonl"):
        self.path = os.path.join(os.fspath(workdir), filename)
        self._file = None

    def write(self, step: int, **scalars: Any) -> None:
        if self._file is None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        record = {"step": int(step), "time": round(time.time(), 3)}
        for key, value in scalars.items():
            value = float(value) if hasattr(value, "__float__") else value
            record[key] = value
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def progress_mode() -> str:
    """``"bar"``, ``"lines"`` or ``"off"``: ``USTAD_PROGRESS`` when set (``1``/``bar``,
    ``lines``, ``0``), else a bar when stderr is a terminal and lines when it is not."""
    setting = os.environ.get("USTAD_PROGRESS", "").strip().lower()
    if setting in ("1", "bar"):
        return "bar"
    if setting in ("0", "off"):
        return "off"
    if setting == "lines":
        return "lines"
    return "bar" if sys.stderr.isatty() else "lines"


def progress(total: int, *, initial: int = 0, desc: str = "", unit: str = "step", **kwargs):
    """Progress of ``total`` units with rate and ETA: a tqdm bar, or lines (:class:`Lines`),
    or nothing, by :func:`progress_mode`. Either has ``update(n)``, ``set_postfix(**values)``,
    ``close()`` and is a context manager.

    Until the first ``update`` the bar says ``compiling…``: a run's first step (or a scorer's
    first batch) compiles, which takes tens of seconds on a CPU before the bar moves.
    """
    mode = progress_mode()
    if mode == "lines":
        return Lines(total, initial=initial, desc=desc, unit=unit)
    bar = _Bar(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        dynamic_ncols=True,
        disable=mode == "off",
        mininterval=1.0,
        **kwargs,
    )
    if mode == "bar":
        bar.set_postfix_str("compiling…")
    return bar


class _Bar(tqdm):
    """tqdm whose ``compiling…`` note goes away at the first update."""

    _started = False

    def update(self, n=1):
        if not self._started:
            self._started = True
            self.set_postfix_str("", refresh=False)
        return super().update(n)


class Lines:
    """Progress as log lines (``[ustad] train p17: 30 % (60/200 img), 2.1 img/s, ETA 1 min 7 s,
    loss 0.123``): one when the first update arrives (how long set-up and compilation took),
    one per :data:`LINE_FRACTION` of ``total`` or :data:`LINE_SECONDS`, and one at the end.

    Args:
      total: units of the whole run; initial: units already done (a resumed run).
      desc: what runs (the lines' label); unit: what is counted.
    """

    def __init__(self, total: int, *, initial: int = 0, desc: str = "", unit: str = "step"):
        self.total, self.n, self.desc, self.unit = int(total), int(initial), desc, unit
        self._start = self._last_time = time.perf_counter()
        self._first = None  # (time, n) after the first update: rates exclude compilation
        self._next = self._next_mark(self.n)
        self._postfix = ""
        self._closed = False

    def _next_mark(self, n: int) -> int:
        step = max(1, math.ceil(self.total * LINE_FRACTION))
        return (n // step + 1) * step

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        now = time.perf_counter()
        if self._first is None:
            self._first = (now, self.n)
            self._line(f"the first batch took {_duration(now - self._start)} (compilation)")
        elif self.n >= self._next or now - self._last_time >= LINE_SECONDS or self.done:
            self._line(self._status(now))
        if self.n >= self._next:
            self._next = self._next_mark(self.n)

    @property
    def done(self) -> bool:
        return self.n >= self.total

    def _status(self, now: float) -> str:
        percent = 100.0 * self.n / self.total if self.total else 100.0
        text = f"{percent:.0f} % ({self.n}/{self.total} {self.unit})"
        first_time, first_n = self._first
        if self.n > first_n and now > first_time:
            rate = (self.n - first_n) / (now - first_time)
            text += f", {rate:.3g} {self.unit}/s"
            if not self.done:
                text += f", ETA {_duration((self.total - self.n) / rate)}"
        return text + (f", {self._postfix}" if self._postfix else "")

    def _line(self, text: str) -> None:
        self._last_time = time.perf_counter()
        logger.info("%s: %s", self.desc or "progress", text)

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self._postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        if not self._closed and self._first is not None and self.n > self._first[1]:
            if self.n < self.total:  # stopped early (an error): say where
                self._line(f"stopped at {self._status(time.perf_counter())}")
        self._closed = True

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _duration(seconds: float) -> str:
    """``"42 s"``, ``"3 min 7 s"``, ``"2 h 05 min"``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def check_finite(name: str, value: float, step: int) -> None:
    """Raise ``FloatingPointError`` naming the quantity and step when ``value`` is NaN or inf."""
    if not math.isfinite(value):
        raise FloatingPointError(
            f"{name} became {value} at step {step}; lower the learning rate, check the inputs "
            f"for NaNs, or resume from the last checkpoint"
        )


def check_magnitude(name: str, value: float, limit: float, step: int, why: str = "") -> None:
    """Raise ``FloatingPointError`` when a finite ``value`` exceeds ``limit`` (a diverging run
    that has not overflowed yet)."""
    if value > limit:
        raise FloatingPointError(
            f"{name} is {value:.3g} at step {step}, beyond {limit:.3g}{why}: training diverged; "
            f"lower the learning rate and use a new workdir"
        )
