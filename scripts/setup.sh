#!/usr/bin/env bash
# Set up DynaServe on a fresh machine: a virtual environment in .venv with the project, its test tools
# and NIXL. Idempotent: a re-run with an unchanged pyproject.toml only checks the install.
#   scripts/setup.sh            CPU machine (the simulated engine; NIXL over UCX on DRAM)
#   scripts/setup.sh --quiet    the same, less output (used by scripts/test.sh)
# GPU clusters: see README.md, "Production install".
set -euo pipefail
cd "$(dirname "$0")/.."
QUIET=0
[ "${1:-}" = "--quiet" ] && QUIET=1
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.dynaserve-setup
say() { [ "$QUIET" = 1 ] || echo "[setup] $*" >&2; }
pipq() { if [ "$QUIET" = 1 ]; then "$VENV/bin/pip" -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; else "$VENV/bin/pip" "$@"; fi; }

want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
  "$VENV/bin/python" -c "import dynaserve, zmq, msgpack, nixl._api" 2>/dev/null && { say "up to date"; exit 0; }
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
echo "$want" > "$STAMP"
say "done: $("$VENV/bin/python" -c 'import zmq, nixl; print("pyzmq", zmq.__version__, "| libzmq", zmq.zmq_version())')"
