"""hybrid inline on a transparent bridge (issue 16): the bridge lab's gateway bridges client and
server (br0, ports to-client and to-server, one subnet, no address on the gateway), and
``hybridctl attach br0`` inspects what crosses it. Real clients and servers, IPv4 and IPv6: nginx
(HTTP Host, TLS SNI) with curl, dnsmasq with dig, iperf3, and frames crafted with scapy for the
VLAN cases. The servers are the oracle: a blocked request must never be answered, an allowed one
must be."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from gwlab import HYBRIDCTL, Engine, engine_stats, hctl, kernel_counters, start_engine, status, wait_for

from hybrid.kernel import netfilter
from hybrid.lab.servers import Dns, Nginx, UdpSink, iperf3, udp_send_from_client
from hybrid.lab.topology import netns

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REALISTIC = os.path.join(ROOT, "examples", "rules", "realistic.toml")
with open(REALISTIC) as _f:
    REALISTIC_TEXT = _f.read()
PORTS = ["to-client", "to-server"]
SYSCTLS = ["net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables",
           "net.bridge.bridge-nf-filter-vlan-tagged"]


# -- helpers ---------------------------------------------------------------------------------------
def sysctls(lab) -> dict[str, str]:
    out = lab.run("gw", ["sysctl", "-n", *SYSCTLS]).stdout.split()
    return dict(zip(SYSCTLS, out, strict=True))


def set_sysctls(lab, value: str) -> None:
    lab.run("gw", ["sysctl", "-q", "-w", *(f"{n}={value}" for n in SYSCTLS)])


def nothing_left(lab) -> list[str]:
    """Every trace of hybrid in the gateway namespace and on the bpffs; [] when clean."""
    from hybrid.kernel import bpffs
    left = []
    links = json.loads(lab.run("gw", ["ip", "-j", "link", "show"]).stdout)
    left += [f"xdp on {link['ifname']}" for link in links if "xdp" in link]
    for ifname in PORTS:
        if lab.run("gw", ["tc", "filter", "show", "dev", ifname, "ingress"], check=False).stdout.strip():
            left.append(f"tc filter on {ifname}")
        if "clsact" in lab.run("gw", ["tc", "qdisc", "show", "dev", ifname]).stdout:
            left.append(f"clsact on {ifname}")
    left += netfilter.leftovers(lab.netns("gw"))
    base = bpffs.locate()
    if base and os.path.exists(os.path.join(base, lab.netns("gw"))):
        left.append("pin directory")
    if os.path.exists(f"/run/hybrid/instances/{lab.netns('gw')}"):
        left.append("state directory")
    left += [f"process {p} in the gateway" for p in gw_pids(lab)]
    return left


def gw_pids(lab) -> list[str]:
    """Processes in the gateway namespace (asked from outside it)."""
    return subprocess.run(["ip", "netns", "pids", lab.netns("gw")], capture_output=True, text=True).stdout.split()


def forwards(lab) -> bool:
    """The bridge carries IPv4 and IPv6 between client and server."""
    return lab.ping("client", lab.info.server.ipv4) and lab.run(
        "client", ["ping", "-6", "-c", "1", "-W", "2", lab.info.server.ipv6], check=False).returncode == 0


def addr(lab, v6: bool) -> str:
    return f"[{lab.info.server.ipv6}]" if v6 else lab.info.server.ipv4


def curl_http(lab, host: str, v6: bool, timeout: int = 5) -> subprocess.CompletedProcess:
    return lab.run("client", ["curl", "-sS", "-m", str(timeout), "-o", "/dev/null", "-w", "%{http_code}",
                              "-H", f"Host: {host}", f"http://{addr(lab, v6)}/"], check=False, timeout=timeout + 10)


def curl_tls(lab, nginx, name: str, v6: bool) -> subprocess.CompletedProcess:
    ip = lab.info.server.ipv6 if v6 else lab.info.server.ipv4
    return lab.run("client", ["curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", "--cacert",
                              nginx.cert, "--resolve", f"{name}:443:{ip}", f"https://{name}/"],
                   check=False, timeout=15)


def dig(lab, name: str, v6: bool) -> str:
    ip = lab.info.server.ipv6 if v6 else lab.info.server.ipv4
    return lab.run("client", ["dig", "+short", "+tries=1", "+time=2", f"@{ip}", name], check=False,
                   timeout=15).stdout.strip()


def established(lab) -> list[str]:
    """The server's established TCP sockets on ports 80 and 443."""
    out = lab.run("server", ["ss", "-tnH", "state", "established", "( sport = :80 or sport = :443 )"]).stdout
    return [ln for ln in out.splitlines() if ln.strip()]


@contextlib.contextmanager
def bridge_attached(lab, *args):
    hctl(lab, "attach", "br0", *args)
    try:
        yield
    finally:
        hctl(lab, "detach", "--all")


@contextlib.contextmanager
def engine(lab, tmp_path, rules: str | None = None):
    path = tmp_path / "rules.toml"
    path.write_text(rules if rules is not None else REALISTIC_TEXT)
    eng = Engine(lab, path)
    try:
        yield eng
    finally:
        err = eng.stop()
        assert "Traceback" not in err, err


def mac(lab, role: str) -> str:
    return json.loads(lab.run(role, ["ip", "-j", "link", "show", "eth0"]).stdout)[0]["address"]


def send_frame(lab, frame: bytes) -> None:
    """One Ethernet frame out of the client's eth0."""
    with netns(lab.netns("client")):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    with contextlib.closing(sock):
        sock.bind(("eth0", 0))
        sock.send(frame)


# -- attach, sysctls, detach -----------------------------------------------------------------------
def test_attach_a_bridge_sets_the_sysctls_and_detach_restores_them(bridge_lab):
    lab = bridge_lab
    set_sysctls(lab, "0")
    try:
        out = hctl(lab, "attach", "br0").stdout
        assert "bridge mode: br0 (ports to-client, to-server)" in out
        assert sysctls(lab) == dict.fromkeys(SYSCTLS, "1")
        st = status(lab)
        assert set(st["interfaces"]) == set(PORTS)
        assert st["bridge"]["bridges"] == {"br0": PORTS} and st["bridge"]["not_inspected"] == {}
        assert "bridge mode: br0 (ports to-client, to-server)" in hctl(lab, "status").stdout
        hctl(lab, "attach", "br0")       # a re-attach keeps the values from before the first attach
        out = hctl(lab, "detach", "br0").stdout
        for name in SYSCTLS:
            assert f"{name} restored to 0" in out, out
        assert sysctls(lab) == dict.fromkeys(SYSCTLS, "0")
        assert nothing_left(lab) == []
        assert forwards(lab)
        assert "bridge mode: br0 (ports to-client, to-server)" in hctl(lab, "attach", *PORTS).stdout  # ports named
        assert sysctls(lab) == dict.fromkeys(SYSCTLS, "1")
        hctl(lab, "detach", *PORTS)
        assert sysctls(lab) == dict.fromkeys(SYSCTLS, "0") and nothing_left(lab) == []
    finally:
        hctl(lab, "detach", "--all")
        set_sysctls(lab, "1")


def test_a_value_changed_by_someone_else_is_left_and_said(bridge_lab):
    """Before attach every value is 1 (a new namespace's default) and hybrid keeps them at 1; an
    operator turns call-iptables off while attached: status warns, and detach leaves the
    operator's 0 (it is neither hybrid's value nor the old one) and says so."""
    lab = bridge_lab
    set_sysctls(lab, "1")
    name = "net.bridge.bridge-nf-call-iptables"
    try:
        hctl(lab, "attach", "br0")
        lab.run("gw", ["sysctl", "-q", "-w", f"{name}=0"])
        assert f"warning: {name} no longer 1" in hctl(lab, "status").stdout
        out = hctl(lab, "detach", "--all").stdout
        assert f"{name} left at 0: changed by someone else since attach" in out, out
        assert "net.bridge.bridge-nf-filter-vlan-tagged is 1 as before attach" in out, out
        assert sysctls(lab)[name] == "0"
    finally:
        hctl(lab, "detach", "--all")
        set_sysctls(lab, "1")


def test_refusals_are_one_line(bridge_lab):
    lab = bridge_lab
    lab.run("gw", ["ip", "link", "add", "br9", "type", "bridge"])
    try:
        p = hctl(lab, "attach", "br9", check=False)
        assert p.returncode != 0 and "br9 is a bridge with no port" in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
        p = hctl(lab, "attach", "br0", "--hook", "input", check=False)
        assert p.returncode != 0 and "attach with the forward hook" in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
        assert nothing_left(lab) == []
    finally:
        lab.run("gw", ["ip", "link", "del", "br9"])


def test_a_port_added_after_attach_is_named_by_status_and_doctor(bridge_lab):
    lab = bridge_lab
    with bridge_attached(lab):
        lab.run("gw", ["ip", "link", "add", "late0", "type", "veth", "peer", "name", "late1"])
        try:
            lab.run("gw", ["ip", "link", "set", "late0", "master", "br0"])
            assert status(lab)["bridge"]["not_inspected"] == {"br0": ["late0"]}
            assert "warning: br0's port(s) late0 added after attach are not inspected" in hctl(lab, "status").stdout
            code = ("from hybrid.observe import doctor; c = doctor.check_bridge(None); "
                    "print(c.status); print(c.detail)")
            out = lab.run("gw", [sys.executable, "-c", code]).stdout
            assert out.startswith("warn\n") and "late0 added after attach: not inspected" in out, out
            hctl(lab, "attach", "late0")        # attaching the port too clears the warning
            assert status(lab)["bridge"]["not_inspected"] == {}
            out = lab.run("gw", [sys.executable, "-c", code]).stdout
            assert out.startswith("ok\n"), out
        finally:
            lab.run("gw", ["ip", "link", "del", "late0"])


# -- the engine on bridged packets -----------------------------------------------------------------
@pytest.mark.parametrize("policy", ["--fail-open", "--fail-closed"])
def test_engine_death(bridge_lab, tmp_path, policy):
    """kill -9 of the engine: fail-open, a blocked Host passes (uninspected, as the policy says);
    fail-closed, new flows are dropped. Detach afterwards leaves nothing."""
    lab = bridge_lab
    rules = tmp_path / "rules.toml"
    rules.write_text(REALISTIC_TEXT)
    with Nginx(lab), bridge_attached(lab, policy):
        eng = start_engine(lab, rules, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for(lambda: status(lab)["engines"] and curl_http(lab, "x.blocked.example", False, 3).returncode == 56,
                     20, "the engine to reset a blocked Host")
        finally:
            os.killpg(eng.pid, signal.SIGKILL)
            eng.wait()
        p = curl_http(lab, "x.blocked.example", False, 3)
        if policy == "--fail-open":
            assert p.stdout == "200", p.stderr
        else:
            assert p.returncode == 28, (p.returncode, p.stderr)      # dropped: timed out
    assert nothing_left(lab) == []
    assert forwards(lab)


def test_kill_9_of_hybridctl_and_of_the_engine_then_detach_leaves_nothing(bridge_lab, tmp_path):
    lab = bridge_lab
    set_sysctls(lab, "0")
    try:
        for delay in (0.3, 1.5):
            proc = subprocess.Popen(["ip", "netns", "exec", lab.netns("gw"), *HYBRIDCTL, "attach", "br0"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            time.sleep(delay)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            hctl(lab, "detach", "--all")
            assert nothing_left(lab) == [], f"after kill -9 at {delay}s"
            assert sysctls(lab) == dict.fromkeys(SYSCTLS, "0"), f"after kill -9 at {delay}s"
        rules = tmp_path / "rules.toml"
        rules.write_text(REALISTIC_TEXT)
        proc = subprocess.Popen(["ip", "netns", "exec", lab.netns("gw"), *HYBRIDCTL, "attach", "br0", "--rules",
                                 str(rules)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            wait_for(lambda: os.path.exists(f"/run/hybrid/instances/{lab.netns('gw')}/engine-0.json"), 30,
                     "the engine")
            assert sysctls(lab) == dict.fromkeys(SYSCTLS, "1")
        finally:
            os.killpg(proc.pid, signal.SIGKILL)       # hybridctl and its engine
            proc.wait()
        wait_for(lambda: not gw_pids(lab), 10, "the killed processes to go")
        hctl(lab, "detach", "--all")
        assert nothing_left(lab) == []
        assert sysctls(lab) == dict.fromkeys(SYSCTLS, "0")
        assert forwards(lab)
    finally:
        hctl(lab, "detach", "--all")
        set_sysctls(lab, "1")


# -- the service -----------------------------------------------------------------------------------
def test_run_with_the_bridge_in_the_configuration(bridge_lab, tmp_path):
    lab = bridge_lab
    conf = tmp_path / "hybrid.toml"
    conf.write_text(f'[attach]\ninterfaces = ["br0"]\n\n[engine]\nrules = "{REALISTIC}"\n')
    log = tmp_path / "run.jsonl"
    set_sysctls(lab, "0")
    try:
        with open(log, "w") as out, Nginx(lab):
            proc = subprocess.Popen(["ip", "netns", "exec", lab.netns("gw"), *HYBRIDCTL, "run", "--config", str(conf)],
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                def event(name):
                    with open(log) as f:
                        return next((e for e in (json.loads(ln) for ln in f if ln.startswith("{"))
                                     if e.get("event") == name), None)
                wait_for(lambda: proc.poll() is not None or event("engine_running"), 60, "hybridctl run")
                assert proc.poll() is None, log.read_text()
                attached = event("attached")
                assert set(attached["interfaces"]) == set(PORTS) and attached["bridges"] == {"br0": PORTS}
                assert attached["sysctls"] == dict.fromkeys(SYSCTLS, "1")
                assert curl_http(lab, "x.blocked.example", False).returncode == 56
                assert curl_http(lab, "www.example.test", True).stdout == "200"
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        assert any("restored to 0" in line for line in event("detached")["sysctls"])
        assert nothing_left(lab) == []
        assert sysctls(lab) == dict.fromkeys(SYSCTLS, "0")
        assert forwards(lab)
    finally:
        hctl(lab, "detach", "--all")
        set_sysctls(lab, "1")


# -- one attachment (generic XDP) and one engine for the tests below ------------------------------
EXTRA_RULES = """
[[rule]]
name = "from-server-side"
iif = "to-server"
proto = "udp"
dport = 9999
action = "drop"

[[rule]]
name = "from-client-side"
iif = "to-client"
proto = "udp"
dport = 9998
action = "drop"

[[rule]]
name = "fill"
proto = "udp"
dport = 10010
action = "rewrite"
rewrite = { fill = "h", end = "\\n" }

[[rule]]
name = "evil"
proto = "udp"
dport = 9997
payload_contains = "evil"
action = "drop"
"""


@pytest.fixture(scope="module")
def inline(bridge_lab, tmp_path_factory):
    """br0 attached with generic XDP on its ports and an engine running realistic.toml plus
    EXTRA_RULES (a UDP port each, after realistic's rules), for the rest of the module; the tests
    that detach come before the first user of this fixture."""
    lab = bridge_lab
    with bridge_attached(lab, "--xdp-mode", "generic"), engine(lab, tmp_path_factory.mktemp("inline"),
                                                               REALISTIC_TEXT + EXTRA_RULES):
        yield lab
    assert nothing_left(lab) == []


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_host_sni_and_dns_blocks_with_resets_at_layer_2(inline, v6):
    """examples/rules/realistic.toml on the bridge: a blocked Host and a blocked SNI are reset
    (curl sees the reset at once, not a timeout) and the server keeps no connection (the onward
    RST reached it at layer 2); a blocked DNS name gets no answer; allowed ones are served."""
    lab = inline
    with (Nginx(lab, tls_port=443, server_names=("www.example.test", "x.tracker.example")) as nginx,
          Dns(lab, records={"ok.example": "192.0.2.8", "x.ads.example": "192.0.2.9"})):
        assert curl_http(lab, "www.example.test", v6).stdout == "200"
        p = curl_http(lab, "x.blocked.example", v6)
        assert p.returncode == 56 and "reset" in p.stderr.lower(), p.stderr        # reset, not timed out (28)
        assert curl_tls(lab, nginx, "www.example.test", v6).stdout == "200"
        p = curl_tls(lab, nginx, "x.tracker.example", v6)
        assert p.returncode == 35 and "reset" in p.stderr.lower(), (p.returncode, p.stderr)
        assert dig(lab, "ok.example", v6) == "192.0.2.8"
        blocked = dig(lab, "x.ads.example", v6)
        assert "192.0.2.9" not in blocked and "timed out" in blocked, blocked
        wait_for(lambda: established(lab) == [], 5, "the server's connections to end")
        st = engine_stats(lab, until=lambda s: s["actions"]["reject"] >= 2)
        assert st["actions"]["reject"] >= 2 and st["rules"]["block-dns-name"] >= 1
        assert st["reject_send_errors"] == 0 and st["reject_no_mac"] == 0, st
        assert st["errors"] == 0


def test_iif_is_the_bridge_port_and_rewrite_works(inline):
    lab = inline
    with UdpSink(lab, port=9999) as s9, UdpSink(lab, port=9998) as s8, UdpSink(lab, port=10010) as s10:
        udp_send_from_client(lab, b"to 9999", 9999)          # came in by to-client: not the first rule
        udp_send_from_client(lab, b"to 9998", 9998)          # dropped by the second
        udp_send_from_client(lab, b"abcdef", 10010)
        assert s9.wait(1) == [b"to 9999"]
        assert s10.wait(1) == [b"hhhhh\n"]
        st = engine_stats(lab, until=lambda s: s["rules"].get("from-client-side", 0) >= 1)
        assert st["rules"]["from-client-side"] == 1 and st["rules"]["from-server-side"] == 0
        assert s8.payloads == []


def test_a_bypassed_flow_is_decided_in_the_kernel(inline):
    lab = inline
    before = kernel_counters(lab)
    res = iperf3(lab, 2)
    after = kernel_counters(lab)
    packets = after["packets"] - before["packets"]
    flagged = after["flagged"] - before["flagged"]
    assert res["end"]["sum_received"]["bytes"] > 10_000_000
    assert packets > 1000 and flagged < 40, (packets, flagged)
    assert after["bypassed"] - before["bypassed"] > 1000


def test_flow_block_drops_in_the_kernel_and_xdp_generic_drops_a_prefix(inline):
    lab = inline
    query = bytes.fromhex("12340100000100000000000001780361647307657861") + b"mple\x00\x00\x01\x00\x01"
    with UdpSink(lab, port=53) as sink:
        blocked = engine_stats(lab)["rules"]["block-dns-name"]
        c = kernel_counters(lab)
        dropped = c["drop_tc_flow"] + c["xdp_drop_flow"]
        udp_send_from_client(lab, query, 53, sport=40053)   # the engine drops it and blocks the flow
        engine_stats(lab, until=lambda s: s["rules"]["block-dns-name"] > blocked)
        for _ in range(2):                                  # the same 5-tuple again: dropped in the kernel
            udp_send_from_client(lab, query, 53, sport=40053)

        def kernel_dropped():
            c = kernel_counters(lab)
            return c["drop_tc_flow"] + c["xdp_drop_flow"] - dropped >= 2
        wait_for(kernel_dropped, 5, "the blocked flow's next datagrams dropped in the kernel")
        assert sink.payloads == []
        st = status(lab)
        assert {e["xdp_mode"] for e in st["interfaces"].values()} == {"generic"}
        assert all(e["xdp_attached"] for e in st["interfaces"].values())
    hctl(lab, "attach", "br0", "--xdp-mode", "generic", "--block-prefix", f"{lab.info.server.ipv4}/32")
    try:
        assert not lab.ping("client", lab.info.server.ipv4)
        assert kernel_counters(lab)["xdp_drop_prefix"] >= 1
    finally:
        hctl(lab, "attach", "br0", "--xdp-mode", "generic")     # the same attachment without the prefix
    assert forwards(lab)


# -- VLAN tags: what br_netfilter hands to iptables, and what it never does ------------------------
def test_vlan_tagged_frames_are_inspected_and_double_tags_never_pass_uninspected(inline):
    """A priority tag (VID 0) is taken as untagged by the server: with bridge-nf-filter-vlan-tagged
    off such a frame would cross the bridge unqueued (shown: the blocked payload arrives), so attach
    turns it on. Two tags (0/0) reach the server too and br_netfilter never queues them: the
    bridge table drops the flagged ones."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Dot1AD, Dot1Q, Ether
    from scapy.packet import Raw
    lab = inline
    c, s = lab.info.client, lab.info.server
    cmac, smac = mac(lab, "client"), mac(lab, "server")
    sport = iter(range(42000, 43000))

    def send(tags, payload: bytes, v6: bool) -> None:
        l3 = IPv6(src=c.ipv6, dst=s.ipv6) if v6 else IP(src=c.ipv4, dst=s.ipv4)
        frame = Ether(src=cmac, dst=smac)
        for i, t in enumerate(tags):
            frame = frame / (Dot1AD(vlan=t) if len(tags) == 2 and i == 0 else Dot1Q(vlan=t))
        send_frame(lab, bytes(frame / l3 / UDP(sport=next(sport), dport=9997) / Raw(payload)))

    def delivered(sink, sent: list[tuple[list[int], bytes, bool]]) -> set[bytes]:
        """Send the frames, then an untagged marker the engine passes: one queue decides in
        order, so once the marker is in, every earlier queued frame was decided."""
        for tags, payload, v6 in sent:
            send(tags, payload, v6)
        marker = b"marker %d" % next(sport)
        send([], marker, False)
        wait_for(lambda: marker in sink.payloads, 5, "the marker")
        return set(sink.payloads)

    assert forwards(lab)     # neighbours known both ways
    with UdpSink(lab, port=9997) as sink:
        cases = [(tags, b"%s %s %r" % (what, b"v6" if v6 else b"v4", tags), v6)
                 for v6 in (False, True) for tags in ([], [0], [0, 0]) for what in (b"fine", b"evil")]
        got = delivered(sink, cases)
        for tags, payload, _v6 in cases:
            # untagged and one tag: inspected (evil dropped); two tags: not inspectable, dropped
            assert (payload in got) == (payload.startswith(b"fine") and len(tags) < 2), (payload, got)
        assert status(lab)["bridge"]["dropped_two_tags"] >= 4      # this test is the only one sending two tags
        lab.run("gw", ["sysctl", "-q", "-w", "net.bridge.bridge-nf-filter-vlan-tagged=0"])
        try:   # the blind spot attach closes: with the sysctl off, a tagged payload the rules drop arrives
            assert b"evil off" in delivered(sink, [([0], b"evil off", False)])
        finally:
            lab.run("gw", ["sysctl", "-q", "-w", "net.bridge.bridge-nf-filter-vlan-tagged=1"])
