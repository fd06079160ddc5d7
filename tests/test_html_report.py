"""``ustad evaluate`` at the operating point and its static ``report/index.html``, rendered by
headless Chromium (Debian package ``chromium``; the render test is skipped only without it)."""

import json
import re
import shutil
import subprocess

import pytest
from calibrated_setup import DATA, calibrated_students, run

from ustad import calibration_files as cal_files


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    category = calibrated_students(root, 60)
    workdir = root / "students"
    out = root / "eval"
    assert run("evaluate", f"--workdirs={workdir}", f"--data={category}", f"--out={out}") == 0
    return root, out, category


def test_evaluate_reports_the_operating_point(report, capsys):
    root, out, category = report
    result = json.loads((out / "operating_point.json").read_text())
    calibrated, oracle = result["calibrated"], result["f1_max_oracle"]
    threshold = cal_files.find_calibration([root / "students"], {"reduction": "max", "top_k": 100,
                                     "smooth_sigma": 0.0})[0].image_threshold  # fmt: skip
    assert calibrated["threshold"] == threshold and calibrated["good_images"] == 30
    for key in ("false_reject_rate", "miss_rate", "precision", "recall", "f1", "pixel_f1",
                "pixel_iou"):  # fmt: skip
        assert calibrated[key] is not None and 0 <= calibrated[key] <= 1, key
    assert calibrated["tp"] + calibrated["fp"] + calibrated["fn"] + calibrated["tn"] == 12
    assert oracle["uses_test_labels"] and oracle["f1"] >= calibrated["f1"]


def test_evaluate_without_calibration_says_so(report, tmp_path, capsys):
    _, _, category = report
    workdir = tmp_path / "w"
    shutil.copytree(DATA / "workdir_students_v1", workdir)
    out = tmp_path / "eval"
    assert run("evaluate", f"--workdirs={workdir}", f"--data={category}", f"--out={out}") == 0
    assert "no operating point" in capsys.readouterr().out
    assert json.loads((out / "operating_point.json").read_text())["calibrated"] is None
    assert "ustad calibrate" in (out / "report" / "index.html").read_text()


def test_report_lists_every_image_misses_and_false_alarms_first(report):
    _, out, _ = report
    page = (out / "report" / "index.html").read_text()
    rows = re.findall(r'<tr class="(\w+)" data-name="([^"]+)" data-score="([^"]+)"', page)
    assert len(rows) == 12
    wrong = [i for i, (outcome, _, _) in enumerate(rows) if outcome in ("miss", "false_alarm")]
    assert wrong == list(range(len(wrong)))
    right = [float(score) for outcome, _, score in rows if outcome == "correct"]
    assert right == sorted(right, reverse=True)
    for _, name, _ in rows:
        assert (out / "report" / "thumbs" / f"{name}.png").is_file()
    assert "http://" not in page and "https://" not in page  # opens without a network


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs chromium (apt install chromium)"
)
def test_headless_chromium_renders_every_image(report):
    _, out, _ = report
    index = out / "report" / "index.html"
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
         "--dump-dom", index.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    body = re.search(r'<body data-images-loaded="(\d+)" data-images-total="(\d+)"', dom)
    assert body, dom[:500]
    loaded, total = int(body.group(1)), int(body.group(2))
    assert total == 12 + 3 and loaded == total  # 12 thumbnails and the three curves
