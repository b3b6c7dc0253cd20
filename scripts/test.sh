#!/usr/bin/env bash
# Run the whole test suite: unit tests and real-kernel integration tests (root, namespaces).
# Extra arguments go to pytest, e.g.  sudo ./scripts/test.sh -m unit  or  -k lab  (one session).
#
# With no arguments the suite runs as HYBRID_TEST_SHARDS concurrent pytest sessions (default 2),
# each with a share of the test modules (tests/conftest.py, "shards"): the integration tests wait
# more than they compute, and one session left a 2-core machine mostly idle. Every session names
# what it creates after itself and checks its own leaks. The first session prints as it goes,
# the others when they end; the exit status is non-zero when any session failed.
set -o errexit -o nounset -o pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py="$repo/.venv/bin/python"
[ -x "$py" ] || { echo "test: no .venv: run sudo ./scripts/setup.sh first" >&2; exit 1; }
[ "$(id -u)" = 0 ] || echo "test: not root: integration tests will be skipped (run with sudo)" >&2

cd "$repo"
shards=${HYBRID_TEST_SHARDS:-2}
if [ "$#" -gt 0 ] || [ "$shards" -le 1 ]; then
  exec "$py" -m pytest -W error -ra --durations=15 "$@"
fi

work=$(mktemp -d -t hybrid-tests-XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# One BPF compile cache for every session (hybrid.datapath.objcache writes entries atomically).
export HYBRID_BPF_CACHE="$work/bpf-cache"
mkdir -p "$HYBRID_BPF_CACHE"
# A background job of a non-interactive shell starts with SIGINT and SIGQUIT ignored, and so would every
# process the tests start (a hybridctl that must stop on Ctrl-C, tested): undo that before pytest.
session=("$py" -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); signal.signal(signal.SIGQUIT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])'
         "$py" -m pytest -W error -ra --durations=15 -p no:cacheprovider)
for i in $(seq 1 "$shards"); do
  if [ "$i" = 1 ]; then
    HYBRID_TEST_SHARD="$i/$shards" "${session[@]}" &
  else
    HYBRID_TEST_SHARD="$i/$shards" "${session[@]}" >"$work/shard-$i.log" 2>&1 &
  fi
  pids+=("$!")
done
status=0
for i in $(seq 1 "$shards"); do
  wait "${pids[$((i - 1))]}" || status=1
done
pids=()
for i in $(seq 2 "$shards"); do
  echo
  echo "==================== test session $i of $shards ===================="
  cat "$work/shard-$i.log"
done
echo
if [ "$status" = 0 ]; then echo "test: all $shards sessions passed"; else echo "test: a session failed (see above)"; fi
exit "$status"
