"""Workdirs written before the layout change (commit caca078's code) keep loading and score
identically: a tiny Uninformed Students and a tiny STFPM workdir (smoke configs, one epoch) are
committed under tests/data with their maps and image scores on three fixed images."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

import ustad

DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(DATA / "workdirs_v1_expected.npz"))


@pytest.mark.parametrize(
    "family, detector_class",
    [("students", "Detector"), ("stfpm", "STFPMDetector")],
)
def test_old_workdir_scores_identically(expected, family, detector_class):
    workdir = DATA / f"workdir_{family}_v1"
    detector = ustad.load_detector(workdir)
    assert type(detector).__name__ == detector_class
    maps, scores = detector.score(expected["images"])
    np.testing.assert_allclose(maps, expected[f"{family}_maps"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scores, expected[f"{family}_scores"], rtol=1e-5, atol=1e-5)


def test_family_of_old_workdirs():
    assert ustad.family_of(DATA / "workdir_students_v1") == "uninformed_students"
    assert ustad.family_of(DATA / "workdir_stfpm_v1") == "stfpm"


def test_mixing_families_is_refused():
    with pytest.raises(ValueError, match="cannot average models of different families"):
        ustad.load_detector([DATA / "workdir_students_v1", DATA / "workdir_stfpm_v1"])
