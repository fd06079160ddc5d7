"""The category benchmark's library: subset folders, synthetic folders, reference matching and
the table with its "÷ reference" columns."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from ustad.data.mvtec import load_mvtec_category
from ustad.evaluation import categories as cats


def _category(root, n_train=10):
    for sub, count in (("train/good", n_train), ("test/good", 2), ("test/crack", 2)):
        (root / sub).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((8, 8), (i * 3 + len(sub)) % 256, np.uint8)).save(
                root / sub / f"{i:03d}.png"
            )
    (root / "ground_truth/crack").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.eye(8, dtype=np.uint8) * 255).save(
            root / "ground_truth/crack" / f"{i:03d}_mask.png"
        )
    return root


def test_subset_folder_links_the_reference_draw(tmp_path):
    source = _category(tmp_path / "shared/bottle")
    target = cats.write_subset_folder(source, tmp_path / "work/bottle4", 4, seed=0)
    # The same draw as benchmarks/reference_knn.py --train_subset=4 --subset_seed=0.
    expected = np.sort(np.random.default_rng(0).choice(10, 4, replace=False))
    linked = sorted((target / "train/good").iterdir())
    assert [p.name for p in linked] == [f"{i:03d}.png" for i in expected]
    assert all(p.is_symlink() and p.resolve().parent == source / "train/good" for p in linked)
    data = load_mvtec_category(tmp_path / "work", "bottle4", image_size=8)
    assert len(data.train_images) == 4 and len(data.test_images) == 4
    assert data.test_masks.sum() == 16
    # Same draw: reused as is; another seed: replaced.
    mtime = (target / "subset.json").stat().st_mtime_ns
    cats.write_subset_folder(source, target, 4, seed=0)
    assert (target / "subset.json").stat().st_mtime_ns == mtime
    cats.write_subset_folder(source, target, 4, seed=1)
    assert json.loads((target / "subset.json").read_text())["seed"] == 1
    assert len(list((target / "train/good").iterdir())) == 4
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["bottle4"]


def test_subset_too_large_writes_nothing(tmp_path):
    source = _category(tmp_path / "shared/bottle", n_train=3)
    with pytest.raises(ValueError, match="subset of 5 .*holds 3"):
        cats.write_subset_folder(source, tmp_path / "work/bottle5", 5, seed=0)
    assert not (tmp_path / "work").exists()


def test_prepare_category_kinds(tmp_path, monkeypatch):
    _category(tmp_path / "shared/mvtec_ad/bottle", n_train=50)
    spec = cats.CATEGORIES["bottle40"]
    data_dir, name = cats.prepare_category(spec, tmp_path / "shared", tmp_path / "work")
    assert (data_dir, name) == (tmp_path / "work/data", "bottle40")
    assert len(list((data_dir / name / "train/good").iterdir())) == 40
    data_dir, name = cats.prepare_category(
        cats.CATEGORIES["bottle"], tmp_path / "shared", tmp_path / "work"
    )
    assert (data_dir, name) == (tmp_path / "shared/mvtec_ad", "bottle")
    with pytest.raises(FileNotFoundError, match="ball_screw"):
        cats.prepare_category(cats.CATEGORIES["ball_screw"], tmp_path / "shared", tmp_path)
    # Synthetic: written once, then reused while its arguments are the same.
    small = cats.CategorySpec(
        "synth", "synthetic",
        synthetic={"texture": "washer", "image_size": 32, "num_train": 2, "num_test_good": 1,
                   "num_test_per_defect": 1, "seed": 0},
    )  # fmt: skip
    data_dir, name = cats.prepare_category(small, tmp_path / "shared", tmp_path / "work")
    first = (data_dir / name / "synthetic.json").stat().st_mtime_ns
    cats.prepare_category(small, tmp_path / "shared", tmp_path / "work")
    assert (data_dir / name / "synthetic.json").stat().st_mtime_ns == first


def test_category_list_and_unknown_names():
    assert [s.name for s in cats.category_specs([])] == list(cats.CATEGORIES)
    kinds = {s.synthetic["texture"] for s in cats.CATEGORIES.values() if s.kind == "synthetic"}
    assert len(kinds) >= 3
    assert all(
        s.synthetic["num_train"] >= 200 for s in cats.CATEGORIES.values() if s.kind == "synthetic"
    )
    with pytest.raises(ValueError, match="'bottel'.*bottle40"):
        cats.category_specs(["bottle", "bottel"])


def _family(category, **metrics):
    return {"benchmark": "categories", "family": "stfpm", "config": "cpu", "label": "",
            "category": category, "image_size": [256, 256], "train_images": 40,
            "train_subset_seed": 0, "train_minutes": 3.25, **metrics}  # fmt: skip


def _reference(**overrides):
    record = {"benchmark": "categories", "family": "reference", "config": "knn",
              "category": "bottle40", "image_size": [256, 256], "train_images": 40,
              "train_subset_seed": 0, "image_auroc": 1.0, "pixel_auroc": 0.98,
              "au_pro": 0.8}  # fmt: skip
    record.update(overrides)
    return record


def test_reference_must_match_data_and_size():
    good = _reference()
    others = [
        _reference(image_size=[128, 128]),
        _reference(train_images=41),
        _reference(train_subset_seed=None),
        _reference(category="bottle80"),
        _reference(family="stfpm"),
        {**_reference(), "benchmark": "reference_knn", "keep_aspect": True},
    ]
    assert cats.find_reference(others, "bottle40", [256, 256], 40, 0) is None
    assert cats.find_reference([*others, good], "bottle40", (256, 256), 40, 0) is good
    # A model that kept a category's aspect is compared with the reference that did too.
    kept = _reference(keep_aspect=True, train_size=[256, 632])
    assert cats.find_reference([good, kept], "bottle40", (256, 256), 40, 0) is good
    assert cats.find_reference([good, kept], "bottle40", (256, 256), 40, 0, True) is kept
    # benchmarks/reference_knn.py's lines count too (squashed images only).
    line = {**_reference(), "benchmark": "reference_knn", "keep_aspect": False}
    del line["family"]
    assert cats.find_reference([line], "bottle40", [256, 256], 40, 0) is line


def test_table_divides_by_the_reference():
    records = [
        _family("bottle40", image_auroc=0.9, pixel_auroc=0.98, au_pro=0.6),
        _family("bottle80", image_auroc=0.5, pixel_auroc=0.5, au_pro=0.5),  # no reference
        _reference(),
    ]
    rows = cats.table_rows(records, [_reference()])
    assert [r["category"] for r in rows] == ["bottle40", "bottle80"]
    assert rows[0]["image_auroc_ratio"] == pytest.approx(0.9)
    assert rows[0]["pixel_auroc_ratio"] == pytest.approx(1.0)
    assert rows[0]["au_pro_ratio"] == pytest.approx(0.75)
    assert rows[1]["au_pro_ratio"] is None
    table = cats.format_table(rows).splitlines()
    assert len(table) == 4
    assert all(line.count("|") == table[0].count("|") for line in table)
    assert table[2] == (
        "| bottle40 | 40 | 256×256 | stfpm cpu | 0.900 | 0.980 | 0.600 | 3.2 | 0.90 | 1.00 "
        "| 0.75 | 1.000 / 0.980 / 0.800 |"
    )
    assert table[3].endswith("| – | – | – | – / – / – |")
    kept = {**records[0], "keep_aspect": True, "train_size": [256, 624]}
    row = cats.table_rows([kept], [_reference()])[0]
    assert row["image_size"] == "256×256 (256×624)" and row["au_pro_ratio"] is None
    assert cats.ratio(0.5, 0.0) is None and cats.ratio(None, 1.0) is None


def test_records_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n\n{"b": \n')
    with pytest.raises(ValueError, match=r"r\.jsonl:3: not a JSON line"):
        cats.load_records([path])
    path.write_text('{"a": 1}\n\n')
    assert cats.load_records([path, tmp_path / "missing.jsonl"]) == [{"a": 1}]


def test_run_key_separates_variants():
    after = _family("bottle40")
    before = {**after, "overrides": ["train_steps=0", "epochs=3"], "label": "before"}
    assert cats.run_key(after) != cats.run_key(before)
    assert cats.run_key(after) == cats.run_key({**after, "image_auroc": 0.1})


def test_per_defect_metrics_tell_which_kind_of_defect_is_missed():
    from benchmarks.categories import per_defect

    rng = np.random.default_rng(0)
    labels = np.array([0] * 4 + [1] * 8)
    types = ["good"] * 4 + ["seen"] * 4 + ["missed"] * 4
    masks = np.zeros((12, 16, 16), bool)
    masks[4:, 4:8, 4:8] = True
    maps = rng.random((12, 16, 16)).astype(np.float32)
    maps[4:8, 4:8, 4:8] += 1.0  # only the "seen" defects stand out
    result = per_defect(maps, masks, labels, maps.reshape(12, -1).max(1), types)
    assert set(result) == {"seen", "missed"}
    assert result["seen"] == {"image_auroc": 1.0, "au_pro": 1.0}
    assert result["missed"]["image_auroc"] < 0.8 and result["missed"]["au_pro"] < 0.3


def test_maps_are_resized_without_clipping_to_the_unit_range():
    from benchmarks.categories import _resized

    maps = np.linspace(0.0, 30.0, 2 * 8 * 20, dtype=np.float32).reshape(2, 8, 20)
    out = _resized(maps, (8, 8))
    assert out.shape == (2, 8, 8)
    assert out.max() > 20 and np.ptp(out[0]) > 1  # an image resize would clip them to [0, 1]
    assert _resized(maps, (8, 20)) is not None and np.array_equal(_resized(maps, (8, 20)), maps)


def test_before_override_restores_epochs_per_scale():
    """The students' ``cpu`` preset as it was before issue 21 (10 / 12 epochs per scale, a 10 %
    hold-out): ``scale_epochs`` is not a field of the preset, yet an override may give it; a
    misspelt field is still refused."""
    import csv

    from benchmarks.categories import load_config
    from ustad.uninformed_students.config import scale_teacher_name, validate
    from ustad.uninformed_students.schedule import scale_schedule

    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "categories_all.sh"
    text = script.read_text(encoding="utf-8")
    parts = [
        line.split("=", 1)[1].removeprefix("+").strip("'")
        for line in text.splitlines()
        if line.startswith("students_before")
    ]
    items = next(csv.reader(["".join(parts)]))
    config = load_config("students", "cpu", items)
    assert scale_schedule(config, 17, 16) == (160, 0)  # 10 epochs, no floor of updates
    assert scale_schedule(config, 33, 16) == (192, 0)
    assert config.val_min_images == 0 and config.select == "last"
    # The rows before issue 23's teachers keep the p = 17 and p = 33 teachers they were trained with.
    (teachers,) = [
        line.split("=", 1)[1].strip("'") for line in text.splitlines()
        if line.startswith("old_teachers=")
    ]  # fmt: skip
    config = load_config("students", "cpu", next(csv.reader([teachers])))
    assert scale_teacher_name(config, 33) == "p33_small_head"
    assert scale_teacher_name(config, 17) == "p17_small_head"
    validate(config)  # the shipped head-target teachers resolve by those names
    with pytest.raises(ValueError, match="scale_epoch="):
        load_config("students", "cpu", ["scale_epoch={}"])


def test_a_multi_scale_workdir_reports_its_scales_size_and_updates(tmp_path):
    """A multi-scale Uninformed Students workdir has no checkpoint at its top: its size (a kept
    aspect) and updates come from its scales, or the benchmark would score squashed images with
    a model trained at another shape."""
    from benchmarks.categories import training_metadata

    metas = {
        "p17": {"image_size": [128, 312], "total_steps": 940, "selected_steps": [940, 900, 940],
                "val_loss_flattened": False},
        "p33": {"image_size": [128, 312], "total_steps": 1128, "selected_steps": [1128] * 3,
                "val_loss_flattened": True},
    }  # fmt: skip
    for name in (*metas, "plots"):
        (tmp_path / name).mkdir()

    def read(folder):
        return metas.get(os.path.basename(folder))

    meta = training_metadata(tmp_path, read)
    assert meta["image_size"] == [128, 312]
    assert meta["total_steps"] == {"p17": 940, "p33": 1128}
    assert meta["val_loss_flattened"] == {"p17": False, "p33": True}
    assert training_metadata(tmp_path / "plots", read) == {}
    metas["p33"]["image_size"] = [128, 128]
    with pytest.raises(ValueError, match="different sizes"):
        training_metadata(tmp_path, read)
