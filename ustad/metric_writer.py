"""Run logs: a JSON-lines metrics file and a progress bar with rate and ETA."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

from tqdm.auto import tqdm


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


def progress(total: int, *, initial: int = 0, desc: str = "", unit: str = "step", **kwargs):
    """A progress bar with rate and ETA (tqdm), quiet when stderr is not a terminal and
    ``USTAD_PROGRESS`` is unset (CI logs), forced on with ``USTAD_PROGRESS=1``."""
    setting = os.environ.get("USTAD_PROGRESS")
    disable = (not sys.stderr.isatty()) if setting is None else setting == "0"
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        dynamic_ncols=True,
        disable=disable,
        mininterval=1.0,
        **kwargs,
    )


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
