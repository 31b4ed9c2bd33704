#!/usr/bin/env bash
# The whole test suite from a fresh machine: install what the tests need (into .venv), start the real
# servers (Kafka, Redis, Prometheus, Temporal), run ruff, mypy and pytest, stop the servers.
# Extra arguments go to pytest (e.g. scripts/test.sh -k agent -x).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e '.[test]'
bash scripts/install-services.sh

trap 'bash scripts/services.sh stop all' EXIT
bash scripts/services.sh start all

ruff check .
mypy
# pytest exits 5 when it collected nothing; with set -e that fails the run, as it should.
python -m pytest "$@"
echo "scripts/test.sh: done in $(( $(date +%s) - started ))s"
