"""benchmarks/peers.py without torch: the JSON line's assembly, the ratio, the venv check."""

import ast
import json
from pathlib import Path

import pytest

from benchmarks import peers

ROOT = Path(__file__).resolve().parent.parent


def run(seconds, rss=100.0, **extra):
    return {"seconds": seconds, "peak_rss_mb": rss, "versions": {"x": "1"}, "threads": {}, **extra}


def test_summarize_ratio_is_ustad_time_over_peer_time():
    ours = [run(1.0, 500.0, strategy="vmap"), run(3.0, 700.0, strategy="vmap")]
    theirs = [run(4.0), run(4.0, 300.0)]
    record = peers.summarize("m", ours, theirs, images=8)
    assert record["ours"]["seconds"] == 2.0  # the median of the rounds
    assert record["theirs"]["seconds"] == 4.0
    assert record["ratio"] == 0.5
    assert record["round_ratios"] == [0.25, 0.75]
    assert record["faster"] == "ustad" and record["speedup"] == 2.0
    assert record["ours"]["images_per_s"] == 4.0 and record["theirs"]["images_per_s"] == 2.0
    assert record["ours"]["peak_rss_mb"] == 700.0 and record["theirs"]["peak_rss_mb"] == 300.0
    assert record["ours"]["strategy"] == "vmap"
    json.dumps(record)  # one JSON line


def test_summarize_sets_both_sides_against_the_matmul_peak():
    ours = [run(2.0, flops_per_call=40e9)]
    record = peers.summarize("m", ours, [run(4.0)], peak_gflops=100.0)
    assert record["gflops_per_call"] == 40.0 and record["machine_matmul_gflops_per_s"] == 100.0
    assert record["ours"]["gflops_per_s"] == 20.0 and record["theirs"]["gflops_per_s"] == 10.0
    assert record["ours"]["fraction_of_matmul_peak"] == 0.2
    assert record["theirs"]["fraction_of_matmul_peak"] == 0.1
    bare = peers.summarize("m", [run(2.0)], [run(4.0)], peak_gflops=100.0)
    assert bare["gflops_per_call"] is None and "gflops_per_s" not in bare["ours"]


def test_summarize_slower_side_and_no_images():
    record = peers.summarize("m", [run(3.0)], [run(2.0)])
    assert record["ratio"] == 1.5 and record["faster"] == "peer" and record["speedup"] == 1.5
    assert "images_per_s" not in record["ours"]


def test_summarize_needs_paired_runs():
    with pytest.raises(ValueError, match="one peer run per ustad run"):
        peers.summarize("m", [run(1.0), run(1.0)], [run(1.0)])


def test_parse_worker_output_takes_last_json_line_and_rejects_bad_ones():
    text = 'warning: something\n{"seconds": 9}\n{"seconds": 0.5, "peak_rss_mb": 1}\n'
    assert peers.parse_worker_output(text, "theirs", "m")["seconds"] == 0.5
    with pytest.raises(ValueError, match="theirs worker for 'm' printed no JSON line"):
        peers.parse_worker_output("Traceback ...\n", "theirs", "m")
    with pytest.raises(ValueError, match="no positive 'seconds'"):
        peers.parse_worker_output('{"seconds": 0}', "ours", "m")


def test_missing_venv_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match=r"peers virtualenv missing .*--install") as info:
        peers.peer_python(tmp_path / "nowhere")
    assert "\n" not in str(info.value) and str(tmp_path / "nowhere") in str(info.value)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    with pytest.raises(SystemExit, match=peers.MARKER):  # created but never finished
        peers.peer_python(venv)
    (venv / peers.MARKER).write_text("{}")
    assert peers.peer_python(venv) == venv / "bin" / "python"


def test_venv_path_order(monkeypatch, tmp_path):
    monkeypatch.setenv("USTAD_PEERS_VENV", str(tmp_path / "env"))
    assert peers.venv_path(None) == tmp_path / "env"
    assert peers.venv_path(str(tmp_path / "flag")) == tmp_path / "flag"
    monkeypatch.delenv("USTAD_PEERS_VENV")
    assert peers.venv_path(None).parts[-3:] == (".cache", "ustad", "peers-venv")


def test_install_pins_every_peer_package(tmp_path):
    commands = peers.install_commands(tmp_path / "v")
    assert commands[0][-1] == str(tmp_path / "v")
    installed = [arg for command in commands[1:] for arg in command if "==" in arg]
    assert {a.split("==")[0] for a in installed} == {"torch", "torchvision", "anomalib"}


def _cases(path: Path, name: str) -> set:
    """Keys of the module-level dict ``name`` in a file, without importing it
    (the torch worker needs torch)."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        targets = [getattr(t, "id", "") for t in getattr(node, "targets", [])]
        if isinstance(node, ast.Assign) and name in targets:
            return {key.value for key in node.value.keys}
    raise AssertionError(f"no {name} in {path}")


def test_every_measure_has_a_case_on_both_sides():
    torch_cases = _cases(ROOT / "benchmarks" / "peers_torch.py", "CASES")
    jax_cases = _cases(ROOT / "benchmarks" / "peers_jax.py", "CASES")
    assert torch_cases == jax_cases - {"matmul"}  # ustad's side also measures the matmul peak
    assert {case for case, _, _ in peers.MEASURES.values()} <= torch_cases
    for name, (_, sizes, _) in peers.MEASURES.items():
        if name.startswith("stfpm_step"):
            assert sizes == {"image_size": 256, "batch": 8}
        if name.startswith("us_"):
            assert sizes["num_students"] == 3 and sizes["image_size"] == 128


def test_summarize_pieces_per_piece_ratio_and_peak():
    def pieces(step, forward):
        return {"seconds": step + forward, "pieces": {
            "teacher_forward": {"seconds": forward, "flops": 10e9},
            "step": {"seconds": step, "flops": None},
        }}  # fmt: skip

    ours = [pieces(2.0, 1.0), pieces(4.0, 3.0)]
    theirs = [pieces(1.0, 2.0), pieces(1.0, 2.0)]
    record = peers.summarize_pieces(ours, theirs, peak_gflops=50.0)
    forward, step = record["pieces"]["teacher_forward"], record["pieces"]["step"]
    assert forward["ours_s"] == 2.0 and forward["theirs_s"] == 2.0 and forward["ratio"] == 1.0
    assert forward["ours_gflops_per_s"] == 5.0 and forward["ours_fraction_of_peak"] == 0.1
    assert step["ratio"] == 3.0 and "gflops" not in step
    assert set(peers.PROFILES) <= set(peers.MEASURES)
