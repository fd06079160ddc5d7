"""The category benchmark's list, its data folders and its table (issue 21; the driver is
``benchmarks/categories.py``).

Every family is measured on the same list of categories against the nearest-neighbour
reference (:mod:`ustad.evaluation.reference_knn`) on the same data and size: real objects
(bottle, and bottle with only 40 or 80 of its training images), a real non-square surface with
tiny defects (ball screws) and synthetic categories of three kinds (a colour texture, a grey
texture, an object on a plain background; :mod:`ustad.data.synthetic`).

A run's result is one JSON record per category × family/preset; :func:`format_table` turns
records into one Markdown table, each row beside its reference (:func:`find_reference`) with
the family's figure divided by the reference's ("÷ reference").
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ustad.data.mvtec import category_folder, index_train

METRICS = ("image_auroc", "pixel_auroc", "au_pro")


@dataclasses.dataclass(frozen=True)
class CategorySpec:
    """One category of the list.

    Attributes:
      name: the name in records and tables (e.g. ``"bottle40"``).
      kind: ``"folder"`` (an MVTec-layout folder under the shared data), ``"subset"`` (the same
        with only ``train_count`` of its training images) or ``"synthetic"`` (written by
        :func:`ustad.data.synthetic.make_synthetic_category`).
      root: folder under the shared data that holds ``category/`` (folder, subset).
      category: the category folder name (folder, subset).
      train_count: training images kept (subset).
      seed: NumPy seed of the subset's draw (subset).
      synthetic: keyword arguments of ``make_synthetic_category`` (synthetic).
    """

    name: str
    kind: str
    root: str = ""
    category: str = ""
    train_count: int = 0
    seed: int = 0
    synthetic: Mapping | None = None

    @property
    def subset_seed(self) -> int | None:
        """The subset's seed, None for a whole category (as reference_knn's lines record it)."""
        return self.seed if self.kind == "subset" else None


def _synthetic(texture: str) -> dict:
    # 256² like the presets; ≥ 200 training images; 4 defect types × 10 + 20 good to test.
    return {
        "texture": texture,
        "image_size": 256,
        "num_train": 200,
        "num_test_good": 20,
        "num_test_per_defect": 10,
        "seed": 0,
    }


CATEGORIES = {
    spec.name: spec
    for spec in (
        CategorySpec("bottle", "folder", "mvtec_ad", "bottle"),
        CategorySpec("bottle40", "subset", "mvtec_ad", "bottle", train_count=40, seed=0),
        CategorySpec("bottle80", "subset", "mvtec_ad", "bottle", train_count=80, seed=0),
        CategorySpec("ball_screw", "folder", "ball_screw", "ball_screw"),
        # Colour texture (stained tissue), grey texture (grass), object on a plain background.
        CategorySpec(
            "synth_colour_texture", "synthetic", synthetic=_synthetic("immunohistochemistry")
        ),
        CategorySpec("synth_grey_texture", "synthetic", synthetic=_synthetic("grass")),
        CategorySpec("synth_object", "synthetic", synthetic=_synthetic("washer")),
    )
}


def category_specs(names: Sequence[str]) -> list[CategorySpec]:
    """The specs of ``names`` (empty: the whole list).

    Raises:
      ValueError: an unknown name (the message lists the known ones).
    """
    unknown = [n for n in names if n not in CATEGORIES]
    if unknown:
        raise ValueError(f"--categories: unknown {unknown}; choose from {', '.join(CATEGORIES)}")
    return [CATEGORIES[n] for n in (names or CATEGORIES)]


def write_subset_folder(
    source_dir: str | os.PathLike, target_dir: str | os.PathLike, count: int, seed: int
) -> Path:
    """An MVTec-layout folder with ``count`` of ``source_dir``'s training images, links only.

    The draw is ``np.sort(default_rng(seed).choice(N, count, replace=False))`` over the sorted
    training files (``benchmarks/reference_knn.py --train_subset`` draws the same). ``train/good``
    holds symlinks to the chosen files; ``test/`` and ``ground_truth/`` link to the source's.
    ``subset.json`` records the draw; a folder with the same record is reused, any other is
    replaced (written beside it and renamed into place).

    Args:
      source_dir: a category folder (``train/good``, ``test/``, optional ``ground_truth/``).
      target_dir: the subset's category folder.
      count: training images kept, 1 ≤ count ≤ N.
      seed: NumPy seed.

    Returns:
      ``target_dir``.

    Raises:
      ValueError: ``count`` out of range (nothing is written).
      FileNotFoundError: ``source_dir`` lacks ``train/good`` or ``test``.
    """
    source_dir, target_dir = Path(source_dir).resolve(), Path(target_dir)
    files = index_train(source_dir)
    if not 1 <= count <= len(files):
        raise ValueError(
            f"subset of {count} training images asked of {source_dir}/train/good, which holds "
            f"{len(files)}"
        )
    if not (source_dir / "test").is_dir():
        raise FileNotFoundError(f"Missing test folder {source_dir / 'test'}")
    chosen = np.sort(np.random.default_rng(seed).choice(len(files), count, replace=False))
    record = {
        "source": str(source_dir),
        "count": count,
        "seed": seed,
        "files": [files[i].name for i in chosen],
    }
    record_path = target_dir / "subset.json"
    if record_path.is_file() and json.loads(record_path.read_text()) == record:
        return target_dir
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target_dir.name}.tmp-", dir=target_dir.parent))
    try:
        (tmp / "train" / "good").mkdir(parents=True)
        for i in chosen:
            (tmp / "train" / "good" / files[i].name).symlink_to(files[i])
        for sub in ("test", "ground_truth"):
            if (source_dir / sub).is_dir():
                (tmp / sub).symlink_to(source_dir / sub, target_is_directory=True)
        (tmp / "subset.json").write_text(json.dumps(record, indent=1) + "\n")
        if target_dir.exists():
            shutil.rmtree(target_dir)
        os.replace(tmp, target_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target_dir


def ensure_synthetic(root: str | os.PathLike, name: str, arguments: Mapping) -> Path:
    """``<root>/<name>``, written by ``make_synthetic_category(**arguments)`` unless a folder
    made with the same arguments (its ``synthetic.json``) is there already."""
    from ustad.data.synthetic import make_synthetic_category

    target = Path(root) / name
    recorded = target / "synthetic.json"
    if recorded.is_file():
        old = json.loads(recorded.read_text())
        if all(_same(old.get(k), v) for k, v in arguments.items()):
            return target
    return make_synthetic_category(root, name, overwrite=True, **arguments)


def _same(recorded, wanted) -> bool:
    if isinstance(wanted, int) and not isinstance(wanted, bool) and isinstance(recorded, list):
        return recorded == [wanted, wanted]  # image_size is recorded as (height, width)
    return recorded == (list(wanted) if isinstance(wanted, tuple) else wanted)


def prepare_category(
    spec: CategorySpec, shared_data: str | os.PathLike, work_dir: str | os.PathLike
) -> tuple[Path, str]:
    """``(data_dir, category)`` to train and evaluate ``spec`` on: the shared folder itself, or
    a subset / synthetic folder written under ``<work_dir>/data``.

    Raises:
      FileNotFoundError: the shared folder is missing (named in the message).
    """
    data = Path(work_dir) / "data"
    if spec.kind == "folder":
        source = category_folder(Path(shared_data) / spec.root, spec.category)
        return source.parent, source.name
    if spec.kind == "subset":
        source = category_folder(Path(shared_data) / spec.root, spec.category)
        write_subset_folder(source, data / spec.name, spec.train_count, spec.seed)
        return data, spec.name
    if spec.kind == "synthetic":
        ensure_synthetic(data, spec.name, spec.synthetic or {})
        return data, spec.name
    raise ValueError(f"category {spec.name!r}: unknown kind {spec.kind!r}")


def load_records(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """The JSON lines of ``paths`` (missing files are skipped, blank lines ignored).

    Raises:
      ValueError: a line that is not a JSON object (the message names file and line).
    """
    records = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON line ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: a JSON line must hold an object")
            records.append(record)
    return records


def run_key(record: Mapping) -> tuple:
    """What makes two category records the same run (``--skip_existing`` compares these)."""
    return (
        record.get("category"),
        record.get("family"),
        record.get("config"),
        tuple(record.get("overrides") or ()),
        record.get("label") or "",
    )


def is_reference(record: Mapping) -> bool:
    """A nearest-neighbour reference line: this benchmark's (family "reference") or
    ``benchmarks/reference_knn.py``'s on a squashed (not aspect-kept) image."""
    if record.get("benchmark") == "reference_knn":
        return not record.get("keep_aspect", False)
    return record.get("benchmark") == "categories" and record.get("family") == "reference"


def find_reference(
    records: Iterable[Mapping],
    category: str,
    image_size: Sequence[int],
    train_images: int,
    subset_seed: int | None,
    keep_aspect: bool = False,
) -> Mapping | None:
    """The latest reference line on the same data and size: same category name, image size
    (where the metrics are computed), number of training images, subset seed and aspect (a
    model that saw a non-square category at its own aspect is compared with the reference
    that did too); None if there is none."""
    found = None
    for record in records:
        if (
            is_reference(record)
            and record.get("category") == category
            and list(record.get("image_size") or ()) == list(image_size)
            and record.get("train_images") == train_images
            and record.get("train_subset_seed") == subset_seed
            and bool(record.get("keep_aspect", False)) == bool(keep_aspect)
        ):
            found = record
    return found


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference`` (None when either is missing or the reference is 0)."""
    if value is None or not reference:
        return None
    return float(value) / float(reference)


def table_rows(records: Iterable[Mapping], references: Sequence[Mapping]) -> list[dict]:
    """One row per family record (reference lines are not rows): its metrics, training
    minutes, the reference's metrics and the ratios ``<metric>_ratio``."""
    rows = []
    for record in records:
        if is_reference(record):
            continue
        reference = find_reference(
            references,
            record["category"],
            record["image_size"],
            record["train_images"],
            record.get("train_subset_seed"),
            record.get("keep_aspect", False),
        )
        row = {
            "category": record["category"],
            "run": _run_name(record),
            "train_images": record["train_images"],
            "image_size": record_size(record),
            "train_minutes": record.get("train_minutes"),
        }
        for metric in METRICS:
            row[metric] = record.get(metric)
            row[f"reference_{metric}"] = None if reference is None else reference.get(metric)
            row[f"{metric}_ratio"] = ratio(row[metric], row[f"reference_{metric}"])
        rows.append(row)
    return rows


def record_size(record: Mapping) -> str:
    """The metrics' size, and the model's own where it differs (e.g. ``256×256 (256×624)``)."""
    size = "×".join(str(s) for s in record["image_size"])
    own = record.get("train_size")
    if own and list(own) != list(record["image_size"]):
        size += f" ({'×'.join(str(s) for s in own)})"
    return size


def _run_name(record: Mapping) -> str:
    name = f"{record['family']} {record['config']}"
    if record.get("label"):
        name += f" ({record['label']})"
    return name


def _cell(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def format_table(rows: Sequence[Mapping]) -> str:
    """A Markdown table of :func:`table_rows`: the family's image AUROC, pixel AUROC, AU-PRO
    and training minutes, then "÷ reference" for each metric and the reference's figures
    (– where no reference on the same data and size was measured)."""
    header = (
        "| category | train images | size | family, preset | image AUROC | pixel AUROC | AU-PRO "
        "| train min | ÷ ref image AUROC | ÷ ref pixel AUROC | ÷ ref AU-PRO "
        "| reference image / pixel / AU-PRO |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for row in rows:
        reference = " / ".join(_cell(row[f"reference_{m}"]) for m in METRICS)
        lines.append(
            f"| {row['category']} | {row['train_images']} | {row['image_size']} | {row['run']} "
            f"| {' | '.join(_cell(row[m]) for m in METRICS)} | {_cell(row['train_minutes'], 1)} "
            f"| {' | '.join(_cell(row[f'{m}_ratio'], 2) for m in METRICS)} | {reference} |"
        )
    return "\n".join(lines)
