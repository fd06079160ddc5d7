"""Exported detectors (ustad.deploy) score as Detector.score does.

Tolerance: the exported programs run the same float32 arithmetic (the JAX one to the bit on
CPU), ONNX Runtime in its own order, so every max |exported − Detector.score| on maps and image
scores must stay within ``TOLERANCE × max(1, max |map|)`` (= ustad.deploy.CHECK_TOLERANCE;
measured: 0 for the JAX artefact, ~5e-7 relative for ONNX Runtime).
"""

import json
import subprocess
import sys
import textwrap
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ustad import deploy
from ustad.cli import main as cli
from ustad.data.synthetic import make_synthetic_category
from ustad.ensemble import ScoreNormalization
from ustad.uninformed_students.checkpoints import ScaleModel
from ustad.uninformed_students.export_graph import make_scorer, scale_weights, teacher_sha256
from ustad.uninformed_students.nets import patch_net
from ustad.uninformed_students.score import Detector

pytest.importorskip("jax2onnx")
ort = pytest.importorskip("onnxruntime")

TOLERANCE = deploy.CHECK_TOLERANCE
SIZE = 32


def _scale(p, seed, norm, channels=3):
    network = patch_net(p, widths=1 / 16, out_dim=8)
    sample = jnp.zeros((1, p, p, channels))
    keys = jax.random.split(jax.random.key(seed), 4)
    params = {
        "teacher": network.init(keys[0], sample),
        "students": jax.vmap(lambda key: network.init(key, sample))(keys[1:]),
        "mean": jnp.full(8, 0.01),
        "std": jnp.full(8, 0.2),
    }
    return ScaleModel(network, jax.tree.map(np.asarray, params), norm, (SIZE, SIZE), channels)


@pytest.fixture(scope="module")
def scales():
    # p = 17 (no pooling) and p = 33 (two poolings: multi-pooling and unwarp are exercised).
    return (
        _scale(17, 0, ScoreNormalization(1.0, 2.0, 0.1, 0.05)),
        _scale(33, 1, ScoreNormalization(-1.0, 0.5, 0.2, 0.1)),
    )


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(size=(3, SIZE, SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def exported(scales, tmp_path_factory):
    folder = tmp_path_factory.mktemp("deploy")
    paths = {suffix: folder / f"detector{suffix}" for suffix in deploy.SUFFIXES}
    for path in paths.values():
        deploy.export(scales, path, sources=["p17-teacher", "p33-teacher"], check=False)
    return paths


def _assert_close(outputs, reference):
    limit = TOLERANCE * max(1.0, float(np.abs(reference[0]).max()))
    for got, want in zip(outputs, reference, strict=True):
        assert got.shape == want.shape and got.dtype == np.float32
        assert float(np.abs(got - want).max()) <= limit


@pytest.mark.parametrize("suffix", deploy.SUFFIXES)
def test_exported_scores_equal_detector_score(scales, images, exported, suffix):
    reference = Detector(scales, batch_size=3).score(images)
    model = deploy.load(exported[suffix])
    _assert_close(model(images), reference)
    # The batch is dynamic: one image and three images from the same file.
    _assert_close(model(images[:1]), (reference[0][:1], reference[1][:1]))


def test_onnx_runtime_session_itself_gives_the_maps(scales, images, exported):
    session = ort.InferenceSession(str(exported[".onnx"]), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["anomaly_map", "image_score"]
    assert session.get_inputs()[0].shape[1:] == [SIZE, SIZE, 3]
    maps, scores = session.run(None, {"images": images})
    _assert_close((maps, scores), Detector(scales, batch_size=3).score(images))


@pytest.mark.parametrize("suffix", deploy.SUFFIXES)
def test_another_image_size_is_rejected_naming_both(exported, suffix):
    model = deploy.load(exported[suffix])
    with pytest.raises(ValueError, match=r"exported for 32×32 images with 3 channels.*40, 40"):
        model(np.zeros((1, 40, 40, 3), np.float32))
    with pytest.raises(ValueError, match="1 channels|3 channels"):
        model(np.zeros((1, SIZE, SIZE, 1), np.float32))
    with pytest.raises(ValueError, match=r"float in \[0, 1\]"):
        model(np.full((1, SIZE, SIZE, 3), 255.0, np.float32))


def test_onnx_runtime_itself_refuses_another_size(exported):
    session = ort.InferenceSession(str(exported[".onnx"]), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="[Ii]nvalid dimensions"):
        session.run(None, {"images": np.zeros((1, 40, 40, 3), np.float32)})


@pytest.mark.parametrize("suffix", deploy.SUFFIXES)
def test_header_says_what_was_exported(scales, exported, suffix):
    header = deploy.read_header(exported[suffix])
    assert header["format"] == deploy.FORMAT and header["ustad_version"]
    assert header["patch_sizes"] == [17, 33] and header["num_students"] == [3, 3]
    assert header["image_size"] == [SIZE, SIZE] and header["channels"] == 3
    assert header["dense_method"] == deploy.DEFAULT_METHOD and header["reduction"] == "max"
    assert [t["name"] for t in header["teachers"]] == ["p17-teacher", "p33-teacher"]
    assert [t["sha256"] for t in header["teachers"]] == [teacher_sha256(s) for s in scales]


def test_onnx_metadata_properties(exported):
    import onnx

    model = onnx.load(str(exported[".onnx"]))
    properties = {entry.key: entry.value for entry in model.metadata_props}
    assert json.loads(properties["ustad"]) == deploy.read_header(exported[".onnx"])
    assert json.loads(properties["patch_sizes"]) == [17, 33]
    assert properties["format"] == deploy.FORMAT


def test_jaxexport_runs_with_jax_and_numpy_alone(images, exported, tmp_path):
    """The README's reader, in a process where Flax and ustad cannot be imported."""
    np.save(tmp_path / "images.npy", images)
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["flax"] = sys.modules["ustad"] = None  # importing either raises
        import io, json, zipfile
        import jax, numpy as np
        with zipfile.ZipFile({str(exported[".jaxexport"])!r}) as archive:
            header = json.loads(archive.read("header.json"))
            program = jax.export.deserialize(bytearray(archive.read("program.stablehlo")))
            arrays = np.load(io.BytesIO(archive.read("weights.npz")))
            weights = [arrays[name] for name in sorted(arrays.files)]
        maps, scores = program.call(weights, np.load({str(tmp_path / "images.npy")!r}))
        np.save({str(tmp_path / "maps.npy")!r}, np.asarray(maps))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    want = deploy.load(exported[".jaxexport"])(images)
    _assert_close((np.load(tmp_path / "maps.npy"),), want[:1])
    with zipfile.ZipFile(exported[".jaxexport"]) as archive:
        assert sorted(archive.namelist()) == ["header.json", "program.stablehlo", "weights.npz"]


# What a machine that only scores must not need: ustad's training stack.
TRAINING_STACK = ("flax", "optax", "orbax", "tensorflow", "tensorflow_datasets", "chex")


def test_deploy_load_imports_no_training_stack(scales, images, exported, tmp_path):
    """``ustad.deploy.load(...)(images)`` and ``.score`` in a process where Flax, Optax, Orbax
    and TensorFlow cannot be imported: none of them is imported, and the maps are the
    Detector's."""
    other = np.random.default_rng(1).uniform(size=(2, 40, 48, 3)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "other.npy", other)
    code = textwrap.dedent(
        f"""
        import importlib.abc, json, sys

        BLOCKED = {TRAINING_STACK!r}

        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                top = name.split(".")[0]
                if top in BLOCKED or top.startswith("tensorflow"):
                    raise ModuleNotFoundError(f"{{name}} is blocked in this test", name=name)
                return None

        sys.meta_path.insert(0, Blocker())
        import numpy as np
        import ustad.deploy

        model = ustad.deploy.load({str(exported[".jaxexport"])!r})
        maps, scores = model(np.load({str(tmp_path / "images.npy")!r}))
        other_maps, other_scores = model.score(np.load({str(tmp_path / "other.npy")!r}))
        np.savez({str(tmp_path / "out.npz")!r}, maps=maps, scores=scores,
                 other_maps=other_maps, other_scores=other_scores)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED
                        or m.startswith(("tensorflow", "ustad.models", "ustad.data",
                                         "ustad.uninformed_students", "ustad.stfpm",
                                         "ustad.training", "ustad.families")))
        print(json.dumps(loaded))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1]) == []
    out = np.load(tmp_path / "out.npz")
    detector = Detector(scales, batch_size=3)
    _assert_close((out["maps"], out["scores"]), detector.score(images))
    _assert_close((out["other_maps"], out["other_scores"]), detector.score(other))


def test_runtime_host_conversions_are_the_detectors():
    # One implementation (ustad.host_images, NumPy and PIL only) serves both.
    from ustad import detector, host_images
    from ustad.data import images
    from ustad.deploy import runtime as deploy_runtime

    assert deploy_runtime.as_unit_float is host_images.as_unit_float
    assert deploy_runtime.convert_channels is detector.convert_channels
    assert deploy_runtime.convert_channels is host_images.convert_channels
    assert deploy_runtime.resize_bilinear is images.resize_bilinear


def test_atrous_and_multipool_graphs_equal_detector_score(scales, images):
    reference = Detector(scales, batch_size=3).score(images)
    weights = [scale_weights(scale) for scale in scales]
    for method in ("multipool", "atrous"):
        score = jax.jit(make_scorer(scales, size=(SIZE, SIZE), method=method))
        _assert_close(tuple(np.asarray(x) for x in score(weights, images)), reference)


def test_gray_input_and_topk_reduction(scales, tmp_path):
    gray = np.random.default_rng(1).uniform(size=(2, SIZE, SIZE, 1)).astype(np.float32)
    path = tmp_path / "gray.jaxexport"
    deploy.export(scales, path, channels=1, reduction="topk", top_k=10, check=False)
    reference = Detector(scales, reduction="topk", top_k=10).score(gray)
    _assert_close(deploy.load(path)(gray), reference)


def test_export_refuses_a_bad_suffix_and_checks_what_it_wrote(scales, tmp_path):
    with pytest.raises(ValueError, match=r"\.onnx or \.jaxexport"):
        deploy.export(scales, tmp_path / "detector.pt")
    meta = deploy.export(scales[:1], tmp_path / "one.jaxexport")
    assert meta["check"]["max_abs_map"] <= meta["check"]["tolerance"]


def _train(root):
    make_synthetic_category(
        root / "data", "tiny", image_size=SIZE, num_train=8, num_test_good=2, num_test_per_defect=1
    )
    args = [
        "train-students",
        "--config=configs/students.py:smoke",
        f"--workdir={root / 'run'}",
        f"--config.data_dir={root / 'data'}",
        "--config.category=tiny",
        f"--config.image_size={SIZE}",
        "--config.out_dim=8",
        "--config.num_students=2",
        "--config.epochs=1",
        "--config.batch_size=2",
        "--config.prng_impl=rbg",
        "--config.stats_batch_size=8",
        "--config.eval_batch_size=8",
    ]
    assert cli.main(["ustad", *args]) == 0


def test_export_and_score_commands(tmp_path, capsys):
    _train(tmp_path)
    images = str(tmp_path / "data" / "tiny" / "test" / "*" / "*.png")
    assert cli.main(["ustad", "score", f"--workdirs={tmp_path / 'run'}", f"--images={images}",
                     f"--out={tmp_path / 'maps'}"]) == 0  # fmt: skip
    for suffix in deploy.SUFFIXES:
        out = tmp_path / f"detector{suffix}"
        assert cli.main(["ustad", "export", f"--workdirs={tmp_path / 'run'}", f"--out={out}"]) == 0
        assert "check: max |Δ|" in capsys.readouterr().out
        header = deploy.read_header(out)
        assert header["teachers"][0]["name"] and header["image_size"] == [SIZE, SIZE]
        maps_dir = tmp_path / f"maps{suffix}"
        argv = ["ustad", "score", f"--model={out}", f"--images={images}", f"--out={maps_dir}"]
        assert cli.main(argv) == 0
        assert (maps_dir / "scores.csv").read_text().splitlines()[0].startswith("path,score")
        for npz in (tmp_path / "maps").rglob("*.npz"):
            want = np.load(npz)["anomaly_map"]
            got = np.load(maps_dir / npz.relative_to(tmp_path / "maps"))["anomaly_map"]
            assert np.abs(got - want).max() <= TOLERANCE * max(1.0, np.abs(want).max())
    argv = ["ustad", "score", f"--images={images}", f"--out={tmp_path / 'x'}"]
    assert cli.main(argv) == 1
    assert "either --workdirs" in capsys.readouterr().err


def test_another_export_size_resizes_inside_the_model(scales):
    """Students trained at 32², exported for 48²: the graph resizes the images (JAX's
    antialiased bilinear; the Detector resizes with PIL's, not bit-equal) and the maps back."""
    images = np.random.default_rng(2).uniform(size=(2, 48, 48, 3)).astype(np.float32)
    score = jax.jit(make_scorer(scales, size=(48, 48)))
    maps, scores = (np.asarray(x) for x in score([scale_weights(s) for s in scales], images))
    resized = np.clip(jax.image.resize(images, (2, SIZE, SIZE, 3), "linear", antialias=True), 0, 1)
    small = Detector(scales).score(np.asarray(resized))[0]
    want = np.asarray(jax.image.resize(small, (2, 48, 48), "linear"))
    _assert_close((maps, scores), (want, want.reshape(2, -1).max(axis=1)))


# Decisions survive export (issue 22): the calibration and the input contract in the header.


def _tamper_jaxexport(path, out, *, header=None, weights=None):
    """A copy of a .jaxexport with its header or weights edited."""
    import io

    with zipfile.ZipFile(path) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    if header is not None:
        meta = json.loads(files["header.json"])
        header(meta)
        files["header.json"] = json.dumps(meta).encode()
    if weights is not None:
        arrays = dict(np.load(io.BytesIO(files["weights.npz"])))
        weights(arrays)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        files["weights.npz"] = buffer.getvalue()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return out


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    import shutil
    from pathlib import Path

    from ustad import calibration_files, families

    root = tmp_path_factory.mktemp("calibrated")
    workdir = root / "run"
    shutil.copytree(Path(__file__).parent / "data" / "workdir_students_v1", workdir)
    good = np.random.default_rng(5).uniform(size=(20, SIZE, SIZE, 3)).astype(np.float32)
    detector = families.load_detector(workdir)
    calibration_files.calibrate_workdir(workdir, detector, good, max_fpr=0.05)
    folder = root / "images"
    folder.mkdir()
    from PIL import Image

    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (SIZE + 8 * i, SIZE, 3), np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return workdir, folder


@pytest.mark.parametrize("suffix", deploy.SUFFIXES)
def test_export_stores_the_calibration_and_verify_passes(calibrated, tmp_path, suffix, capsys):
    from ustad.calibration_files import find_calibration

    workdir, folder = calibrated
    out = tmp_path / f"detector{suffix}"
    argv = ["ustad", "export", f"--workdirs={workdir}", f"--out={out}", f"--verify={folder}"]
    assert cli.main(argv) == 0
    assert "verify: " in capsys.readouterr().out
    want, _ = find_calibration([workdir], {"reduction": "max", "top_k": 100, "smooth_sigma": 0.0})
    model = deploy.load(out)
    assert model.calibration.record() == want.record()
    assert model.header["input_contract"] == {
        "size": [SIZE, SIZE], "channels": 3, "color": "RGB", "value_range": [0.0, 1.0],
        "dtype": "float32", "resize": "pil_bilinear_antialias",
    }  # fmt: skip
    images = np.random.default_rng(0).uniform(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    prediction = model.predict(images)
    assert prediction.threshold == want.image_threshold
    np.testing.assert_array_equal(prediction.is_anomalous, prediction.scores > want.image_threshold)
    maps_dir = tmp_path / "maps"
    assert cli.main(["ustad", "score", f"--model={out}", f"--images={folder}",
                     f"--out={maps_dir}"]) == 0  # fmt: skip
    assert "anomalous (threshold" in capsys.readouterr().out
    assert "is_anomalous" in (maps_dir / "scores.csv").read_text().splitlines()[0]


def test_verify_fails_on_a_tampered_file(calibrated, tmp_path, capsys):
    workdir, folder = calibrated
    out = tmp_path / "detector.jaxexport"
    assert cli.main(["ustad", "export", f"--workdirs={workdir}", f"--out={out}"]) == 0

    def verify(path):
        return cli.main(["ustad", "export", f"--workdirs={workdir}", f"--out={path}",
                         f"--verify={folder}", "--verify_only"])  # fmt: skip

    assert verify(out) == 0
    moved = _tamper_jaxexport(
        out, tmp_path / "threshold.jaxexport",
        header=lambda meta: meta["calibration"].update(image_threshold=-1.0),
    )  # fmt: skip
    assert verify(moved) == 1
    assert "another calibration" in capsys.readouterr().err
    first = "w0000"
    weights = _tamper_jaxexport(
        out, tmp_path / "weights.jaxexport",
        weights=lambda arrays: arrays.__setitem__(first, arrays[first] * 1.01),
    )  # fmt: skip
    assert verify(weights) == 1
    assert "scores the 3 images differently" in capsys.readouterr().err


def test_runtime_refuses_a_contract_it_cannot_honour(calibrated, tmp_path):
    workdir, _ = calibrated
    out = tmp_path / "detector.jaxexport"
    assert cli.main(["ustad", "export", f"--workdirs={workdir}", f"--out={out}"]) == 0
    bad = _tamper_jaxexport(
        out, tmp_path / "bad.jaxexport",
        header=lambda meta: meta["input_contract"].update(resize="bicubic", value_range=[0, 255]),
    )  # fmt: skip
    with pytest.raises(ValueError, match="input contract .*resize 'bicubic'"):
        deploy.load(bad)
    model = deploy.load(out)
    with pytest.raises(ValueError, match="NaN or inf"):
        model(np.full((1, SIZE, SIZE, 3), np.nan, np.float32))


def test_a_failed_check_leaves_no_file(scales, tmp_path, monkeypatch):
    from ustad.deploy import writer

    def failing(*args, **kwargs):
        raise ValueError("scores differently")

    monkeypatch.setattr(writer, "check_export", failing)
    with pytest.raises(ValueError, match="scores differently"):
        deploy.export(scales, tmp_path / "detector.jaxexport")
    assert list(tmp_path.iterdir()) == []
