#!/usr/bin/env bash
# The CrowdSec measurements of docs/crowdsec.md, in one run (root; ~10 minutes; --quick: ~2):
#   propagation (cscli decisions add -> first packet dropped), gateway A's shared block -> gateway B's
#   kernel, 100,000 decisions under a TCP stream (hybrid.lab.fleetbench), and a flood from a banned
#   prefix against hybrid's bouncer and CrowdSec's own firewall bouncer (hybrid.lab.fwcompare).
# Everything runs in lab namespaces on 198.18.0.0/15 and is removed at the end. Results: JSON files
# in the directory given by --out (default: the current directory).
set -o errexit -o nounset -o pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py="$repo/.venv/bin/python"
[ -x "$py" ] || { echo "crowdsec-bench: no .venv: run sudo ./scripts/setup.sh first" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "crowdsec-bench: run as root (lab namespaces): sudo $0" >&2; exit 1; }
quick=() out=.
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=(--quick) ;;
    --out) out=$2; shift ;;
    *) echo "crowdsec-bench: unknown option $1 (use --quick, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out"
"$py" -m hybrid.lab.fleetbench "${quick[@]}" --json "$out/crowdsec-fleet.json"
"$py" -m hybrid.lab.fwcompare "${quick[@]}" --json "$out/crowdsec-flood.json"
