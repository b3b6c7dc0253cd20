#!/usr/bin/env bash
# Install everything hybrid needs on a Debian 12 machine, into .venv at the repository root.
# Idempotent: run it again after a pull. Needs root (apt-get, /lib/modules).
set -o errexit -o nounset -o pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv"

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: sudo ./scripts/setup.sh"
command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian 12 (bookworm)"

# --- Debian packages --------------------------------------------------------------------------
# python3-bpfcc: bcc for Debian's /usr/bin/python3 (the PyPI "bcc" is unrelated)
# linux-headers-amd64: bcc compiles against kernel headers at run time
# libnetfilter-queue-dev, python3-dev, gcc: NetfilterQueue is built from source by pip
# iptables, iproute2, util-linux (nsenter), conntrack: netfilter and netlink plumbing
# iperf3, nginx-light, wrk, curl, iputils-ping: the lab's clients and servers and the benchmarks
# dnsmasq-base, openssl, dnsutils: the lab's DNS server (dnsmasq without a system service), the
#   throwaway certificate for its HTTPS server, and dig as DNS client (hybrid/lab/servers.py)
# systemd, libseccomp2: systemd-analyze checks the unit's sandbox offline, and the tests rebuild that
#   sandbox with libseccomp (tests/unitsandbox.py); no systemd needs to run
# crowdsec, crowdsec-firewall-bouncer, ipset: a real CrowdSec Local API for the fleet tests (each runs
#   its own instance, hybrid/lab/crowdsec.py) and CrowdSec's own bouncer for the comparison
#   (hybrid/lab/fwcompare.py; its iptables mode, the one that drops forwarded traffic, needs ipset)
# tshark (with wireshark-common's dumpcap and mergecap): the lab recorder captures the gateway's
#   links with dumpcap (hybrid/lab/record.py), and Wireshark's dissectors are the independent oracle
#   for the names hybrid reads (hybrid/lab/tshark.py)
packages=(
  python3 python3-venv python3-dev python3-bpfcc gcc
  linux-headers-amd64 libnetfilter-queue-dev
  iptables iproute2 util-linux conntrack ethtool
  iperf3 nginx-light wrk curl iputils-ping
  dnsmasq-base openssl dnsutils
  systemd libseccomp2
  crowdsec crowdsec-firewall-bouncer ipset
  tshark
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
# crowdsec's post-install step registers with CrowdSec's Central API unless its credentials file
# already exists and is non-empty; that registration needs the internet and fails the install
# without it. hybrid needs only the Local API, so the file says so before the package is configured.
capi=/etc/crowdsec/online_api_credentials.yaml
if [ ! -s "$capi" ]; then
  mkdir -p /etc/crowdsec
  printf '# No Central API on this machine (hybrid scripts/setup.sh): delete this file and run\n# "cscli capi register" to join it.\n' > "$capi"
fi
# An earlier crowdsec install that failed at that registration is finished now (apt-get refuses
# to run while a package is left half-configured).
if dpkg --audit 2>/dev/null | grep -q crowdsec; then dpkg --configure -a >/dev/null; fi
# wireshark-common asks whether users outside root may capture (a setuid dumpcap and a wireshark
# group); only root captures here, so the answer is no, given before the package asks.
if command -v debconf-set-selections >/dev/null; then
  echo 'wireshark-common wireshark-common/install-setuid boolean false' | debconf-set-selections
fi
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The packages enable CrowdSec's services: the tests run their own Local API, and the stock
  # bouncer would add firewall rules of its own. Stopped and disabled here (no-op without systemd).
  for unit in crowdsec crowdsec-firewall-bouncer; do
    case " ${missing[*]} " in *" $unit "*)
      command -v systemctl >/dev/null && systemctl disable --now "$unit" >/dev/null 2>&1 || true ;;
    esac
  done
else
  say "Debian packages already installed"
fi
# nginx-light's postinst starts a server on :80 of the root namespace; the lab runs its own.
if command -v systemctl >/dev/null && systemctl is-active --quiet nginx 2>/dev/null; then
  systemctl disable --now nginx >/dev/null 2>&1 || true
elif [ -f /run/nginx.pid ]; then
  nginx -s quit 2>/dev/null || true
fi

# --- Kernel headers for bcc ---------------------------------------------------------------------
# bcc looks in /lib/modules/$(uname -r)/{build,source}. When no headers package matches the running
# kernel (this reference VM runs a custom 6.18), point both at Debian's generic headers: the
# arch tree (build) and the common tree (source). BCC_KERNEL_SOURCE cannot express that split.
kver=$(uname -r)
mod="/lib/modules/$kver"
if [ -e "$mod/build/include/generated/autoconf.h" ] || [ -e "$mod/build/include/linux/kconfig.h" ]; then
  say "kernel headers for $kver: $(readlink -f "$mod/build")"
else
  if apt-get install -y -qq --no-install-recommends "linux-headers-$kver" >/dev/null 2>&1; then
    say "installed linux-headers-$kver"
  else
    arch_tree=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
    [ -n "$arch_tree" ] || die "no /usr/src/linux-headers-*-amd64 tree: apt-get install linux-headers-amd64"
    common_tree="${arch_tree%-amd64}-common"
    [ -d "$common_tree" ] || die "$common_tree missing: apt-get install --reinstall linux-headers-amd64"
    mkdir -p "$mod"
    ln -sfn "$arch_tree" "$mod/build"
    ln -sfn "$common_tree" "$mod/source"
    say "no headers package for $kver: linked $mod/build -> $arch_tree, source -> $common_tree"
  fi
fi

# --- Python virtual environment ------------------------------------------------------------------
# Debian's interpreter, because python3-bpfcc is built for it; --system-site-packages so the venv
# sees bcc from /usr/lib/python3/dist-packages.
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import sys; sys.exit(sys.base_prefix != "/usr")' 2>/dev/null; then
  rm -rf "$venv"
  say "creating $venv (Debian's /usr/bin/python3, with system site-packages for bcc)"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
say "installing hybrid and its Python dependencies into $venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade "pip>=23" >/dev/null
# PYTHONWARNINGS: silence setuptools' editable-install banner (warnings only; errors still show)
PYTHONWARNINGS=ignore "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$repo[test,bench]"

# --- Smoke check: every import the tool needs -----------------------------------------------------
"$venv/bin/python" - <<'PY' || die "the virtual environment is incomplete (see the error above)"
import bcc, netfilterqueue, pyroute2, click, hybrid, hybrid.cli.main  # noqa: F401
PY
say "done. Check the machine with: sudo $venv/bin/hybridctl doctor"
