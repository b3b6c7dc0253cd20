"""The lab's real servers (hybrid/labservers.py): HTTPS with a verifiable throwaway certificate,
DNS over UDP and TCP, a UDP sink that keeps exact bytes, and nothing left after each one."""

import os
import subprocess

import pytest

from hybrid.errors import HybridError
from hybrid.lab.servers import Dns, Nginx, UdpSink, udp_send_from_client

pytestmark = pytest.mark.integration


def netns_pids(lab, role):
    out = subprocess.run(["ip", "netns", "pids", lab.netns(role)], capture_output=True, text=True, check=True)
    return out.stdout.split()


def listening(lab, role, port):
    return (lab.run(role, ["ss", "-Hltn", f"sport = :{port}"]).stdout.strip()
            + lab.run(role, ["ss", "-Hlun", f"sport = :{port}"]).stdout.strip())


def assert_gone(lab, server, port):
    assert netns_pids(lab, server.role) == []
    assert not os.path.exists(server.dir)
    assert listening(lab, server.role, port) == ""


def dig(lab, *args):
    proc = lab.run("client", ["dig", f"@{lab.info.server.ipv4}", "+time=2", "+tries=1", *args], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_https_verifies_with_throwaway_cert(lab, family):
    addr = getattr(lab.info.server, family)
    with Nginx(lab, tls_port=443, server_names=("example.test", "www.example.test")) as web:
        resolve = f"[{addr}]" if family == "ipv6" else addr
        for name in web.server_names:
            proc = lab.run("client", ["curl", "-sS", "-m", "5", "--cacert", web.cert,
                                      "--resolve", f"{name}:443:{resolve}", f"https://{name}/"], check=False)
            assert (proc.returncode, proc.stdout) == (0, Nginx.INDEX), proc.stderr
        # The certificate really is checked: a name it does not carry fails verification.
        bad = lab.run("client", ["curl", "-sS", "-m", "5", "--cacert", web.cert,
                                 "--resolve", f"other.test:443:{resolve}", "https://other.test/"], check=False)
        assert bad.returncode == 60, bad.stderr   # CURLE_PEER_FAILED_VERIFICATION
        # Plain HTTP still works alongside.
        plain = lab.run("client", ["curl", "-sS", "-m", "5", f"http://{resolve}/"]).stdout
        assert plain == Nginx.INDEX
    assert_gone(lab, web, 443)


def test_dns_answers_names_nxdomain_and_tcp(lab):
    records = {"example.test": "198.18.2.2", "six.example.test": ["2001:2:0:2::2", "198.18.2.3"]}
    with Dns(lab, records=records) as dns:
        assert dig(lab, "example.test", "A", "+short").split() == ["198.18.2.2"]
        assert dig(lab, "six.example.test", "AAAA", "+short").split() == ["2001:2:0:2::2"]
        assert dig(lab, "six.example.test", "A", "+short").split() == ["198.18.2.3"]
        assert "status: NXDOMAIN" in dig(lab, "unknown.test", "A")
        nodata = dig(lab, "example.test", "AAAA")
        assert "status: NOERROR" in nodata and "ANSWER: 0" in nodata
        assert dig(lab, "+tcp", "example.test", "A", "+short").split() == ["198.18.2.2"]
        v6 = lab.run("client", ["dig", f"@{lab.info.server.ipv6}", "+time=2", "+tries=1", "+short",
                                "example.test", "A"]).stdout
        assert v6.split() == ["198.18.2.2"]
        with open(dns.log) as f:
            log = f.read()
        assert "query[A] example.test from 198.18.1.2" in log
    assert_gone(lab, dns, 53)


def test_dns_bad_record_is_refused(lab):
    with pytest.raises(HybridError, match="does not appear to be an IPv4 or IPv6 address"):
        Dns(lab, records={"example.test": "not-an-address"})


def test_udp_sink_keeps_exact_bytes(lab):
    payloads = [bytes(range(256)), b"\x00" * 1400, b"hello", b""]
    with UdpSink(lab, port=9999) as sink:
        for p in payloads:
            sport = udp_send_from_client(lab, p, 9999, sport=40001)
            assert sport == 40001
        udp_send_from_client(lab, b"over six", 9999, ipv6=True)
        got = sink.wait(len(payloads) + 1)
        assert got == [*payloads, b"over six"]
        assert (sink.received[0].src, sink.received[0].sport) == (lab.info.client.ipv4, 40001)
        assert sink.received[-1].src == lab.info.client.ipv6
        with pytest.raises(HybridError, match="5 of 6"):
            sink.wait(6, timeout=0.2)
    assert listening(lab, "server", 9999) == ""


def test_failed_start_leaves_nothing(lab):
    # Port 53 is taken by a first server: the second one's dnsmasq exits, and that is reported
    # at once with its own error line, its temp dir removed.
    with Dns(lab) as first:
        second = Dns(lab)
        with pytest.raises(HybridError, match="dnsmasq exited with status 2 .*Address already in use"):
            with second:
                pass
        assert not os.path.exists(second.dir)
        assert netns_pids(lab, "server") == [str(first.proc.pid)]
    assert_gone(lab, first, 53)
