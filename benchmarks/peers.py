"""ustad side by side with the field's PyTorch implementations, on this machine, in one sitting.

Each measure runs ustad and its peer in separate processes, alternated (ustad, peer, ustad,
peer, …), each after a warm-up call, on random weights (speed only; nothing is downloaded). One
JSON line per measure: both sides' median seconds per call (and images/s for scoring), their
peak RSS, versions and thread counts, and the ratio ustad time ÷ peer time (< 1: ustad faster;
≤ 0.5: at least 2× faster).

    python -m benchmarks.peers --install          # the peers' virtualenv (prints what it installs)
    python -m benchmarks.peers                    # every measure, 2 rounds
    python -m benchmarks.peers --measures=stfpm_step,us_step_p65 --rounds=3
    python -m benchmarks.peers --check_port       # the PyTorch US port == ustad, same weights
    python -m benchmarks.peers --profile --out=benchmarks/results/peers_profile_cpu.jsonl
                                                  # the steps' pieces, both sides, vs matmul peak

The peers:

* STFPM: anomalib's ``STFPMModel`` and ``STFPMLoss`` (ResNet-18 layer1–3, SGD 0.4/0.9/1e-3),
  the same pyramid as ustad's ``pyramid_net("resnet18")``, batch 8 at 256²;
* Uninformed Students: a faithful PyTorch port of the paper's p = 65 and p = 33 patch networks
  as the most used PyTorch implementation (denguir/student-teacher-anomaly-detection) runs them
  (128-d, no dropout, multi-pooling dense extraction, teacher recomputed each step, 3 students
  in turn, one 128² image): ``benchmarks/peers_torch.py``, which runs in the peers' venv;
  ``--check_port`` runs it on ustad's weights and images and compares the dense descriptors.

Where PyTorch's CPU index cannot be reached, PyPI's torchvision (built against CUDA torch)
imports only through a two-line shim in ``peers_torch.py`` (STFPM uses no torchvision operator).

Both sides do the same work per call: the STFPM and Uninformed Students steps run the frozen
teacher inside the step (neither uses a cache of teacher outputs), and scoring goes from an
array of images to anomaly maps and image scores (ustad through its detectors, resizing and
batching included). The peers live in their own virtualenv (default
``~/.cache/ustad/peers-venv``, or ``$USTAD_PEERS_VENV``), never among ustad's dependencies.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_bool("install", False, "create the peers' virtualenv and install the peers")
flags.DEFINE_string("venv", None, "the peers' virtualenv (default $USTAD_PEERS_VENV or "
                    "~/.cache/ustad/peers-venv)")  # fmt: skip
flags.DEFINE_list("measures", None, "measures to run (default: all)")
flags.DEFINE_integer("rounds", 2, "alternated (ustad, peer) rounds per measure")
flags.DEFINE_integer("repeats", 3, "timed calls per process (median)")
flags.DEFINE_integer("threads", 0, "peer intra-op threads (0: os.cpu_count(), as XLA uses)")
flags.DEFINE_string("out", "benchmarks/results/peers_cpu.jsonl", "append the lines here ('' none)")
flags.DEFINE_integer("timeout_s", 1800, "per worker process")
flags.DEFINE_bool("check_port", False, "check the PyTorch US port against ustad (same weights)")
flags.DEFINE_bool(
    "profile", False, "time the steps' pieces on both sides instead (one line per --measures "
    "step: teacher forward, one student's forward/backward, step on cached teacher outputs, step)"
)  # fmt: skip
flags.DEFINE_string("worker", None, "internal: run one side's measure in this process")
flags.DEFINE_string("worker_options", "{}", "internal: the worker's options (JSON)")

# Pinned versions that installed together (Python 3.11, CPU): torch's CPU wheel first, so that
# anomalib's dependency on torch is already met and no CUDA wheel is pulled in.
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
PEER_PACKAGES = ("torch==2.13.0+cpu", "torchvision==0.28.0")
ANOMALIB = "anomalib==2.7.0"
MARKER = "ustad-peers.json"
WORKER = Path(__file__).with_name("peers_torch.py")

# name -> (case, options, what ustad runs, what the peer runs)
MEASURES = {
    "stfpm_step": (
        "stfpm_step", {"image_size": 256, "batch": 8},
        "STFPM train step (teacher in the step), ResNet-18 L1-3, M=1, batch 8, 256²",
    ),
    "stfpm_score_b8": (
        "stfpm_score", {"image_size": 256, "batch": 8, "images": 8},
        "STFPM scoring, 8 images of 256² in batches of 8",
    ),
    "stfpm_score_b1": (
        "stfpm_score", {"image_size": 256, "batch": 1, "images": 8},
        "STFPM scoring, 8 images of 256² one at a time",
    ),
    "us_step_p65": (
        "us_step", {"patch_size": 65, "image_size": 128, "batch": 1, "num_students": 3},
        "Uninformed Students step: teacher + 3 students, p=65, 128-d, one 128² image",
    ),
    "us_step_p33": (
        "us_step", {"patch_size": 33, "image_size": 128, "batch": 1, "num_students": 3},
        "Uninformed Students step: teacher + 3 students, p=33, 128-d, one 128² image",
    ),
    "us_score_p65": (
        "us_score",
        {"patch_size": 65, "image_size": 128, "batch": 1, "images": 4, "num_students": 3},
        "Uninformed Students scoring (teacher + 3 students, e+v map, image score), p=65, "
        "4 images of 128² one at a time",
    ),
    "us_score_p33": (
        "us_score",
        {"patch_size": 33, "image_size": 128, "batch": 1, "images": 4, "num_students": 3},
        "Uninformed Students scoring, p=33, 4 images of 128² one at a time",
    ),
}  # fmt: skip


def venv_path(flag: str | None = None) -> Path:
    """The peers' virtualenv: the flag, else ``$USTAD_PEERS_VENV``, else the user cache."""
    if flag:
        return Path(flag).expanduser()
    if os.environ.get("USTAD_PEERS_VENV"):
        return Path(os.environ["USTAD_PEERS_VENV"]).expanduser()
    return Path("~/.cache/ustad/peers-venv").expanduser()


def peer_python(venv: Path) -> Path:
    """The venv's interpreter, or a one-line ``SystemExit`` naming what is missing."""
    python = venv / "bin" / "python"
    if not python.exists() or not (venv / MARKER).exists():
        raise SystemExit(
            f"peers virtualenv missing or incomplete: {venv} (no bin/python or {MARKER}); "
            "run `python -m benchmarks.peers --install` first"
        )
    return python


def install_commands(venv: Path) -> list[list[str]]:
    """The commands ``--install`` runs, in order."""
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install"]
    return [
        [sys.executable, "-m", "venv", str(venv)],
        [*pip, "--extra-index-url", TORCH_INDEX, *PEER_PACKAGES],
        [*pip, "--extra-index-url", TORCH_INDEX, *PEER_PACKAGES, ANOMALIB],
    ]


def install(venv: Path) -> None:
    for command in install_commands(venv):
        if command[1:3] == ["-m", "venv"] and (venv / "bin" / "python").exists():
            continue
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    python = venv / "bin" / "python"
    check = subprocess.run([str(python), str(WORKER), "--versions"], capture_output=True, text=True)
    if check.returncode:
        tail = (check.stderr or check.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"the peers do not import in {venv}: {tail[0]}")
    versions = check.stdout.strip().splitlines()[-1]
    (venv / MARKER).write_text(versions + "\n")
    print(f"peers installed in {venv}: {versions}", flush=True)


def parse_worker_output(stdout: str, side: str, measure: str) -> dict:
    """The last stdout line of a worker as a dict, or ValueError naming the side and measure."""
    lines = [line for line in stdout.strip().splitlines() if line.startswith("{")]
    if not lines:
        raise ValueError(f"{side} worker for {measure!r} printed no JSON line")
    result = json.loads(lines[-1])
    if not isinstance(result.get("seconds"), int | float) or result["seconds"] <= 0:
        raise ValueError(f"{side} worker for {measure!r}: no positive 'seconds' in {lines[-1]}")
    return result


def summarize(
    measure: str, ours: list[dict], theirs: list[dict], *, images=None, peak_gflops=None
) -> dict:
    """The measure's fields of the JSON line from both sides' runs (alternated, paired).

    Args:
        measure: the measure's name.
        ours, theirs: each process's :func:`parse_worker_output` dict, in round order.
        images: images per call (scoring), to add images/s; None for train steps.
        peak_gflops: the machine's float32 matmul GFLOP/s measured in the same run; with ustad's
            FLOP count of a call (``flops_per_call``, the same work on both sides) each side's
            GFLOP/s is set against it.

    Returns:
        ``{"ours": {...}, "theirs": {...}, "ratio": ustad ÷ peer median time,
        "round_ratios": [...], "faster": "ustad" | "peer", "speedup": max ratio⁻¹ or ratio}``.
    """
    if not ours or len(ours) != len(theirs):
        raise ValueError(f"{measure}: need one peer run per ustad run, got {len(ours)} and "
                         f"{len(theirs)}")  # fmt: skip

    def side(runs):
        seconds = statistics.median(r["seconds"] for r in runs)
        out = {
            "seconds": round(seconds, 4),
            "round_seconds": [round(r["seconds"], 4) for r in runs],
            "peak_rss_mb": max(r.get("peak_rss_mb", 0.0) for r in runs),
            "versions": runs[-1].get("versions", {}),
            "threads": runs[-1].get("threads", {}),
        }
        for key in ("strategy",):
            if key in runs[-1]:
                out[key] = runs[-1][key]
        if images:
            out["images_per_s"] = round(images / seconds, 3)
        if flops:
            out["gflops_per_s"] = round(flops / seconds / 1e9, 2)
            if peak_gflops:
                out["fraction_of_matmul_peak"] = round(flops / seconds / 1e9 / peak_gflops, 3)
        return out

    flops = ours[-1].get("flops_per_call")
    mine, peer = side(ours), side(theirs)
    ratio = mine["seconds"] / peer["seconds"]
    return {
        "gflops_per_call": round(flops / 1e9, 2) if flops else None,
        "machine_matmul_gflops_per_s": peak_gflops,
        "ours": mine,
        "theirs": peer,
        "ratio": round(ratio, 3),
        "round_ratios": [
            round(a["seconds"] / b["seconds"], 3) for a, b in zip(ours, theirs, strict=True)
        ],
        "faster": "ustad" if ratio < 1 else "peer",
        "speedup": round(1 / ratio if ratio < 1 else ratio, 3),
    }


# The step measures whose pieces --profile times (same sizes, a "pieces" case on each side).
PROFILES = {"stfpm_step": "stfpm_pieces", "us_step_p65": "us_pieces", "us_step_p33": "us_pieces"}


def summarize_pieces(ours: list[dict], theirs: list[dict], peak_gflops=None) -> dict:
    """Per piece of a step: both sides' median seconds over the rounds, the ratio, and each
    side's GFLOP/s and fraction of the matmul peak where ustad counted the piece's FLOPs."""
    pieces = {}
    for name in ours[0]["pieces"]:
        mine = statistics.median(r["pieces"][name]["seconds"] for r in ours)
        peer = statistics.median(r["pieces"][name]["seconds"] for r in theirs)
        flops = ours[0]["pieces"][name].get("flops")
        piece = {
            "ours_s": round(mine, 4),
            "theirs_s": round(peer, 4),
            "ratio": round(mine / peer, 3),
        }
        if flops:
            piece["gflops"] = round(flops / 1e9, 2)
            piece["ours_gflops_per_s"] = round(flops / mine / 1e9, 1)
            piece["theirs_gflops_per_s"] = round(flops / peer / 1e9, 1)
            if peak_gflops:
                piece["ours_fraction_of_peak"] = round(flops / mine / 1e9 / peak_gflops, 3)
                piece["theirs_fraction_of_peak"] = round(flops / peer / 1e9 / peak_gflops, 3)
        pieces[name] = piece
    return {"machine_matmul_gflops_per_s": peak_gflops, "pieces": pieces}


def run_side(side: str, measure: str, options: dict, python: Path) -> dict:
    case = MEASURES[measure][0] if measure in MEASURES else measure
    if side == "ours":
        command = [sys.executable, "-m", "benchmarks.peers", f"--worker={case}",
                   f"--worker_options={json.dumps(options)}"]  # fmt: skip
    else:
        command = [str(python), str(WORKER), case, json.dumps(options)]
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=FLAGS.timeout_s, env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"{side} worker for {measure} failed (rc {done.returncode}): {tail[0]}")
    return parse_worker_output(done.stdout, side, measure)


def matmul_peak(python: Path) -> float:
    """This machine's float32 matmul GFLOP/s now (XLA, in its own process), for the measures'
    fractions of peak; measured in the same run because a shared machine's load shows in it."""
    options = {"warmup": 1, "repeats": 5}
    result = run_side("ours", "matmul", options, python)
    return round(result["flops_per_call"] / result["seconds"] / 1e9, 1)


def check_port(python: Path) -> None:
    """The PyTorch Uninformed Students port against ustad on the same weights and images: one
    JSON line per p with the largest difference of the dense descriptors; exits non-zero when
    it exceeds 1e-4 (float32 rounding of the same computation stays far below)."""
    import tempfile

    worst = 0.0
    with tempfile.TemporaryDirectory() as folder:
        for p in (33, 65):
            options = {"patch_size": p, "image_size": 40, "path": f"{folder}/p{p}.npz"}
            command = [sys.executable, "-m", "benchmarks.peers", "--worker=write_port_check",
                       f"--worker_options={json.dumps(options)}"]  # fmt: skip
            subprocess.run(command, check=True, capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
            done = subprocess.run(
                [str(python), str(WORKER), "check_port", json.dumps(options)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            result = json.loads(done.stdout.strip().splitlines()[-1])
            worst = max(worst, result["max_abs_diff"])
            print(json.dumps({"benchmark": "peers_port_check", "p": p, **result}), flush=True)
    if worst > 1e-4:
        raise SystemExit(f"the PyTorch port differs from ustad by {worst:.3g} (> 1e-4)")


def git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv):
    del argv
    if FLAGS.worker:
        from benchmarks import peers_jax

        options = json.loads(FLAGS.worker_options)
        if FLAGS.worker == "write_port_check":
            print(json.dumps(peers_jax.write_port_check(options)))
        else:
            print(json.dumps(peers_jax.run(FLAGS.worker, options)))
        return
    venv = venv_path(FLAGS.venv)
    if FLAGS.install:
        install(venv)
        return
    python = peer_python(venv)
    if FLAGS.check_port:
        check_port(python)
        return
    names = FLAGS.measures or list(MEASURES)
    unknown = [n for n in names if n not in MEASURES]
    if unknown:
        raise SystemExit(f"unknown --measures {unknown}; choose from {', '.join(MEASURES)}")
    from benchmarks.common import device_name

    device = device_name()
    threads = FLAGS.threads or os.cpu_count() or 1
    peak = matmul_peak(python)
    if FLAGS.profile:
        names = [n for n in names if n in PROFILES]
    for name in names:
        case, sizes, what = MEASURES[name]
        options = dict(sizes, warmup=1, repeats=FLAGS.repeats, threads=threads)
        ours, theirs = [], []
        for _ in range(FLAGS.rounds):
            case_or_name = PROFILES[name] if FLAGS.profile else name
            ours.append(run_side("ours", case_or_name, options, python))
            theirs.append(run_side("theirs", case_or_name, options, python))
        if FLAGS.profile:
            summary = summarize_pieces(ours, theirs, peak)
            what = f"pieces of: {what}"
        else:
            summary = summarize(name, ours, theirs, images=sizes.get("images"), peak_gflops=peak)
        record = {
            "benchmark": "peers_profile" if FLAGS.profile else "peers",
            "measure": name,
            "what": what,
            "unit": "s per call (images/s = images ÷ s)" if "images" in sizes else "s per step",
            "device": device,
            "sizes": sizes,
            "rounds": FLAGS.rounds,
            "repeats": FLAGS.repeats,
            "commit": git_commit(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **summary,
        }
        line = json.dumps(record)
        print(line, flush=True)
        if FLAGS.out:
            with open(FLAGS.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    app.run(main)
