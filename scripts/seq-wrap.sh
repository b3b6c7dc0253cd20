#!/bin/bash
# One iperf3 stream through the lab gateway with hybrid attached and no engine bound, then the
# packets tc flagged (issue 14 item 5: a flow without a verdict must not be queued again each
# time its 32-bit sequence numbers wrap). Usage: sudo scripts/seq-wrap.sh [SECONDS]
# Creates its own lab and removes it (and the attachment, and iperf3) on exit, also on failure.
set -o nounset -o pipefail
H=${HYBRIDCTL:-hybridctl}
seconds=${1:-10}
out=$(mktemp -d)
cleanup() {
  $H lab exec gw -- $H detach --all >/dev/null 2>&1
  $H lab exec server -- pkill -x iperf3 >/dev/null 2>&1
  $H lab down >/dev/null 2>&1
  rm -rf "$out"
}
trap cleanup EXIT
$H lab up >/dev/null || exit 1
$H lab exec server -- iperf3 -s -D -1 >/dev/null || exit 1
sleep 0.5
$H lab exec gw -- $H attach to-client to-server --xdp-mode generic >/dev/null || exit 1
$H lab exec client -- iperf3 -c 198.18.2.2 -t "$seconds" -J >"$out/iperf.json" || exit 1
$H lab exec gw -- $H status --json >"$out/status.json" || exit 1
python3 - "$out" <<'PY'
import json, sys
d = sys.argv[1]
st, ip = json.load(open(f"{d}/status.json")), json.load(open(f"{d}/iperf.json"))
tot = {}
for e in st["interfaces"].values():
    for k, v in e["counters"].items():
        tot[k] = tot.get(k, 0) + v
sent = ip["end"]["sum_sent"]["bytes"]
print(f"{sent / 1e9:.1f} GB ({sent / 2**32:.1f} sequence wraps) in {tot['packets']:,} packets: "
      f"{tot['flagged']} flagged ({tot.get('reason_first_n', 0)} first-n)")
PY
