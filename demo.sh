#!/usr/bin/env bash
# The demo: installs what it needs, then backs up a sample disk through the Ray pipeline,
# changes it, backs up incrementally, restores, verifies and queries the catalog.
# Extra arguments go to `comb demo` (e.g. ./demo.sh --engine local --size-mib 256).
set -euo pipefail
cd "$(dirname "$0")"
. .ci/bootstrap.sh
comb_bootstrap ""
exec "$comb_venv/bin/comb" demo "$@"
