#!/usr/bin/env bash
# The test command: installs what it needs, then lint, types, import layering and the tests.
# Extra arguments go to pytest (e.g. ./test.sh -k cli -x).
set -euo pipefail
cd "$(dirname "$0")"
. .ci/bootstrap.sh
comb_bootstrap test
bin="$comb_venv/bin"
"$bin/ruff" format --check .
"$bin/ruff" check .
"$bin/mypy" catalog stages pipeline drive bench tests
"$bin/lint-imports" --no-cache  # the layering contracts in pyproject.toml (ARCHITECTURE.md)
exec "$bin/pytest" "$@"
