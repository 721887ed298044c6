#!/usr/bin/env bash
# Install everything the test suite needs, then run it. The README's test command; CI calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first, pinned: the local CPU wheel. An unpinned torch would pull GBs of CUDA packages.
$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[tests]"
set +e
$PY -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$rc"
