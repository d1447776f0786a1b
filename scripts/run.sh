#!/usr/bin/env bash
# The main job: set up (if needed), start a local cluster (broker + vLLM workers on the tiny local model, or
# simulated-GPU workers without the vLLM stack; KV handoffs over
# NIXL), replay real Azure conversation traffic through the client SDK, print the report, write the raw
# records and plots to results/demo/, and stop the cluster. Extra arguments go to scripts/cluster.py start,
# e.g. scripts/run.sh --workers 4 --policy colocate --limit 500 --rate 6
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python scripts/cluster.py start --replay azure_conv --limit 200 --rate 4 --out results/demo "$@"
