#!/usr/bin/env bash
# The project's test command (README: `make test`). Creates or reuses .venv, installs the project
# with its test extra when pyproject.toml changed, then runs ruff, mypy and pytest.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m slow` or `scripts/test.sh tests/secu`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

echo "== system packages the tests use"
if ! bash scripts/ensure_chromium.sh; then
  # Only the report rendering test needs it; in CI it must be there.
  if [ "${CI:-}" = "true" ]; then exit 1; fi
fi

echo "== ruff"
"$VENV/bin/ruff" check .
echo "== mypy (secu, pipelines, jobs)"
"$VENV/bin/mypy" secu pipelines jobs
echo "== pytest"
"$VENV/bin/pytest" "$@"
