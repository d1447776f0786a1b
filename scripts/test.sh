#!/usr/bin/env bash
# Set up (if needed) and run the test suite: lint, unit tests, integration tests with real processes.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/unit -k protocol
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --quiet
export UCX_NET_DEVICES=${UCX_NET_DEVICES:-lo}
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
