"""Teacher files: export, load by path and by name, and clear errors for bad files."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from test_teacher import _config, _train

import ustad
from ustad.uninformed_students.teacher import catalog, shipping
from ustad.uninformed_students.teacher import files as teacher_files
from ustad.uninformed_students.teacher import train as teacher


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("teacher")
    _train(workdir, _config(num_steps=4, checkpoint_every_steps=4))
    return workdir


def _apply(module, variables, seed=0):
    patches = np.random.default_rng(seed).random((3, module.patch_size, module.patch_size, 3))
    return np.asarray(module.apply(variables, patches.astype(np.float32)))


def test_export_round_trip_by_path_and_by_name(trained, tmp_path, monkeypatch):
    module, variables, meta = teacher.load_teacher(trained)
    path = tmp_path / "t.teacher.npz"
    record = catalog.export_teacher(trained, path)
    assert record["bytes"] == path.stat().st_size and len(record["sha256"]) == 64
    loaded, loaded_vars, header = teacher.load_teacher(path)
    assert loaded == module
    assert header["step"] == meta["step"] == 4 and header["channels"] == 3
    np.testing.assert_array_equal(_apply(loaded, loaded_vars), _apply(module, variables))
    teacher_files.read_teacher_file(path, sha256=record["sha256"])
    with pytest.raises(ValueError, match="SHA-256"):
        teacher_files.read_teacher_file(path, sha256="0" * 64)

    monkeypatch.setenv("USTAD_TEACHERS", str(tmp_path / "named"))
    with pytest.raises(FileNotFoundError, match=r"shipped teachers \(names: "):
        teacher.load_teacher("tiny17")
    installed = catalog.install_teacher(path, "tiny17")
    assert installed == tmp_path / "named" / "tiny17.teacher.npz"
    by_name = teacher.load_teacher("tiny17")
    np.testing.assert_array_equal(_apply(*by_name[:2]), _apply(module, variables))
    with pytest.raises(ValueError, match="plain file stem"):
        catalog.install_teacher(path, "../escape")


def test_float16_export_is_half_the_size_and_close(trained, tmp_path):
    module, variables, _ = teacher.load_teacher(trained)
    full = catalog.export_teacher(trained, tmp_path / "a.teacher.npz")
    half = catalog.export_teacher(trained, tmp_path / "b.teacher.npz", dtype="float16")
    assert half["bytes"] < 0.6 * full["bytes"]
    loaded = teacher.load_teacher(tmp_path / "b.teacher.npz")
    reference = _apply(module, variables)
    np.testing.assert_allclose(_apply(*loaded[:2]), reference, atol=2e-2 * np.abs(reference).max())


def _rewrite(path, out, change):
    archive = np.load(path)
    arrays = {key: archive[key] for key in archive.files}
    change(arrays)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    out.write_bytes(buffer.getvalue())
    return out


def _header(arrays):
    return json.loads(arrays["__header__"].tobytes().decode())


def _set_header(arrays, **fields):
    header = dict(_header(arrays), **fields)
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)


def test_bad_files_name_what_is_wrong(trained, tmp_path):
    good = tmp_path / "good.teacher.npz"
    catalog.export_teacher(trained, good)
    first = next(k for k in np.load(good).files if k.startswith("params/"))

    def nan(arrays):
        arrays[first] = np.full_like(arrays[first], np.nan)

    def reshape(arrays):
        arrays[first] = np.zeros(arrays[first].shape + (2,), np.float32)

    cases = {
        "missing": (lambda a: a.pop(first), "is missing"),
        "nan": (nan, "NaN"),
        "shape": (reshape, "has shape"),
        "format": (lambda a: _set_header(a, format="other/9"), "format 'other/9'"),
        "header": (lambda a: a.pop("__header__"), "no '__header__'"),
        "extra": (lambda a: a.__setitem__("params/conv9/kernel", np.zeros(2)), "unexpected"),
    }
    for name, (change, message) in cases.items():
        bad = _rewrite(good, tmp_path / f"{name}.teacher.npz", change)
        with pytest.raises(ValueError, match=message) as error:
            teacher.load_teacher(bad)
        assert str(bad) in str(error.value)
    corrupt = tmp_path / "corrupt.teacher.npz"
    corrupt.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a teacher file"):
        teacher.load_teacher(corrupt)
    with pytest.raises(FileNotFoundError, match="no teacher"):
        teacher.load_teacher(tmp_path / "absent")


def test_students_config_takes_a_teacher_by_name(trained, tmp_path, monkeypatch):
    import jax
    import ml_collections

    from ustad.uninformed_students import targets as student_targets

    monkeypatch.setenv("USTAD_TEACHERS", str(tmp_path))
    catalog.export_teacher(trained, tmp_path / "mine.teacher.npz")
    config = ml_collections.ConfigDict({"teacher_workdir": "mine"})
    module, variables, source = student_targets.teacher_from_config(
        config, 17, 3, jax.random.key(0)
    )
    assert source == str((tmp_path / "mine.teacher.npz").resolve())
    np.testing.assert_array_equal(
        _apply(module, variables), _apply(*teacher.load_teacher(trained)[:2])
    )


def test_one_scale_takes_its_own_teacher_over_the_template(trained, tmp_path, monkeypatch):
    """``scale_teachers`` names one scale's teacher (e.g. the one a shipped name held before a
    new teacher took it); the other scales keep ``teacher_workdir``'s template."""
    import jax
    import ml_collections

    from ustad.uninformed_students import config as students_config
    from ustad.uninformed_students import targets as student_targets

    monkeypatch.setenv("USTAD_TEACHERS", str(tmp_path))
    catalog.export_teacher(trained, tmp_path / "old.teacher.npz")
    config = ml_collections.ConfigDict(
        {"teacher_workdir": "absent{p}", "scale_teachers": {"p17": "old"}}
    )
    assert students_config.scale_teacher_name(config, 17) == "old"
    assert students_config.scale_teacher_name(config, 33) == "absent33"
    _, _, source = student_targets.teacher_from_config(config, 17, 3, jax.random.key(0))
    assert source == str((tmp_path / "old.teacher.npz").resolve())
    full = students_config.students_config("p17")
    full.scale_teachers = {"p17": "old"}
    full.teacher_workdir = "absent{p}"
    students_config.validate(full)  # the template's p17 teacher does not exist: not asked for
    full.scale_teachers = {"p18": "old"}
    with pytest.raises(ValueError, match="scale_teachers.p18"):
        students_config.validate(full)


def test_decoder_travels_with_the_file_and_training_continues_from_it(trained, tmp_path):
    path = tmp_path / "t.teacher.npz"
    catalog.export_teacher(trained, path)
    from_file = catalog.load_decoder(path)
    from_workdir = catalog.load_decoder(trained)
    assert from_file["kernel"].shape == (16, 8) and from_file["bias"].shape == (8,)
    np.testing.assert_array_equal(from_file["kernel"], from_workdir["kernel"])
    bare = tmp_path / "bare.teacher.npz"
    catalog.export_teacher(trained, bare, with_decoder=False)
    assert catalog.load_decoder(bare) is None

    # Continue the 4-step file to 6 steps in a new workdir: it starts at step 4; snapshots keep
    # a file per step asked for.
    continued = tmp_path / "continued"
    config = _config(num_steps=6, init_from=str(path), snapshot_every_steps=1)
    _, variables, meta = _train(continued, config)
    assert meta["step"] == 6
    snapshots = sorted(p.name for p in (continued / "snapshots").iterdir())
    assert snapshots == ["step_0000005.teacher.npz", "step_0000006.teacher.npz"]
    last = teacher.load_teacher(continued / "snapshots" / snapshots[-1])
    assert last[2]["step"] == 6
    np.testing.assert_allclose(
        _apply(*last[:2]), _apply(teacher.load_teacher(continued)[0], variables), atol=2e-2
    )
    steps = [json.loads(x)["step"] for x in (continued / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 6]
    with pytest.raises(ValueError, match="already has 4 steps"):
        _train(tmp_path / "again", _config(num_steps=4, init_from=str(path)))
    with pytest.raises(ValueError, match="without its decoder"):
        _train(tmp_path / "bare_run", _config(num_steps=6, init_from=str(bare)))
    with pytest.raises(ValueError, match="out_dim"):
        _train(tmp_path / "other", _config(num_steps=6, out_dim=8, init_from=str(path)))


def test_list_teachers_and_shipped_files_are_checked(trained, tmp_path, monkeypatch):
    shipped = tmp_path / "shipped"
    installed = tmp_path / "installed"
    monkeypatch.setenv("USTAD_TEACHERS", str(installed))
    monkeypatch.setattr(catalog, "shipped_dir", lambda: shipped)
    entry = shipping.ship_teacher(trained, "tiny", extra={"au_pro": 0.5})
    assert entry["steps"] == 4 and entry["file"] == "tiny.teacher.npz"
    manifest = json.loads((shipped / "MANIFEST.json").read_text())
    assert [e["name"] for e in manifest["teachers"]] == ["tiny"]
    listed = catalog.list_teachers()
    assert [(t["name"], t["origin"]) for t in listed] == [("tiny", "shipped")]
    assert listed[0]["patch_size"] == 17 and listed[0]["out_dim"] == 16
    assert listed[0]["steps"] == 4 and listed[0]["au_pro"] == 0.5
    assert teacher.load_teacher("tiny")[2]["step"] == 4
    # A shipped name is refused without force; with it the installed file wins, and the
    # listing shows both entries and which one the name loads.
    with pytest.raises(ValueError, match="'tiny' is the name of a teacher shipped with ustad"):
        catalog.install_teacher(shipped / "tiny.teacher.npz", "tiny")
    catalog.install_teacher(shipped / "tiny.teacher.npz", "tiny", force=True)
    listed = catalog.list_teachers()
    assert [(t["origin"], t["active"]) for t in listed] == [("installed", True), ("shipped", False)]
    assert catalog.resolve_teacher("tiny") == installed / "tiny.teacher.npz"
    (installed / "tiny.teacher.npz").unlink()
    # A shipped file that does not match its manifest fails loudly.
    data = bytearray((shipped / "tiny.teacher.npz").read_bytes())
    data[-30] ^= 1
    (shipped / "tiny.teacher.npz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        teacher.load_teacher("tiny")


def test_manifest_entries_without_a_recipe_get_it_from_their_file(trained, tmp_path, monkeypatch):
    shipped = tmp_path / "shipped"
    monkeypatch.setattr(catalog, "shipped_dir", lambda: shipped)
    entry = shipping.ship_teacher(trained, "tiny")
    manifest = json.loads((shipped / "MANIFEST.json").read_text())
    del manifest["teachers"][0]["recipe"]  # as written before recipes were recorded
    (shipped / "MANIFEST.json").write_text(json.dumps(manifest))
    assert shipping.add_recipes() == ["tiny"]
    again = catalog.read_manifest()["tiny"]
    assert again["recipe"] == entry["recipe"] and again["recipe"]["steps"] == 4
    assert again["recipe"]["target"] == "head"
    assert shipping.add_recipes() == []  # nothing left to add


def test_every_shipped_teacher_records_its_recipe():
    """Issue 23: the shipped manifest says how each teacher was trained (target, P's input, D's
    initialisation, optimisation)."""
    entries = catalog.read_manifest()
    assert entries, "no shipped teachers"
    for name, entry in entries.items():
        recipe = entry.get("recipe")
        assert recipe, f"{name}: no recipe in MANIFEST.json"
        assert {"target", "init_decoder", "learning_rate", "lambda_c", "steps"} <= set(recipe)
        assert recipe["steps"] == entry["steps"]


def test_teacher_modules_import_in_one_direction():
    import ast
    from pathlib import Path

    def imported(module):
        tree = ast.parse(Path(module.__file__).read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}

    trainer = "ustad.uninformed_students.teacher.train"
    assert trainer not in imported(teacher_files) | imported(catalog)
    # The file format knows nothing of names, workdirs or the catalogue.
    assert "ustad.uninformed_students.teacher.catalog" not in imported(teacher_files)


def test_shipped_dir_is_the_package_teachers_folder():
    assert catalog.shipped_dir() == Path(ustad.__file__).resolve().parent / "teachers"
    assert (catalog.shipped_dir() / catalog.MANIFEST).is_file()


def test_choose_teachers_prefers_full_width_unless_told(monkeypatch):
    listed = [{"name": n} for n in ("p33", "p17_small", "p33_small")] + [
        {"name": "p65_small", "error": "unreadable"}
    ]
    monkeypatch.setattr(catalog, "list_teachers", lambda: listed)
    assert catalog.choose_teachers([17, 33]) == {17: "p17_small", 33: "p33"}
    assert catalog.choose_teachers([17, 33], "small") == {17: "p17_small", 33: "p33_small"}
    assert catalog.choose_teachers([17, 33], "33=mine") == {17: "p17_small", 33: "mine"}
    with pytest.raises(FileNotFoundError, match="no teacher for p=65"):
        catalog.choose_teachers([65])


def test_training_minutes_count_steps_at_their_rates_across_a_resume(tmp_path):
    records = [
        {"step": 100, "steps_per_s": 2.0},  # 50 s
        {"step": 200, "steps_per_s": 1.0},  # 100 s
        {"step": 260, "steps_per_s": 0.5},  # resumed later: 120 s, not the wall-clock gap
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert shipping.training_minutes(tmp_path) == round(270 / 60, 1)
    # Continued from a 6,000-step file: the first record covers one interval, not 6,100 steps.
    records = [{"step": 6100, "steps_per_s": 10.0}, {"step": 6200, "steps_per_s": 20.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert shipping.training_minutes(tmp_path) == round(15 / 60, 1)


def test_probe_summary_merges_one_teachers_lines_under_several_paths():
    def figures(value):
        return {"raw": {}, "smoothed_sigma4": dict.fromkeys(FIGURES, value)}

    grid = {
        "teacher": {"source": "snap.npz"},
        "dataset": "bottle@128",
        "grid": {"figures": figures(0.9)},
    }
    verdict = {
        "teacher": {"source": "copy.npz"},
        "dataset": "bottle@128",
        "student": {"figures": figures(0.8), "settings": {"steps": 1128}},
    }
    summary = shipping.probe_summary([grid, verdict], ["snap.npz", "copy.npz"])
    assert summary == {
        "bottle@128": {
            "grid_probe": dict.fromkeys(FIGURES, 0.9),
            "student_probe": dict.fromkeys(FIGURES, 0.8),
            "student_probe_updates": 1128,
        }
    }
    assert shipping.probe_summary([grid, verdict], "snap.npz") == {
        "bottle@128": {"grid_probe": dict.fromkeys(FIGURES, 0.9)}
    }


FIGURES = ("au_pro", "pixel_auroc", "image_auroc")


def test_probe_summary_keeps_the_smoothed_figures_of_one_teacher():
    figures = {"au_pro": 0.8, "pixel_auroc": 0.9, "image_auroc": 0.95, "seconds": 3}
    line = {
        "teacher": {"source": "runs/t"},
        "dataset": "bottle@128",
        "descriptor": {"figures": {"raw": {}, "smoothed_sigma4": figures}},
        "distill": {"figures": {"r2_decoder": 0.6, "mean_abs_offdiag_corr": 0.1, "x": 1}},
    }
    other = dict(line, teacher={"source": "random:33:0.125:32"})
    summary = shipping.probe_summary([line, other], "runs/t")
    assert summary == {
        "bottle@128": {
            "descriptor_probe": {"au_pro": 0.8, "pixel_auroc": 0.9, "image_auroc": 0.95},
            "r2_decoder": 0.6,
            "mean_abs_offdiag_corr": 0.1,
        }
    }
