#!/usr/bin/env bash
# Run the whole test suite: unit tests and real-kernel integration tests (root, namespaces).
# Extra arguments go to pytest, e.g.  sudo ./scripts/test.sh -m unit  or  -k lab
set -o errexit -o nounset -o pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py="$repo/.venv/bin/python"
[ -x "$py" ] || { echo "test: no .venv: run sudo ./scripts/setup.sh first" >&2; exit 1; }
[ "$(id -u)" = 0 ] || echo "test: not root: integration tests will be skipped (run with sudo)" >&2

cd "$repo"
exec "$py" -m pytest -W error -ra --durations=15 "$@"
