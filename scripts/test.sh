#!/usr/bin/env bash
# Installs what the tests need (scripts/bootstrap.sh) and runs the whole suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k margins`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
