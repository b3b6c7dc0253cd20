"""The verdict engine in the lab: real NFQUEUE, real BPF attach, real traffic; rules decide,
flow verdicts land in the kernel."""

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
from gwlab import HYBRIDCTL, attachment, clear_flows, start_engine
from traffic import udp_send

from hybrid.lab.demo import Nginx
from hybrid.lab.topology import netns

pytestmark = pytest.mark.integration
IFACES = ["to-client", "to-server"]


def hctl(lab, *args, check=True):
    proc = subprocess.run(["ip", "netns", "exec", lab.netns("gw"), *HYBRIDCTL, *args],
                          capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"hybridctl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def status(lab) -> dict:
    return json.loads(hctl(lab, "status", "--json").stdout)


def counters(lab, ifname="to-client") -> dict:
    return status(lab)["interfaces"][ifname]["counters"]


def queued(lab, family="ipv4") -> int:
    return next(n["queued_packets"] for n in status(lab)["netfilter"] if n["family"] == family)


def stats_file(lab, queue=0) -> str:
    return f"/run/hybrid/instances/{lab.netns('gw')}/engine-{queue}.json"


def engine_stats(lab, queue=0, until=None, timeout=5.0) -> dict:
    """The engine's published counters; with ``until``, wait (they are published every 0.5 s)
    until ``until(stats)`` holds, and return them either way for the assertions to judge."""
    deadline = time.monotonic() + timeout
    while True:
        with open(stats_file(lab, queue)) as f:
            st = json.load(f)
        if until is None or until(st) or time.monotonic() > deadline:
            return st
        time.sleep(0.05)


class RunningEngine:
    def __init__(self, lab, rules_path, log_path, **options):
        self.lab, self.log_path = lab, log_path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stats_file(lab))
        self.proc = start_engine(lab, rules_path, log_path=str(log_path), **options,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not os.path.exists(stats_file(lab)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"engine did not start: {self.proc.communicate()[1]}")
            time.sleep(0.05)

    def hup(self):
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=15)
        return err

    def log_lines(self) -> list[dict]:
        with open(self.log_path) as f:
            return [json.loads(line) for line in f]


@pytest.fixture(scope="class")
def attached(lab):
    """One attachment for a class of tests, detached afterwards (also when a test failed)."""
    with attachment(lab, "--xdp-mode", "generic", "--watch-port", "10010", "--watch-port", "10086"):
        yield lab


@pytest.fixture
def engine(attached, tmp_path):
    """engine(rules_text, **options) -> RunningEngine; stopped at the end of the test. The flow
    table is emptied first: what an earlier test of the class decided does not carry over."""
    clear_flows(attached)
    running = []

    def start(text: str, **options) -> RunningEngine:
        rules = tmp_path / "rules.toml"
        rules.write_text(text)
        eng = RunningEngine(attached, rules, tmp_path / "verdicts.jsonl", **options)
        running.append(eng)
        return eng

    yield start
    for eng in running:
        err = eng.stop()
        assert eng.proc.returncode == 0, err
        assert "Traceback" not in err


def rewrite_example() -> str:
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "examples", "rules", "rewrite.toml")) as f:
        return f.read()


class TestOneAttachment:
    """The tests of the engine's decisions share one attachment (class-scoped: detached before
    the tests below that attach for themselves): an attach compiles the datapath, 6-10 s on the
    CI machine, and these tests need nothing of it but the attachment. Each starts its own
    engine (fresh counters) on an emptied flow table (gwlab.clear_flows), and reads the kernel's
    counters as deltas."""

    def test_rewrite_example_byte_for_byte(self, engine, lab):
        engine(rewrite_example())
        with netns(lab.netns("server")):
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with netns(lab.netns("client")):
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            rx.bind((lab.info.server.ipv4, 10010))
            rx.settimeout(3)
            payloads = [b"hello world", b"x", b"a longer payload of 41 bytes, 0123456789"]
            for p in payloads:
                tx.sendto(p, (lab.info.server.ipv4, 10010))
            got = [rx.recv(2048) for _ in payloads]
        finally:
            rx.close()
            tx.close()
        assert got == [b"h" * (len(p) - 1) + b"\n" for p in payloads]      # same length, 'h's, newline
        assert udp_send(lab, [b"dropped"] * 3, dport=10086) == 0
        # ping: 32 data bytes pass, the default 56 do not
        assert lab.run("client", ["ping", "-c1", "-W2", "-s", "32", lab.info.server.ipv4], check=False).returncode == 0
        assert lab.run("client", ["ping", "-c1", "-W1", lab.info.server.ipv4], check=False).returncode != 0
        st = engine_stats(lab, until=lambda st: st["rules"]["ping-other-drop"] == 1)
        assert st["rules"]["udp-10010-fill"] == 3 and st["rules"]["udp-10086-drop"] == 3
        assert st["rules"]["ping-32-accept"] == 1 and st["rules"]["ping-other-drop"] == 1
        assert st["flags_confirmed"] is True and st["errors"] == 0


    def test_accept_still_meets_the_users_own_rules(self, engine, lab):
        """accept = clear our bit + NF_REPEAT: a user DROP rule after our jump still applies."""
        engine('default = "accept"\n')
        lab.run("gw", ["iptables", "-A", "FORWARD", "-p", "udp", "--dport", "10010", "-j", "DROP"])
        try:
            assert udp_send(lab, [b"x"] * 2, dport=10010) == 0
            assert engine_stats(lab, until=lambda st: st["actions"]["accept"] >= 2)["actions"]["accept"] >= 2
        finally:
            lab.run("gw", ["iptables", "-D", "FORWARD", "-p", "udp", "--dport", "10010", "-j", "DROP"])
        assert udp_send(lab, [b"x"] * 2, dport=10010) == 2


    def test_bypassed_flow_is_never_queued_again(self, engine, lab):
        engine('default = "accept"\n[[rule]]\nname = "bypass-udp"\nproto = "udp"\ndport = 10010\n'
               'action = "accept"\nflow = "bypass"\nttl = 60\n')
        assert udp_send(lab, [b"first"], dport=10010, sport=41000) == 1
        before_q, before_c = queued(lab), counters(lab)
        assert udp_send(lab, [b"later"] * 50, dport=10010, sport=41000) == 50
        after_c = counters(lab)
        assert queued(lab) == before_q                                   # not one more packet queued
        assert after_c["bypassed"] - before_c.get("bypassed", 0) == 50   # the kernel passed them itself
        assert engine_stats(lab, until=lambda st: st["flow_verdicts"]["bypass"])["flow_verdicts"]["bypass"] == 1


    def test_blocked_flow_dies_at_xdp_not_in_the_queue(self, engine, lab):
        engine('default = "accept"\n[[rule]]\nname = "block-udp"\nproto = "udp"\ndport = 10010\n'
               'payload_contains = "evil"\naction = "drop"\nflow = "block"\nttl = 60\n')
        assert udp_send(lab, [b"fine"], dport=10010, sport=41001) == 1
        assert udp_send(lab, [b"evil"], dport=10010, sport=41002) == 0      # the engine drops it
        before_q, before_c = queued(lab), counters(lab)
        assert udp_send(lab, [b"anything"] * 20, dport=10010, sport=41002) == 0
        after_c = counters(lab)
        assert after_c["xdp_drop_flow"] - before_c.get("xdp_drop_flow", 0) == 20
        assert queued(lab) == before_q
        assert udp_send(lab, [b"fine again"], dport=10010, sport=41001) == 1   # other flows unaffected


    def test_http_host_rule_with_curl_and_nginx(self, engine, lab):
        engine('default = "accept"\ndefault_flow = "none"\n'
               '[[rule]]\nname = "block-host"\nproto = "tcp"\nhttp_host = ".blocked.test"\n'
               'action = "reject"\nflow = "block"\nttl = 30\n'
               '[[rule]]\nname = "bypass-after-request"\nproto = "tcp"\npayload_len = "1-65535"\n'
               'action = "accept"\nflow = "bypass"\nttl = 30\n')
        url = f"http://{lab.info.server.ipv4}/"
        with Nginx(lab):
            ok = lab.run("client", ["curl", "-s", "-m", "5", url, "-H", "Host: fine.test"], check=False)
            bad = lab.run("client", ["curl", "-s", "-m", "5", url, "-H", "Host: www.blocked.test"], check=False)
        assert ok.returncode == 0 and ok.stdout == "hello from the hybrid lab\n"
        assert bad.returncode == 56          # curl: "Failure in receiving network data" (reset)
        st = engine_stats(lab, until=lambda st: st["actions"]["reject"] == 1 and st["flow_verdicts"]["bypass"])
        assert st["rules"]["block-host"] == 1 and st["actions"]["reject"] == 1
        assert st["flow_verdicts"]["block"] == 1 and st["flow_verdicts"]["bypass"] >= 1


    def test_sighup_reloads_and_a_broken_file_keeps_the_old_rules(self, engine, lab, tmp_path):
        eng = engine('default = "accept"\n[[rule]]\nname = "drop-it"\nproto = "udp"\ndport = 10010\naction = "drop"\n')
        assert udp_send(lab, [b"x"], dport=10010) == 0
        (tmp_path / "rules.toml").write_text('default = "accept"\n')
        eng.hup()
        _wait(lambda: engine_stats(lab)["reloads"] == 1)
        assert udp_send(lab, [b"x"], dport=10010) == 1
        (tmp_path / "rules.toml").write_text('default = "accept"\n[[rule]]\nname = "x"\nactoin = "drop"\n')
        eng.hup()
        _wait(lambda: engine_stats(lab)["reload_errors"] == 1)
        err = engine_stats(lab)["last_reload_error"]
        assert err.startswith(f"{tmp_path / 'rules.toml'}:4: ") and "action" in err
        assert udp_send(lab, [b"x"], dport=10010) == 1          # the old (accepting) rules still run


    def test_status_shows_per_rule_counters(self, engine, lab):
        engine(rewrite_example())
        udp_send(lab, [b"x"] * 2, dport=10086)
        engine_stats(lab, until=lambda st: st["rules"]["udp-10086-drop"] == 2)
        out = hctl(lab, "status").stdout
        assert "engine queue 0 (running" in out
        assert [ln for ln in out.splitlines() if "rule udp-10086-drop" in ln][0].split()[-1] == "2"


    def test_realistic_example_http_tls_dns(self, engine, lab):
        """examples/rules/realistic.toml against real curl/nginx (HTTP and HTTPS with a throwaway
        certificate) and real dig/dnsmasq; everything not blocked is bypassed after its first
        payload packet."""
        from hybrid.lab.servers import Dns
        from hybrid.lab.servers import Nginx as TlsNginx
        engine(realistic_example())
        srv = lab.info.server.ipv4
        names = ("www.example.test", "a.tracker.example")
        records = {"ok.example": srv, "x.ads.example": srv}
        with TlsNginx(lab, tls_port=443, server_names=names) as web, Dns(lab, records=records):
            def curl(*args):
                return lab.run("client", ["curl", "-s", "-m", "5", *args], check=False)
            # HTTP: Host decides
            assert curl(f"http://{srv}/", "-H", "Host: www.example.test").stdout == web.INDEX
            assert curl(f"http://{srv}/", "-H", "Host: www.blocked.example").returncode == 56   # reset
            # HTTPS: SNI decides (the certificate is verified for the allowed name)
            ok = curl("--cacert", web.cert, "--resolve", f"www.example.test:443:{srv}", "https://www.example.test/")
            assert ok.returncode == 0 and ok.stdout == web.INDEX
            bad = curl("-k", "--resolve", f"a.tracker.example:443:{srv}", "https://a.tracker.example/")
            assert bad.returncode == 35                                   # TLS handshake reset
            # DNS: the query name decides
            dig = ["dig", f"@{srv}", "+time=1", "+tries=1", "+short"]
            assert lab.run("client", [*dig, "ok.example", "A"]).stdout.strip() == srv
            blocked = lab.run("client", [*dig, "x.ads.example", "A"], check=False)
            assert "timed out" in blocked.stdout or blocked.returncode == 9
            # Allowed traffic: bypassed after its first payload packet, then never queued.
            before = queued(lab)
            for _ in range(3):
                assert curl(f"http://{srv}/", "-H", "Host: www.example.test").stdout == web.INDEX
            per_conn = (queued(lab) - before) / 3
            assert per_conn <= 3                                          # SYN, the request, maybe one ACK
        # wait for the counters asserted below: they are published every 0.5 s
        st = engine_stats(lab, until=lambda st: st["rules"]["block-dns-name"] >= 1
                          and st["flow_verdicts"]["bypass"] >= 6)
        assert st["rules"]["block-http-host"] == 1 and st["rules"]["block-tls-sni"] == 1
        assert st["rules"]["block-dns-name"] == 1
        assert st["flow_verdicts"]["block"] == 3 and st["flow_verdicts"]["bypass"] >= 6


    def test_reject_udp_with_icmp_and_mark_action(self, engine, lab):
        engine('default = "accept"\n'
               '[[rule]]\nname = "reject-udp"\nproto = "udp"\ndport = 10086\naction = "reject"\n'
               'reject_with = "icmp-port-unreachable"\n'
               '[[rule]]\nname = "mark-it"\nproto = "udp"\ndport = 10010\naction = "mark"\nmark = "0x42/0xff"\n')
        # mark: the packet leaves the engine with 0x42 in the low byte (and our bit cleared); a
        # counting rule after hybrid's jump sees it.
        lab.run("gw", ["iptables", "-A", "FORWARD", "-m", "mark", "--mark", "0x42/0xff"])
        try:
            assert udp_send(lab, [b"x"] * 3, dport=10010) == 3
            counted = lab.run("gw", ["iptables-save", "-c"]).stdout
            assert "[3:" in next(ln for ln in counted.splitlines() if "--mark 0x42/0xff" in ln)
        finally:
            lab.run("gw", ["iptables", "-D", "FORWARD", "-m", "mark", "--mark", "0x42/0xff"])
        # reject: the client's connected UDP socket sees the ICMP port unreachable
        with netns(lab.netns("client")):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with s:
            s.settimeout(3)
            s.connect((lab.info.server.ipv4, 10086))
            s.send(b"knock")
            with pytest.raises(ConnectionRefusedError):
                s.recv(100)
        st = engine_stats(lab, until=lambda st: st["actions"]["reject"] == 1)
        assert st["actions"]["reject"] == 1 and st["actions"]["mark"] == 3
        assert st["kernel"]["dropped"] == 0 and st["kernel"]["queued_total"] >= 4


    def test_plugin_decides_and_a_failing_plugin_never_stops_the_engine(self, engine, lab, tmp_path):
        plugins = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "examples", "plugins"))
        engine(f'default = "accept"\nplugin_paths = ["{plugins}"]\n'
               '[[rule]]\nname = "broken"\nplugin = "sizecheck:explode"\n'
               '[[rule]]\nname = "big-udp"\nplugin = "sizecheck:decide"\n')
        assert udp_send(lab, [b"small"] * 2, dport=10010, sport=43000) == 2
        assert udp_send(lab, [b"x" * 1200], dport=10010, sport=43001) == 0      # the plugin drops it
        st = engine_stats(lab, until=lambda st: st["rules"]["big-udp"] == 1)
        assert st["rules"]["big-udp"] == 1 and st["flow_verdicts"]["block"] == 1
        assert st["errors"] == 0                 # the failing plugin counts as "no match", not an error
        assert udp_send(lab, [b"small"], dport=10010, sport=43000) == 1          # still running


    def test_split_client_hello_cannot_slip_past_the_sni_rule(self, engine, lab):
        """An evader (or a post-quantum key share) splits the ClientHello so that its first segment
        has no SNI. The engine joins the segments and still blocks the name; an allowed name reaches
        the server."""
        import ssl

        from hybrid.lab.servers import Nginx as TlsNginx
        engine(realistic_example())

        def hello(name):
            ctx = ssl.create_default_context()
            ctx.set_alpn_protocols([f"proto-{i:03d}-" + "x" * 40 for i in range(40)])   # > 1 segment
            out = ssl.MemoryBIO()
            conn = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=name)
            with pytest.raises(ssl.SSLWantReadError):
                conn.do_handshake()
            return out.read()

        def send_split(name) -> bytes | Exception:
            data = hello(name)
            with netns(lab.netns("client")):
                s = socket.create_connection((lab.info.server.ipv4, 443), timeout=5)
            with s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.sendall(data[:100])            # ends before the server_name extension
                time.sleep(0.2)
                s.sendall(data[100:])
                try:
                    return s.recv(5)
                except OSError as exc:
                    return exc

        with TlsNginx(lab, tls_port=443, server_names=("www.example.test", "a.tracker.example")):
            blocked = send_split("a.tracker.example")
            allowed = send_split("www.example.test")
        assert isinstance(blocked, ConnectionResetError)
        # nginx answers the allowed ClientHello with a TLS record: a ServerHello, or for our made-up
        # ALPN names an alert. Either way the handshake reached the server and was not reset.
        assert isinstance(allowed, bytes) and allowed[:1] in (b"\x16", b"\x15")
        st = engine_stats(lab, until=lambda st: st["hellos_joined"] >= 2)
        assert st["hellos_joined"] == 2 and st["rules"]["block-tls-sni"] == 1


    def test_split_http_request_cannot_slip_past_the_host_rule(self, engine, lab):
        """An evader sends the request head in pieces so that the first segment has no Host line, or
        only part of it. The engine holds the pieces back (accepting them) until the Host line is
        complete, then decides: the blocked name is reset, an allowed one is answered."""
        engine(realistic_example())

        def send_split(host: str, cut: int) -> bytes | Exception:
            head = (f"GET / HTTP/1.1\r\nUser-Agent: split\r\nHost: {host}\r\nConnection: close\r\n\r\n").encode()
            with netns(lab.netns("client")):
                s = socket.create_connection((lab.info.server.ipv4, 80), timeout=5)
            with s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                try:
                    for i in range(0, len(head), cut):
                        s.sendall(head[i:i + cut])
                        time.sleep(0.05)
                    return s.recv(12)
                except OSError as exc:           # the reset may come while the last pieces are sent
                    return exc

        with Nginx(lab):
            results = {(host, cut): send_split(host, cut)
                       for host in ("x.blocked.example", "www.example.test") for cut in (1, 20, 40)}
        for (host, cut), got in results.items():
            if host == "x.blocked.example":
                assert isinstance(got, ConnectionResetError), (cut, got)
            else:
                assert got == b"HTTP/1.1 200", (cut, got)
        st = engine_stats(lab, until=lambda st: st["http_heads_joined"] >= 6)
        assert st["http_heads_joined"] == 6 and st["rules"]["block-http-host"] == 3


    def test_reject_over_ipv6_resets_the_client(self, engine, lab):
        """Reject builds a full IPv6 packet and sends it through an IPPROTO_RAW socket."""
        engine(realistic_example())
        srv6 = lab.info.server.ipv6
        with Nginx(lab):
            ok = lab.run("client", ["curl", "-s", "-m", "5", f"http://[{srv6}]/", "-H", "Host: www.example.test"],
                         check=False)
            bad = lab.run("client", ["curl", "-s", "-m", "5", f"http://[{srv6}]/", "-H", "Host: x.blocked.example"],
                          check=False)
        assert ok.returncode == 0 and ok.stdout == "hello from the hybrid lab\n"
        assert bad.returncode == 56                                      # reset, not a 5 s timeout (28)
        st = engine_stats(lab, until=lambda st: st["actions"]["reject"] == 1)
        assert st["actions"]["reject"] == 1 and st["errors"] == 0


    def test_new_connection_on_a_bypassed_tuple_is_inspected_again(self, engine, lab):
        """Clients recycle ephemeral ports: a connection reusing the exact 5-tuple of one the engine
        bypassed must still have its request inspected (its SYN starts the flow entry over)."""
        import struct
        engine(realistic_example())
        srv = lab.info.server.ipv4

        def request(host: str) -> bytes | Exception:
            with netns(lab.netns("client")):
                s = socket.socket()
            with s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
                s.settimeout(5)
                s.bind((lab.info.client.ipv4, 45000))
                s.connect((srv, 80))
                s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                try:
                    return s.recv(100)
                except OSError as exc:
                    return exc

        with Nginx(lab):
            first = request("www.example.test")
            assert isinstance(first, bytes) and first.startswith(b"HTTP/1.1 200")
            engine_stats(lab, until=lambda st: st["flow_verdicts"]["bypass"] >= 1)
            second = request("www.blocked.example")            # same client port, same 5-tuple
        assert isinstance(second, ConnectionResetError)
        assert engine_stats(lab, until=lambda st: st["rules"]["block-http-host"] == 1)["rules"]["block-http-host"] == 1


    def test_reject_resets_the_server_too_and_openssl_s_server_answers_the_next_client(self, engine, lab, tmp_path):
        """A ClientHello with a blocked SNI is rejected: the client gets a RST, and so does the server
        (from the client's address, with the segment's own sequence number), which therefore holds no
        half-open connection. openssl s_server serves one connection at a time: with only the client
        reset it would wait on that connection for ever and never answer the allowed client."""
        import ssl
        engine(REJECT_BOTH_RULES)
        srv, cli, port = lab.info.server.ipv4, lab.info.client.ipv4, 4433
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE

        def handshake(name: str) -> bytes:
            with netns(lab.netns("client")):
                s = socket.create_connection((srv, port), timeout=5)
            with ctx.wrap_socket(s, server_hostname=name) as t:
                t.sendall(b"GET / HTTP/1.0\r\n\r\n")
                return t.recv(16)

        with openssl_s_server(lab, tmp_path, port):
            with pytest.raises(ConnectionResetError):
                handshake("www.blocked.test")
            assert no_established_from(lab, cli, port) == []
            assert handshake("www.example.test").startswith(b"HTTP/1.0 200")
        st = engine_stats(lab, until=lambda st: st["actions"]["reject"] == 1)
        assert st["rules"]["block-sni"] == 1 and st["actions"]["reject"] == 1
        assert st["reject_send_errors"] == 0 and st["errors"] == 0


    def test_reject_over_ipv6_resets_the_server_too(self, engine, lab):
        """The same over IPv6 with nginx, which would otherwise keep the connection ESTABLISHED until
        its 60 s header timeout."""
        engine(REJECT_BOTH_RULES)
        srv6, cli6 = lab.info.server.ipv6, lab.info.client.ipv6
        with Nginx(lab):
            bad = lab.run("client", ["curl", "-s", "-m", "5", f"http://[{srv6}]/", "-H", "Host: www.blocked.test"],
                          check=False)
            assert bad.returncode == 56                                  # the client is reset
            assert no_established_from(lab, cli6, 80) == []              # and so is the server
        st = engine_stats(lab, until=lambda st: st["actions"]["reject"] == 1)
        assert st["rules"]["block-host"] == 1 and st["reject_send_errors"] == 0 and st["errors"] == 0
        assert "reject messages not sent" not in hctl(lab, "status").stdout


def test_attach_with_rules_runs_in_foreground_and_detaches_on_sigterm(lab, tmp_path):
    rules = tmp_path / "r.toml"
    rules.write_text('default = "accept"\n')
    proc = subprocess.Popen(["ip", "netns", "exec", lab.netns("gw"), *HYBRIDCTL, "attach", *IFACES,
                             "--rules", str(rules)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: os.path.exists(stats_file(lab)) or proc.poll() is not None, timeout=120)
        assert lab.ping("client", lab.info.server.ipv4)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:                                      # on failure: stop it, and detach what it left
        if proc.poll() is None:
            _stop(proc)
            hctl(lab, "detach", "--all", check=False)
    assert "engine stopped; hybrid detached" in err and "Traceback" not in err
    assert status(lab)["attached"] is False
    assert lab.run("gw", ["iptables-save"]).stdout.count("HYBRID") == 0


def test_broken_rules_file_fails_before_attaching(lab, tmp_path):
    rules = tmp_path / "bad.toml"
    rules.write_text('default = "maybe"\n')
    proc = hctl(lab, "attach", *IFACES, "--rules", str(rules), check=False)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(f"Error: {rules}:1: ")
    assert status(lab)["attached"] is False


def test_engine_without_attachment_says_what_to_do(lab, tmp_path):
    rules = tmp_path / "r.toml"
    rules.write_text('default = "accept"\n')
    proc = hctl(lab, "engine", "--rules", str(rules), check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"Error: hybrid is not attached in this network namespace ({lab.netns('gw')}): "
                                   "run 'hybridctl attach IFACE...' first, or 'hybridctl attach IFACE... --rules FILE'")


def _stop(proc) -> None:
    """Stop a hybridctl process a failed test left running (SIGTERM: it detaches what it made)."""
    proc.terminate()
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def _wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_two_queues_two_engine_processes(lab, tmp_path):
    """--queues 0-1: the rule spreads packets with --queue-balance, one engine process per queue.
    The kernel hashes addresses and protocol, not ports (xt_NFQUEUE), so the flows come from
    16 client addresses."""
    hctl(lab, "attach", *IFACES, "--queues", "0-1", "--watch-port", "10010")
    rules = tmp_path / "r.toml"
    rules.write_text('default = "accept"\n')
    proc = start_engine(lab, rules, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: os.path.exists(stats_file(lab, 0)) and os.path.exists(stats_file(lab, 1)), timeout=30)
        assert "--queue-balance 0:1" in lab.run("gw", ["iptables-save"]).stdout
        sources = [f"198.18.1.{i}" for i in range(100, 116)]
        for a in sources:
            lab.run("client", ["ip", "addr", "add", f"{a}/24", "dev", "eth0"])
        for a in sources:
            with netns(lab.netns("server")):
                rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with netns(lab.netns("client")):
                tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with rx, tx:
                rx.bind((lab.info.server.ipv4, 10010))
                rx.settimeout(2)
                tx.bind((a, 0))
                tx.sendto(b"x", (lab.info.server.ipv4, 10010))
                assert rx.recv(10) == b"x"
        # Each engine publishes its counters every 0.5 s: wait until both files count all 16
        # (each datagram reached the server, so each was decided), then judge the split.
        deadline = time.monotonic() + 10
        while sum(per_queue := [engine_stats(lab, q)["packets"] for q in (0, 1)]) < 16 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(n > 0 for n in per_queue) and sum(per_queue) >= 16, per_queue
        pids = {engine_stats(lab, q)["pid"] for q in (0, 1)}
        assert len(pids) == 2                   # two processes
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        hctl(lab, "detach", "--all")
        for i in range(100, 116):
            lab.run("client", ["ip", "addr", "del", f"198.18.1.{i}/24", "dev", "eth0"], check=False)
    assert proc.returncode == 0 and "Traceback" not in err


def test_queue_cpu_fanout_spreads_one_host_pair_by_cpu(lab, tmp_path):
    """--queue-cpu-fanout: the queue is the CPU's, so one client address sending from CPU 0, then
    from CPU 1 (veth delivers on the sender's CPU) reaches both engines; address hashing would
    send both to one."""
    hctl(lab, "attach", *IFACES, "--queues", "0-1", "--queue-cpu-fanout", "--watch-port", "10010")
    rules = tmp_path / "r.toml"
    rules.write_text('default = "accept"\n')
    proc = start_engine(lab, rules, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    send = ("import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            "[s.sendto(b'x', (sys.argv[1], 10010)) for _ in range(20)]")
    try:
        _wait(lambda: os.path.exists(stats_file(lab, 0)) and os.path.exists(stats_file(lab, 1)), timeout=30)
        assert "--queue-balance 0:1 --queue-bypass --queue-cpu-fanout" in lab.run("gw", ["iptables-save"]).stdout
        for cpu in ("0", "1"):
            lab.run("client", ["taskset", "-c", cpu, sys.executable, "-c", send, lab.info.server.ipv4])
        per_queue = [engine_stats(lab, q, until=lambda st: st["packets"] >= 20)["packets"] for q in (0, 1)]
        assert all(n >= 20 for n in per_queue), per_queue     # each CPU's 20 went to its own queue
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        hctl(lab, "detach", "--all")
    assert proc.returncode == 0 and "Traceback" not in err


def realistic_example() -> str:
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "examples", "rules", "realistic.toml")) as f:
        return f.read()


def test_attach_with_rules_and_keep_leaves_hybrid_attached(lab, tmp_path):
    rules = tmp_path / "r.toml"
    rules.write_text('default = "accept"\n')
    proc = subprocess.Popen(["ip", "netns", "exec", lab.netns("gw"), *HYBRIDCTL, "attach", *IFACES,
                             "--rules", str(rules), "--keep"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait(lambda: os.path.exists(stats_file(lab)) or proc.poll() is not None, timeout=120)
        proc.send_signal(signal.SIGINT)                       # Ctrl-C
        _, err = proc.communicate(timeout=30)
        assert "engine stopped; hybrid stays attached (--keep)" in err and "Traceback" not in err
        st = status(lab)
        assert st["attached"] is True and all(e["tc_attached"] for e in st["interfaces"].values())
        assert lab.ping("client", lab.info.server.ipv4)       # fail-open: no engine, traffic flows
    finally:
        if proc.poll() is None:
            _stop(proc)
        hctl(lab, "detach", "--all")


# -- reject resets both ends ---------------------------------------------------------------------

REJECT_BOTH_RULES = ('default = "accept"\ndefault_flow = "none"\n'
                     '[[rule]]\nname = "block-sni"\nproto = "tcp"\ntls_sni = "*.blocked.test"\n'
                     'action = "reject"\nflow = "block"\nttl = 30\n'
                     '[[rule]]\nname = "block-host"\nproto = "tcp"\nhttp_host = ".blocked.test"\n'
                     'action = "reject"\nflow = "block"\nttl = 30\n')


def established_from(lab, client: str, sport: int) -> list[str]:
    """The server's ESTABLISHED connections from ``client`` to local port ``sport``."""
    out = lab.run("server", ["ss", "-Htn", "state", "established", f"( sport = :{sport} )"]).stdout
    return [ln for ln in out.splitlines() if client in ln]


def no_established_from(lab, client: str, sport: int, timeout: float = 3.0) -> list[str]:
    """Poll briefly until the server holds no ESTABLISHED connection from ``client``; the ones it
    still holds at the end (empty when the reset arrived)."""
    deadline = time.monotonic() + timeout
    while (left := established_from(lab, client, sport)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@contextlib.contextmanager
def openssl_s_server(lab, tmp_path, port: int):
    """``openssl s_server -www`` in the server namespace: one connection at a time, so a
    half-open connection it waits on stops it from answering anyone else."""
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=www.example.test"],
                   check=True, capture_output=True, timeout=30)
    log = open(tmp_path / "s_server.log", "wb")
    proc = lab.popen("server", ["openssl", "s_server", "-accept", str(port), "-cert", cert, "-key", key, "-www"],
                     stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        _wait(lambda: proc.poll() is not None or bool(lab.run(
            "server", ["ss", "-Hltn", f"sport = :{port}"]).stdout.strip()))
        assert proc.poll() is None, (tmp_path / "s_server.log").read_text()
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


