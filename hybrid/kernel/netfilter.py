"""The netfilter side: one dedicated chain that sends BPF-marked packets to NFQUEUE.

::

    -A FORWARD -m comment --comment hybrid -j HYBRID                  (inserted first)
    -A HYBRID -m mark --mark 0x1000000/0x1000000
              -m conntrack --ctstate INVALID,NEW,RELATED,ESTABLISHED,UNTRACKED
              -m comment --comment "hybrid: flagged by BPF"
              -j NFQUEUE --queue-num 0 --queue-bypass                 (or --queue-balance a:b)

Why this shape:
- An NFQUEUE verdict ends the packet's trip through the chain, so the queue rule sits in its own
  chain jumped to first; unmarked packets fall through to the user's rules untouched. The engine
  accepts with NF_REPEAT after clearing the mark bit, so an accepted packet traverses the user's
  ruleset from the top (it is not waved past the user's own DROP rules).
- ``--queue-bypass``: when no engine is bound, marked packets pass (fail-open). Without it
  (fail-closed) they are dropped while the engine is away.
- Install and removal are each one ``iptables-restore --noflush`` transaction per family, computed
  from the current ruleset: re-installing replaces our chain and our jumps, never duplicates them,
  and never touches a rule that is not ours (every one of ours carries a "hybrid" comment).

Fragments, and why the queue rule matches every conntrack state:
- The BPF programs mark every IP fragment (a non-first fragment has no ports to classify by), and
  the engine must see the whole datagram: a DNS name or an HTTP Host in a later fragment is
  invisible in the first. Netfilter's defragmentation (nf_defrag_ipv4/ipv6, PREROUTING priority
  -400) reassembles before FORWARD and INPUT, but with conntrack built in, a network namespace
  only registers those hooks once something *in that namespace* uses conntrack
  (``nf_ct_netns_get``: a conntrack/state match, a CT target, NAT). A gateway namespace that uses
  none of these forwards the fragments one by one (measured in the lab: a DNS query whose name sat
  in the second fragment reached dnsmasq through hybrid blocking that name). IPv4 INPUT is the
  one case the stack reassembles by itself (before the INPUT hook); IPv6 INPUT is not.
- So the queue rule carries a conntrack match that every packet satisfies (a packet is in exactly
  one of INVALID, NEW, RELATED, ESTABLISHED, UNTRACKED; SNAT/DNAT are extra bits beside those).
  Its only purpose is to hold a conntrack reference for the namespace while the rule exists: the
  defrag hooks come with the rule in the same transaction and go when the chain goes. On the
  queue rule, after the mark match, it is evaluated only for marked packets; a rule of its own in
  the chain would cost one more rule for every packet that enters the chain, and could be
  deleted alone, leaving a queue rule that no longer sees whole datagrams. If the kernel has no
  conntrack, installing fails with iptables' own message instead of queueing fragments.
- What it costs: conntrack is now on for *every* packet of the namespace, not only the marked
  ones, in both families and every hook (it cannot be turned on for the queue rule alone): one
  table lookup per packet, one entry (a few hundred bytes) per flow, and at
  ``net.netfilter.nf_conntrack_max`` entries new flows are dropped ("table full") on a busy
  gateway: size it for the gateway's flows. Datagrams are reassembled at the gateway and
  re-fragmented on the way out, and overlapping fragments are dropped at the gateway rather than
  at the endpoint. Conntrack never drops INVALID packets by itself (the user's rules may). The
  throughput cost measured in the lab (one iperf3 TCP stream through the gateway, paired runs
  with and without a conntrack rule): see the comment at DEFRAG_MATCH.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from hybrid.errors import ConfigError, HybridError
from hybrid.kernel import sysutil

log = logging.getLogger(__name__)

CHAIN = "HYBRID"
COMMENT = "hybrid"
HOOKS = {"forward": "FORWARD", "input": "INPUT"}
FAMILIES = {"ipv4": ("iptables-save", "iptables-restore"), "ipv6": ("ip6tables-save", "ip6tables-restore")}
LOCK_WAIT = "5"  # seconds iptables-restore waits for the xtables lock held by another tool
# Every conntrack state: a match no packet fails, there to make the namespace reassemble
# fragments before the queue rule (see the module's docstring). Its cost, measured in the lab (2
# cores shared with other work, veth, one iperf3 TCP stream client -> server through the gateway,
# the HYBRID chain with and without this match and nothing marked, so only conntrack differs;
# paired 5 s runs in alternating order): median ratio with/without 1.05 over 18 pairs, pairs from
# 0.49 to 1.90; 64-byte UDP (iperf3 -u -b 0 -l 64, 8 pairs of 4 s): median 0.97, 0.63 to 1.13.
# Below what that machine resolves, so no more than "not large" for one stream of GSO packets;
# a gateway with many short flows pays conntrack per flow too (entries, nf_conntrack_max).
DEFRAG_MATCH = "-m conntrack --ctstate INVALID,NEW,RELATED,ESTABLISHED,UNTRACKED"


@dataclass(frozen=True)
class QueueRule:
    """What the chain installs; everything the user can choose about the netfilter side."""

    mark_value: int
    mark_mask: int
    queue_first: int = 0
    queue_last: int = 0          # > queue_first: --queue-balance first:last
    fail_open: bool = True       # --queue-bypass
    cpu_fanout: bool = False     # --queue-cpu-fanout: pick the queue by CPU, not by address hash
    hooks: tuple[str, ...] = ("forward",)
    families: tuple[str, ...] = ("ipv4", "ipv6")

    def __post_init__(self):
        if not 0 <= self.queue_first <= self.queue_last <= 65535:
            raise ConfigError(f"queues {self.queue_first}-{self.queue_last}: need 0 <= first <= last <= 65535")
        if self.mark_mask == 0 or self.mark_value & ~self.mark_mask:
            raise ConfigError(f"mark 0x{self.mark_value:x}/0x{self.mark_mask:x}: the mask must be non-zero "
                              "and contain every bit of the mark")
        if self.cpu_fanout and self.queue_last == self.queue_first:
            raise ConfigError("queue-cpu-fanout spreads packets over a range of queues: give --queues A-B too")
        for h in self.hooks:
            if h not in HOOKS:
                raise ConfigError(f"hook {h!r}: use one of {', '.join(HOOKS)}")
        for f in self.families:
            if f not in FAMILIES:
                raise ConfigError(f"family {f!r}: use ipv4 and/or ipv6")

    def queue_target(self) -> str:
        if self.queue_last > self.queue_first:
            target = f"NFQUEUE --queue-balance {self.queue_first}:{self.queue_last}"
        else:
            target = f"NFQUEUE --queue-num {self.queue_first}"
        return target + (" --queue-bypass" if self.fail_open else "") + (" --queue-cpu-fanout" if self.cpu_fanout else "")


def install_text(rule: QueueRule, current_save: str) -> str:
    """iptables-restore input that (re)installs our chain and jumps atomically."""
    lines = ["*filter", f":{CHAIN} - [0:0]"]  # declaring a chain with --noflush empties it
    lines.append(f"-A {CHAIN} -m mark --mark 0x{rule.mark_value:x}/0x{rule.mark_mask:x} {DEFRAG_MATCH} "
                 f'-m comment --comment "{COMMENT}: flagged by BPF" -j {rule.queue_target()}')
    lines += [_delete(r) for r in our_jumps(current_save)]
    for hook in rule.hooks:
        lines.append(f"-I {HOOKS[hook]} 1 -m comment --comment {COMMENT} -j {CHAIN}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def remove_text(current_save: str) -> str | None:
    """iptables-restore input that removes every jump to our chain and the chain; None when
    there is nothing of ours."""
    jumps = our_jumps(current_save)
    has_chain = re.search(rf"^:{CHAIN} ", current_save, re.M) is not None
    if not jumps and not has_chain:
        return None
    lines = ["*filter", *(_delete(r) for r in jumps)]
    if has_chain:
        lines += [f"-F {CHAIN}", f"-X {CHAIN}"]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def our_jumps(save: str) -> list[str]:
    """Rules (as iptables-save prints them) in the built-in chains that jump to our chain."""
    out = []
    for line in _filter_table(save):
        line = _strip_counters(line)
        if (line.startswith("-A ") and re.search(rf"-j {CHAIN}(\s|$)", line)
                and not line.startswith(f"-A {CHAIN} ") and f"--comment {COMMENT} " in line):
            out.append(line)   # a jump without our comment is someone else's: never touch it
    return out


def _delete(rule: str) -> str:
    return "-D" + rule[2:]


def _strip_counters(line: str) -> str:
    return re.sub(r"^\[\d+:\d+\]\s+", "", line)


def _filter_table(save: str) -> Iterable[str]:
    in_filter = False
    for line in save.splitlines():
        if line.startswith("*"):
            in_filter = line.strip() == "*filter"
        elif in_filter:
            yield line


def _save(family: str, netns: str | None, counters: bool = False) -> str:
    save_cmd = FAMILIES[family][0]
    argv = [save_cmd, "-t", "filter"] + (["-c"] if counters else [])
    return sysutil.run(argv, netns=netns, what=f"{save_cmd}").stdout


def _restore(family: str, text: str, netns: str | None, action: str) -> None:
    restore_cmd = FAMILIES[family][1]
    log.debug("%s <<\n%s", restore_cmd, text)
    sysutil.run([restore_cmd, "--noflush", "-w", LOCK_WAIT], input=text, netns=netns,
                what=f"{action} the {family} netfilter rules ({restore_cmd})")


def install(rule: QueueRule, netns: str | None = None) -> None:
    """Install or replace the chain and jumps in every family. A family that fails after an
    earlier one succeeded rolls the earlier one back."""
    done: list[str] = []
    try:
        for family in rule.families:
            _restore(family, install_text(rule, _save(family, netns)), netns, "installing")
            done.append(family)
    except BaseException:
        remove(done, netns)
        raise


def remove(families: Sequence[str] = tuple(FAMILIES), netns: str | None = None) -> list[str]:
    """Remove our chain and jumps. Idempotent; returns the families that had something of ours."""
    removed = []
    for family in families:
        try:
            save = _save(family, netns)
        except sysutil.ToolMissingError:
            continue
        text = remove_text(save)
        if text:
            _restore(family, text, netns, "removing")
            removed.append(family)
    return removed


@dataclass
class ChainStatus:
    family: str
    installed: bool
    hooks: list[str] = field(default_factory=list)
    queued_packets: int = 0   # packets that matched the queue rule (queued, or bypassed if no engine)
    queued_bytes: int = 0
    rule: str = ""
    reassembles: bool = False  # the queue rule uses conntrack, so the namespace defragments before it


_RULE_COUNTERS = re.compile(r"^\[(\d+):(\d+)\]\s+(-A " + CHAIN + r" .*)$")


def status(families: Sequence[str] = tuple(FAMILIES), netns: str | None = None) -> list[ChainStatus]:
    out = []
    for family in families:
        try:
            save = _save(family, netns, counters=True)
        except sysutil.ToolMissingError:
            continue
        st = ChainStatus(family, installed=re.search(rf"^:{CHAIN} ", save, re.M) is not None)
        for line in _filter_table(save):
            m = _RULE_COUNTERS.match(line)
            if m and "NFQUEUE" in m.group(3):
                st.queued_packets += int(m.group(1))
                st.queued_bytes += int(m.group(2))
                st.rule = m.group(3)
                st.reassembles = "--ctstate" in st.rule
        for jump in our_jumps(save):
            hook = jump.split()[1]
            st.hooks.append(next((k for k, v in HOOKS.items() if v == hook), hook))
        out.append(st)
    return out


def leftovers(netns: str | None = None) -> list[str]:
    """Every rule line mentioning hybrid in the filter tables (for leak checks and doctor)."""
    found = []
    for family in FAMILIES:
        try:
            save = _save(family, netns)
        except HybridError:
            continue
        found += [f"{family}: {ln}" for ln in save.splitlines() if COMMENT in ln.lower() and not ln.startswith("#")]
    if bridge_installed(netns):
        found.append(f"bridge: table bridge {BRIDGE_TABLE}")
    return found


# -- bridge mode: what br_netfilter cannot queue ---------------------------------------------------
# br_netfilter hands iptables untagged IPv4/IPv6 and, with bridge-nf-filter-vlan-tagged, IP under
# one VLAN tag; an IP packet under two tags (802.1ad or 802.1Q over 802.1Q) crosses the bridge
# without meeting any iptables hook. hybrid's programs parse two tags and flag such packets like
# any other, and every Linux receiver takes a 0/0 double tag as untagged (measured in the bridge
# lab: a payload the rules drop reached the server). So in bridge mode a flagged frame whose
# first tag does not carry IP directly is dropped in the bridge's own forward hook, where nothing
# can inspect it: a QinQ trunk is not inspectable through br_netfilter, and is refused rather than
# waved through. Frames the engine accepted have the flag cleared; single-tagged and untagged IP
# never match (they were queued, or passed by --queue-bypass as the policy says).
BRIDGE_TABLE = "hybrid"
_NFT_GONE = f"table bridge {BRIDGE_TABLE} {{}}\ndelete table bridge {BRIDGE_TABLE}\n"   # idempotent removal


def bridge_table_text(mark_value: int, mark_mask: int) -> str:
    return _NFT_GONE + (
        f"table bridge {BRIDGE_TABLE} {{\n"
        "  chain forward {\n"
        "    type filter hook forward priority 0; policy accept;\n"
        f"    meta mark & 0x{mark_mask:x} == 0x{mark_value:x} @ll,96,16 {{ 0x8100, 0x88a8 }} "
        "@ll,128,16 != { 0x0800, 0x86dd } counter drop "
        f'comment "{COMMENT}: flagged, two VLAN tags: br_netfilter cannot queue it"\n'
        "  }\n}\n")


def bridge_install(mark_value: int, mark_mask: int, netns: str | None = None) -> None:
    """Install (or replace, atomically) the bridge table that drops flagged frames br_netfilter
    cannot queue."""
    sysutil.run(["nft", "-f", "-"], input=bridge_table_text(mark_value, mark_mask), netns=netns,
                what="installing hybrid's bridge table (nft)")


def bridge_installed(netns: str | None = None) -> bool:
    try:
        proc = sysutil.run(["nft", "list", "table", "bridge", BRIDGE_TABLE], netns=netns, check=False)
    except sysutil.ToolMissingError:
        return False
    return proc.returncode == 0


def bridge_remove(netns: str | None = None) -> bool:
    """Remove the bridge table; whether there was one. Idempotent (nothing without nft)."""
    if not bridge_installed(netns):
        return False
    sysutil.run(["nft", "-f", "-"], input=_NFT_GONE, netns=netns, what="removing hybrid's bridge table (nft)")
    return True


def bridge_dropped(netns: str | None = None) -> int | None:
    """Frames the bridge table dropped (None when it is not installed)."""
    try:
        proc = sysutil.run(["nft", "list", "table", "bridge", BRIDGE_TABLE], netns=netns, check=False)
    except sysutil.ToolMissingError:
        return None
    if proc.returncode != 0:
        return None
    m = re.search(r"counter packets (\d+)", proc.stdout)
    return int(m.group(1)) if m else 0
