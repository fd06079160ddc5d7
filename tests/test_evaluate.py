"""ustad.evaluation.reports and ustad.evaluation.figures on tiny arrays: files exist, parse back,
match ustad.evaluation.metrics."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from ustad.evaluation import figures, metrics
from ustad.evaluation import reports as evaluate


def _category(seed: int = 0, n: int = 8, size: int = 24):
    """Images, masks, labels, types and three score sets for one tiny category."""
    rng = np.random.default_rng(seed)
    images = rng.random((n, size, size, 3)).astype(np.float32)
    masks = np.zeros((n, size, size), bool)
    types = ["good"] * 3 + ["crack"] * 3 + ["hole"] * (n - 6)
    for i in range(3, n):
        top, left = rng.integers(2, size - 8, 2)
        masks[i, top : top + rng.integers(2, 6), left : left + rng.integers(2, 6)] = True
    labels = (np.array(types) != "good").astype(np.int32)
    score_maps = {
        name: (rng.random(masks.shape) + strength * masks).astype(np.float32)
        for name, strength in (("p17", 0.3), ("p65", 0.8), ("multiscale", 1.2))
    }
    return images, masks, labels, types, score_maps


def _expected(maps, masks, labels, image_scores=None):
    scores = maps.reshape(len(maps), -1).max(axis=1) if image_scores is None else image_scores
    return {
        "image_auroc": metrics.image_auroc(scores, labels),
        "pixel_auroc": metrics.pixel_auroc(maps, masks),
        "au_pro": metrics.au_pro(maps, masks),
    }


def _assert_png(path, min_size=(50, 50)):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        assert np.asarray(image.convert("L")).std() > 0  # not a blank canvas


def test_evaluate_score_sets_matches_metrics():
    _, masks, labels, _, score_maps = _category()
    custom = {"p65": np.arange(len(labels), dtype=float)}
    results = evaluate.evaluate_score_sets(score_maps, masks, labels, custom)
    assert list(results) == ["p17", "p65", "multiscale"]
    for name, maps in score_maps.items():
        expected = _expected(maps, masks, labels, custom.get(name))
        assert results[name] == pytest.approx(expected, abs=1e-15)
        single = evaluate.category_metrics(maps, masks.astype(np.uint8), labels, custom.get(name))
        assert single == pytest.approx(expected, abs=1e-15)


def test_category_report_files_parse_back(tmp_path):
    images, masks, labels, types, score_maps = _category()
    report = evaluate.write_category_report(
        tmp_path / "bottle",
        "bottle",
        score_maps,
        masks,
        labels,
        images=images,
        types=types,
        metadata={"method": "test"},
    )
    names = {p.name for p in report.paths}
    assert {"metrics.json", "metrics.csv", "metrics.md", "pro_curves.png"} <= names
    assert {"roc_pixel.png", "roc_image.png"} <= names
    assert all(p.is_file() for p in report.paths)
    assert not list(tmp_path.rglob("*.tmp"))

    document = json.loads((tmp_path / "bottle" / "metrics.json").read_text())
    assert document["metadata"] == {"category": "bottle", "fpr_limit": 0.3, "method": "test"}
    assert document["columns"] == ["category", "scale", "image_auroc", "pixel_auroc", "au_pro"]
    with open(tmp_path / "bottle" / "metrics.csv") as f:
        csv_rows = list(csv.DictReader(f))
    markdown = (tmp_path / "bottle" / "metrics.md").read_text().splitlines()
    assert len(document["rows"]) == len(csv_rows) == len(markdown) - 2 == 3
    for row, csv_row, md_row in zip(document["rows"], csv_rows, markdown[2:], strict=True):
        expected = _expected(score_maps[row["scale"]], masks, labels)
        assert row["category"] == csv_row["category"] == "bottle"
        assert f"| {row['scale']} |" in md_row
        for metric, value in expected.items():
            assert row[metric] == pytest.approx(value, abs=1e-15)
            assert float(csv_row[metric]) == pytest.approx(value, abs=1e-15)
            assert f"{value:.4f}" in md_row
        assert report.metrics[row["scale"]] == pytest.approx(expected, abs=1e-15)

    examples = sorted((tmp_path / "bottle" / "examples").glob("*.png"))
    # examples_per_type=1 ("extremes"): the hardest of each type, 1 good + 1 crack + 1 hole.
    assert len(examples) == 3
    for path in [*examples, *(p for p in report.paths if p.suffix == ".png")]:
        _assert_png(path)


def test_multi_category_table_has_means(tmp_path):
    results = {
        "bottle": {"p65": {"image_auroc": 1.0, "pixel_auroc": 0.9, "au_pro": 0.8}},
        "cable": {"p65": {"image_auroc": 0.5, "pixel_auroc": 0.7, "au_pro": 0.6}},
    }
    paths = evaluate.write_metrics_table(results, tmp_path, name="all")
    assert [p.name for p in paths] == ["all.json", "all.csv", "all.md"]
    rows = json.loads(paths[0].read_text())["rows"]
    assert rows[-1] == {
        "category": "mean",
        "scale": "p65",
        "image_auroc": 0.75,
        "pixel_auroc": pytest.approx(0.8),
        "au_pro": pytest.approx(0.7),
    }
    with pytest.raises(ValueError, match=r"results\['cable'\]\['p65'\] lacks \['au_pro'\]"):
        evaluate.write_metrics_table(
            {"cable": {"p65": {"image_auroc": 1.0, "pixel_auroc": 1.0}}}, tmp_path
        )


def test_one_class_table(tmp_path):
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 3, 60)
    aurocs = {}
    for normal in range(3):
        scores = rng.random(60) + 0.5 * (classes != normal)
        aurocs[str(normal)] = evaluate.one_class_auroc(scores, classes, normal)
        assert aurocs[str(normal)] == metrics.image_auroc(scores, classes != normal)
    paths = evaluate.write_one_class_table(aurocs, tmp_path, metadata={"dataset": "toy"})
    document = json.loads(paths[0].read_text())
    assert document["rows"][-1] == {
        "class": "mean",
        "roc_auc": pytest.approx(np.mean(list(aurocs.values()))),
    }
    with open(paths[1]) as f:
        assert [r["class"] for r in csv.DictReader(f)] == ["0", "1", "2", "mean"]
    assert paths[2].read_text().startswith("| class | roc_auc |")


def test_select_examples():
    types = ["good", "good", "good", "crack", "crack"]
    scores = [0.1, 0.9, 0.5, 0.2, 0.8]
    assert figures.select_examples(types, scores, how="first") == [0, 3]
    # One a type: the hardest (the highest-scored good image, the lowest-scored defect).
    assert figures.select_examples(types, scores, how="extremes") == [1, 3]
    assert figures.select_examples(types, scores, per_type=2, how="extremes") == [0, 1, 3, 4]
    assert figures.select_examples(types, scores, per_type=2, how="first") == [0, 1, 3, 4]


def test_figures_stay_importable_from_evaluate():
    assert evaluate.plot_curves is figures.plot_curves
    assert evaluate.select_examples is figures.select_examples
    assert evaluate.write_examples is figures.write_examples


def test_plot_curves_thins_long_curves(tmp_path):
    x = np.sort(np.random.default_rng(0).random(50_000))
    path = figures.plot_curves({"long": (x, np.sqrt(x))}, tmp_path / "c.png", kind="pro")
    _assert_png(path)


def test_bad_inputs(tmp_path):
    images, masks, labels, types, score_maps = _category()
    with pytest.raises(ValueError, match="score set 'p17': anomaly maps have shape"):
        evaluate.evaluate_score_sets({"p17": score_maps["p17"][:, :-1]}, masks, labels)
    with pytest.raises(ValueError, match=r"labels must be \[N\]"):
        evaluate.evaluate_score_sets(score_maps, masks, labels[:-1])
    wrong = labels.copy()
    wrong[4] = 0
    with pytest.raises(ValueError, match=r"images \[4\] have label 0 but a non-empty mask"):
        evaluate.evaluate_score_sets(score_maps, masks, wrong)
    with pytest.raises(ValueError, match="score set 'p65'.*no anomalous pixel"):
        evaluate.evaluate_score_sets({"p65": score_maps["p65"]}, np.zeros_like(masks), labels * 0)
    with pytest.raises(ValueError, match="masks must contain only 0 and 1"):
        evaluate.evaluate_score_sets(score_maps, masks.astype(np.uint8) * 255, labels)
    with pytest.raises(ValueError, match="must map score-set names"):
        evaluate.evaluate_score_sets(score_maps["p65"], masks, labels)
    with pytest.raises(ValueError, match="not in score_maps"):
        evaluate.evaluate_score_sets(score_maps, masks, labels, {"p33": labels})
    with pytest.raises(ValueError, match="example_set 'p33'"):
        evaluate.write_category_report(
            tmp_path, "x", score_maps, masks, labels, images=images, types=types, example_set="p33"
        )
    assert not any(tmp_path.iterdir())  # checked before anything was written
    with pytest.raises(ValueError, match="indices must lie in"):
        figures.write_examples(images, masks, score_maps["p65"], tmp_path, [len(masks)])


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        evaluate.write_metrics_table(
            {"c": {"p65": {"image_auroc": 1.0, "pixel_auroc": 1.0, "au_pro": 1.0}}}, tmp_path
        )
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
