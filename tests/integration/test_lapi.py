"""hybrid.fleet.lapi against a real CrowdSec Local API (Debian's crowdsec 1.4.6, hybrid/lab/crowdsec.py):
the decision stream (snapshot, deltas after cscli adds and deletes, expiry, filters), a revoked
key, a LAPI killed (also in the middle of an answer) and restarted, a machine's alerts reaching a
bouncer, HTTPS with a CA file, a 10,000-decision flood in one delta; and, from a small
adversarial server, what the client makes of answers no LAPI should give (truncated, not HTTP,
echoing the key, never finishing). Secrets never reach a message or a log line.

Traffic stays in a lab: the LAPI (and the adversarial server) listen on the lab server's address
in its namespace; every test runs with its thread in the gateway's namespace, where a bouncer
would run, so the client crosses the lab's link to reach them."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time

import pytest
from hybrid.lab.crowdsec import Lapi, decision_values, missing

from hybrid.fleet.lapi import Alert, LapiClient, LapiError
from hybrid.lab.topology import netns

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(missing() is not None, reason=missing() or "")]

FOUR_H = 4 * 3600


@pytest.fixture(autouse=True)
def from_gw(lab):
    """The test's thread (and so every socket the client opens) in the lab gateway's namespace."""
    with netns(lab.netns("gw")):
        yield


def lab_lapi(lab, **kw) -> Lapi:
    return Lapi(netns=lab.netns("server"), host=kw.pop("host", lab.info.server.ipv4), **kw)


@pytest.fixture
def lapi(lab):
    with lab_lapi(lab) as lapi:
        yield lapi


@pytest.fixture
def secrets_seen(caplog):
    """Every secret a test hands out; at teardown none may be in a log record of the library."""
    seen: list[str] = []
    caplog.set_level(logging.DEBUG, logger="hybrid.fleet.lapi")
    yield seen
    text = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    for s in seen:
        assert s not in text


def bouncer(lapi, seen, name="gw-a", **kw) -> tuple[LapiClient, str]:
    key = lapi.add_bouncer(name)
    seen.append(key)
    return LapiClient(lapi.url, api_key=key, **kw), key


def machine(lapi, seen, name="gw-m", **kw) -> LapiClient:
    mid, password = lapi.add_machine(name)
    seen.append(password)
    return LapiClient(lapi.url, machine_id=mid, password=password, **kw)


def failure(call, kind: str, seen=()) -> LapiError:
    with pytest.raises(LapiError) as exc:
        call()
    err = exc.value
    text = str(err)
    assert err.kind == kind, text
    assert "\n" not in text and "Traceback" not in text
    for s in seen:
        assert s not in text and s not in repr(err)
    return err


def values(decisions) -> set[str]:
    return {d.value for d in decisions}


# -- the stream ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", [4, 6])
def test_snapshot_then_deltas_after_cscli_add_and_delete(lab, secrets_seen, family):
    with lab_lapi(lab, host=lab.info.server.ipv4 if family == 4 else lab.info.server.ipv6) as lapi:
        snapshot_then_deltas(lapi, secrets_seen)


def snapshot_then_deltas(lapi, secrets_seen):
    client, _ = bouncer(lapi, secrets_seen)
    empty = client.stream(startup=True)
    assert (empty.new, empty.deleted, empty.bad) == ([], [], [])

    lapi.add_decision("198.18.0.5", duration="1h", reason="test-one")
    lapi.add_decision("2001:2:0:1::/64", duration="4h")
    delta = client.stream(startup=False)
    assert delta.deleted == [] and delta.bad == []
    by_value = {d.value: d for d in delta.new}
    assert set(by_value) == {"198.18.0.5", "2001:2:0:1::/64"}
    one, net = by_value["198.18.0.5"], by_value["2001:2:0:1::/64"]
    assert (one.origin, one.type, one.scope, one.scenario, one.family, one.prefixlen) == \
        ("cscli", "ban", "Ip", "test-one", 4, 32)
    assert (net.scope, net.family, net.prefixlen, str(net.network)) == ("Range", 6, 64, "2001:2:0:1::/64")
    assert 3600 - 120 < one.duration_s <= 3600 and FOUR_H - 120 < net.duration_s <= FOUR_H
    # the oracle: cscli's own view of the same decisions
    assert {(d["id"], d["value"]) for d in lapi.decisions()} == {(d.id, d.value) for d in delta.new}

    again = client.stream(startup=False)
    assert again.new == []

    lapi.delete_decision(value="198.18.0.5")
    gone = client.stream(startup=False)
    assert gone.new == [] and [(d.id, d.value) for d in gone.deleted] == [(one.id, "198.18.0.5")]
    assert gone.deleted[0].duration_s <= 0

    snap = client.stream(startup=True)
    assert [d.id for d in snap.new] == [net.id]
    assert one.id in {d.id for d in snap.deleted}            # startup lists expired ones too
    assert {d["id"] for d in lapi.decisions()} == {net.id}


def test_expired_decision_shows_up_as_deleted(lapi, secrets_seen):
    client, _ = bouncer(lapi, secrets_seen)
    client.stream(startup=True)
    lapi.add_decision("198.18.0.7", duration="2s")
    first = client.stream(startup=False)
    assert values(first.new) == {"198.18.0.7"}
    deadline = time.monotonic() + 30
    while True:
        delta = client.stream(startup=False)
        assert delta.new == []
        if delta.deleted:
            break
        assert time.monotonic() < deadline, "the expired decision never showed up as deleted"
        time.sleep(0.5)
    [d] = delta.deleted
    assert (d.id, d.value, d.type) == (first.new[0].id, "198.18.0.7", "ban") and d.duration_s < 0


def test_one_decision_per_value_and_type_and_deletes_that_repeat(lapi, secrets_seen):
    """What a bouncer must cope with (LAPI 1.4.6): the stream shows only the longest decision
    per (value, scope, type); deleting it while a shorter one remains changes no delta (the
    value stays banned; the shorter one's expiry comes as a delete later); a delete is repeated
    in the deltas of the next 2 s, also for a decision the bouncer never saw; decisions of two
    types on one value are two entries."""
    client, _ = bouncer(lapi, secrets_seen)
    client.stream(startup=True)
    lapi.add_decision("198.18.7.1", duration="1h")
    lapi.add_decision("198.18.7.1", duration="4h")
    [shown] = client.stream(startup=False).new
    assert shown.value == "198.18.7.1" and shown.duration_s > 3600
    assert sorted(d["duration"][:2] for d in lapi.decisions()) == ["3h", "59"]
    lapi.delete_decision(id=shown.id)
    quiet = client.stream(startup=False)
    assert (quiet.new, quiet.deleted) == ([], [])
    [left] = client.stream(startup=True).new
    assert left.value == "198.18.7.1" and left.id != shown.id and left.duration_s <= 3600

    lapi.add_decision("198.18.7.2", duration="1h")
    lapi.delete_decision(value="198.18.7.2")
    first, second = client.stream(startup=False), client.stream(startup=False)
    assert first.new == second.new == []
    assert values(first.deleted) == values(second.deleted) == {"198.18.7.2"}

    lapi.add_decision("198.18.7.3", type="captcha")
    lapi.add_decision("198.18.7.3", type="ban")
    assert sorted((d.value, d.type) for d in client.stream(startup=False).new) == \
        [("198.18.7.3", "ban"), ("198.18.7.3", "captcha")]


def test_scope_origin_and_scenario_filters(lapi, secrets_seen):
    client, _ = bouncer(lapi, secrets_seen)
    lapi.add_decision("198.18.1.1", reason="ssh-bf")
    lapi.add_decision("198.18.2.0/24", reason="http-probing")
    lapi.add_decision("bob", scope="username", reason="ssh-bf")
    lapi.add_decision("198.18.1.2", type="captcha")
    pusher = machine(lapi, secrets_seen)
    pusher.push_alerts([Alert("2001:2::9", 600, "hybrid/block-evil")])

    def pulled(**kw):
        return values(client.stream(startup=True, **kw).new)

    assert pulled() == {"198.18.1.1", "198.18.2.0/24", "198.18.1.2", "2001:2::9"}      # LAPI default: ip,range
    assert pulled(scopes=None) == pulled()
    assert pulled(scopes=["ip"]) == {"198.18.1.1", "198.18.1.2", "2001:2::9"}
    assert pulled(scopes=["range"]) == {"198.18.2.0/24"}
    assert pulled(scopes=["Range"]) == {"198.18.2.0/24"}
    assert pulled(scopes=["ip", "range", "username"]) == pulled() | {"bob"}
    assert pulled(origins=["hybrid"]) == {"2001:2::9"}
    assert pulled(origins=["cscli", "hybrid"]) == pulled()
    assert pulled(scenarios_containing=["ssh-bf"]) == {"198.18.1.1"}
    assert pulled(scenarios_not_containing=["ssh", "hybrid/"]) == {"198.18.2.0/24", "198.18.1.2"}
    [user] = [d for d in client.stream(startup=True, scopes=["username"]).new]
    assert (user.scope, user.value, user.packed, user.family) == ("username", "bob", b"", None)


def test_revoked_key_is_an_auth_error(lapi, secrets_seen):
    client, key = bouncer(lapi, secrets_seen)
    client.stream(startup=True)
    lapi.delete_bouncer("gw-a")
    err = failure(lambda: client.stream(startup=False), "auth", secrets_seen)
    assert err.status == 403 and "check the key file" in str(err)
    wrong = LapiClient(lapi.url, api_key="0" * 32)
    failure(lambda: wrong.stream(startup=True), "auth")


def test_killed_lapi_is_unreachable_and_a_restart_works_again(lapi, secrets_seen):
    client, _ = bouncer(lapi, secrets_seen)
    lapi.add_decision("198.18.3.3")
    before = client.stream(startup=True)
    lapi.kill()
    err = failure(lambda: client.stream(startup=False), "unreachable", secrets_seen)
    assert "refused" in str(err) and lapi.url in str(err)
    lapi.start()
    after = client.stream(startup=True)
    assert [(d.id, d.value) for d in after.new] == [(d.id, d.value) for d in before.new]
    lapi.add_decision("198.18.3.4")
    assert values(client.stream(startup=False).new) == {"198.18.3.4"}


# -- the machine side ----------------------------------------------------------------------------

def test_pushed_alerts_reach_a_bouncer_with_origin_hybrid(lapi, secrets_seen):
    client, _ = bouncer(lapi, secrets_seen)
    client.stream(startup=True)
    pusher = machine(lapi, secrets_seen)
    pusher.login(["hybrid/block-evil"])
    alerts = [Alert("198.18.9.9", 3600, "hybrid/block-evil", message="engine blocked 198.18.9.9"),
              Alert("198.18.10.0/24", 1800, "hybrid/block-range"),
              Alert("2001:2:0:9::/64", 600, "hybrid/block-range"),
              Alert("2001:2::99/128", 900, "hybrid/block-evil", origin="gw-a")]
    ids = pusher.push_alerts(alerts)
    assert len(ids) == 4 and len(set(ids)) == 4 and all(i > 0 for i in ids)
    got = {d.value: d for d in client.stream(startup=False).new}
    assert {v: (d.origin, d.scope, d.type, d.scenario) for v, d in got.items()} == {
        "198.18.9.9": ("hybrid", "Ip", "ban", "hybrid/block-evil"),
        "198.18.10.0/24": ("hybrid", "Range", "ban", "hybrid/block-range"),
        "2001:2:0:9::/64": ("hybrid", "Range", "ban", "hybrid/block-range"),
        "2001:2::99": ("gw-a", "Ip", "ban", "hybrid/block-evil"),     # /128 sent as an Ip
    }
    for a in alerts:
        d = got[a.to_json()["source"]["value"]]
        assert a.duration_s - 60 < d.duration_s <= a.duration_s
    assert {d["value"] for d in lapi.decisions()} == set(got)


def test_wrong_password_and_unknown_machine_are_auth_errors(lapi, secrets_seen):
    mid, password = lapi.add_machine("gw-m")
    secrets_seen.append(password)
    bad = LapiClient(lapi.url, machine_id=mid, password=password[::-1])
    secrets_seen.append(password[::-1])
    err = failure(lambda: bad.login(), "auth", secrets_seen)
    assert err.status == 401 and "'gw-m' was refused" in str(err)
    nobody = LapiClient(lapi.url, machine_id="nobody", password=password)
    failure(lambda: nobody.push_alerts([Alert("198.18.0.1", 60, "hybrid/r")]), "auth", secrets_seen)


def requests_in_log(lapi, what: str, expect: int) -> int:
    """How many of the LAPI's log lines of requests made by hybrid (not cscli's) contain
    ``what``, once there are ``expect`` (the LAPI logs a request after answering it: wait up to
    5 s for the line) or more."""
    deadline = time.monotonic() + 5
    while True:
        with open(lapi.log_file) as f:
            n = sum(1 for line in f if what in line and '"hybrid/' in line)
        if n >= expect or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


def test_token_is_renewed_after_a_restart_and_before_it_expires(lapi, secrets_seen):
    client, _ = bouncer(lapi, secrets_seen)
    client.stream(startup=True)
    pusher = machine(lapi, secrets_seen)
    pusher.push_alerts([Alert("198.18.5.1", 600, "hybrid/r")])
    secrets_seen.append(pusher._token)
    assert requests_in_log(lapi, "POST /v1/watchers/login HTTP/1.1 200", 1) == 1
    assert requests_in_log(lapi, "POST /v1/alerts HTTP/1.1 201", 1) == 1
    lapi.restart()                                 # a new JWT secret: the old token is refused
    pusher.push_alerts([Alert("198.18.5.2", 600, "hybrid/r")])
    assert requests_in_log(lapi, "POST /v1/alerts HTTP/1.1 401", 1) == 1
    assert requests_in_log(lapi, "POST /v1/watchers/login HTTP/1.1 200", 2) == 2
    pusher._token_expires = time.time() + 30       # expires within the margin: log in first
    pusher.push_alerts([Alert("198.18.5.3", 600, "hybrid/r")])
    assert requests_in_log(lapi, "POST /v1/alerts HTTP/1.1 201", 3) == 3
    assert requests_in_log(lapi, "POST /v1/watchers/login HTTP/1.1 200", 3) == 3
    assert requests_in_log(lapi, "POST /v1/alerts HTTP/1.1 401", 1) == 1
    assert values(client.stream(startup=False).new) == {"198.18.5.1", "198.18.5.2", "198.18.5.3"}


# -- HTTPS ---------------------------------------------------------------------------------------

def test_https_with_a_ca_file(lab):
    with lab_lapi(lab, tls=True) as lapi:
        key = lapi.add_bouncer("gw-tls")
        assert lapi.url.startswith("https://")
        lapi.add_decision("198.18.6.6")
        good = LapiClient(lapi.url, api_key=key, ca_file=lapi.ca_file)
        assert values(good.stream(startup=True).new) == {"198.18.6.6"}
        err = failure(lambda: LapiClient(lapi.url, api_key=key).stream(startup=True), "auth", [key])
        assert "not trusted" in str(err) and "CA file" in str(err)
        plain = lapi.url.replace("https://", "http://")
        err = failure(lambda: LapiClient(plain, api_key=key).stream(startup=True), "protocol", [key])
        assert "write https://" in str(err)
    with lab_lapi(lab) as lapi:
        key = lapi.add_bouncer("gw-plain")
        tls_to_plain = LapiClient(lapi.url.replace("http://", "https://"), api_key=key)
        err = failure(lambda: tls_to_plain.stream(startup=True), "protocol", [key])
        assert "does it serve https?" in str(err)


# -- a flood, and a LAPI killed in the middle of an answer ---------------------------------------

def established_to(ip: str, port: int) -> bool:
    """Some TCP connection of this thread's namespace to ip:port is established."""
    want = f"{socket.inet_aton(ip)[::-1].hex().upper()}:{port:04X}"
    with open("/proc/thread-self/net/tcp") as f:
        return any(line.split()[2] == want and line.split()[3] == "01" for line in list(f)[1:])


def test_flood_of_10000_in_one_delta_and_a_kill_mid_answer(lab, lapi, secrets_seen, record_property):
    client, _ = bouncer(lapi, secrets_seen)
    client.stream(startup=True)
    flood = lapi.flood(10_000)
    t0 = time.perf_counter()
    delta = client.stream(startup=False)
    pull_s = time.perf_counter() - t0
    assert len(delta.new) == 10_000 and values(delta.new) == set(flood) and delta.bad == []
    assert {d.origin for d in delta.new} == {"cscli-import"}
    record_property("flood_10k_delta", f"{delta.size} bytes in {pull_s:.3f}s")
    print(f"\n10,000-decision delta: {delta.size} bytes in {pull_s:.3f}s")
    assert client.stream(startup=False).new == []

    # 30,000 decisions: the LAPI computes a snapshot for a second or two before answering; kill
    # it (SIGKILL) once the client's connection is established, while the client waits.
    lapi.flood(20_000, offset=10_000)
    outcome: list = []
    puller = threading.Thread(target=lambda: outcome.append(_catch(lambda: client.stream(startup=True))))
    puller.start()
    deadline = time.monotonic() + 10
    while not established_to(lapi.host, lapi.port) and time.monotonic() < deadline:
        time.sleep(0.001)
    lapi.kill()
    puller.join(30)
    [err] = outcome
    assert isinstance(err, LapiError), f"the pull finished before the kill: {err!r}"
    assert err.kind == "unreachable" and "closed the connection" in str(err)
    lapi.start()
    snap = client.stream(startup=True)
    assert len(snap.new) == 30_000 and values(snap.new) == set(decision_values(30_000))


def _catch(call):
    try:
        return call()
    except Exception as exc:       # the thread hands the failure to the test
        return exc


# -- answers no LAPI should give: a small server on loopback -------------------------------------

class RawServer:
    """Answers each connection to the lab server's address with ``reply(request_bytes, conn)``
    (bytes to send, or None when reply wrote itself); closes afterwards."""

    def __init__(self, lab, reply):
        self.reply = reply
        with netns(lab.netns("server")):
            self.sock = socket.socket()
        self.sock.bind((lab.info.server.ipv4, 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{lab.info.server.ipv4}:{self.port}"
        self.requests: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                with contextlib.suppress(OSError):
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    head, _, rest = data.partition(b"\r\n\r\n")
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            n = int(line.split(b":")[1])
                            while len(rest) < n and (chunk := conn.recv(65536)):
                                rest += chunk
                    data = head + b"\r\n\r\n" + rest
                self.requests.append(data)
                with contextlib.suppress(OSError):
                    out = self.reply(data, conn)
                    if out:
                        conn.sendall(out)

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@contextlib.contextmanager
def raw_server(lab, reply):
    server = RawServer(lab, reply)
    try:
        yield server
    finally:
        server.close()


def http(status: str, body: bytes, extra: bytes = b"") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode()
            + extra + b"\r\n" + body)


KEY = "5f1e0c0ffee0ddba11c0ffee0ddba11c"
PASSWORD = "pw-4f1b2c3d4e5f60718293a4b5c6d7e8f9"


@pytest.mark.parametrize("reply, kind, says", [
    (lambda req, c: http("200 OK", b'{"new":null,"deleted":null}')[:-10], "unreachable", "closed the connection"),
    (lambda req, c: b"SSH-2.0-OpenSSH_9.2\r\n", "protocol", "did not answer HTTP"),
    (lambda req, c: http("200 OK", b"<html>captive portal</html>"), "protocol", "is not JSON"),
    (lambda req, c: http("200 OK", b'{"new":null,"deleted":null,"echo":"' + req.replace(b"\r\n", b" ") + b'"}'),
     "protocol", "contains this bouncer's API key"),
    (lambda req, c: http("403 Forbidden", b'{"message":"bad key ' + KEY.encode() + b'"}'), "auth", "(LAPI: 'bad key ***')"),
    (lambda req, c: http("500 Internal Server Error", b'{"message":"database is locked"}'), "server",
     "the LAPI failed (HTTP 500) (LAPI: 'database is locked')"),
    (lambda req, c: http("502 Bad Gateway", b"<html>" + b"x" * 10_000 + KEY.encode() + b"</html>"), "server", "HTTP 502"),
    (lambda req, c: http("404 Not Found", b"404 page not found"), "protocol", "has no CrowdSec LAPI v1"),
    (lambda req, c: http("200 OK", b"", b"Content-Length: 999999999\r\n").replace(b"Content-Length: 0\r\n", b""),
     "protocol", "more than the"),
    (lambda req, c: b"", "unreachable", "closed the connection"),
])
def test_answers_no_lapi_should_give(lab, reply, kind, says, caplog):
    caplog.set_level(logging.DEBUG, logger="hybrid.fleet.lapi")
    with raw_server(lab, reply) as server:
        client = LapiClient(server.url, api_key=KEY, timeout=2, max_answer=1 << 20)
        err = failure(lambda: client.stream(startup=True), kind, [KEY])
        assert says in str(err), str(err)
        assert len(str(err)) < 400
        [req] = server.requests
        assert KEY.encode() in req and b"GET /v1/decisions/stream?startup=true&scopes=ip%2Crange " in req
    assert all(KEY not in r.getMessage() for r in caplog.records)


def test_a_server_that_never_answers_or_trickles(lab, caplog):
    caplog.set_level(logging.DEBUG, logger="hybrid.fleet.lapi")
    hold = threading.Event()

    def silent(req, conn):
        hold.wait(10)

    with raw_server(lab, silent) as server:
        client = LapiClient(server.url, api_key=KEY, timeout=0.3, answer_timeout=0.5)
        err = failure(lambda: client.stream(startup=True), "unreachable", [KEY])
        assert "did not answer within 0.5s" in str(err)
        hold.set()

    body = b'{"new":null,"deleted":null}' + b" " * 1000
    sent = []

    def trickle(req, conn):
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        for byte in body:
            if hold.is_set():
                return
            conn.sendall(bytes([byte]))
            sent.append(byte)
            time.sleep(0.05)

    hold.clear()
    with raw_server(lab, trickle) as server:
        client = LapiClient(server.url, api_key=KEY, timeout=1, answer_timeout=1, deadline=1.5)
        err = failure(lambda: client.stream(startup=True), "unreachable", [KEY])
        assert "did not finish answering within 1.5s" in str(err)
        hold.set()
    assert 0 < len(sent) < len(body)          # the client hung up before the end, not after it


def test_push_alerts_against_a_server_refusing_every_token(lab):
    def reply(req, conn):
        if req.startswith(b"POST /v1/watchers/login"):
            return http("200 OK", b'{"code":200,"expire":"2999-01-01T00:00:00Z","token":"tok-' + KEY.encode() + b'"}')
        return http("401 Unauthorized", b'{"code":401,"message":"token tok-' + KEY.encode() + b' is expired"}')

    with raw_server(lab, reply) as server:
        client = LapiClient(server.url, machine_id="gw-m", password=PASSWORD, timeout=2)
        err = failure(lambda: client.push_alerts([Alert("198.18.0.1", 60, "hybrid/r")]), "auth",
                      [PASSWORD, "tok-" + KEY])
        assert "token was refused after a fresh login" in str(err)
        # login, refused push, login again, refused again: then give up
        assert [r.split(b" ")[1] for r in server.requests] == [b"/v1/watchers/login", b"/v1/alerts"] * 2
        assert all(b"Bearer tok-" in r for r in server.requests[1::2])
        assert b'"password": "' + PASSWORD.encode() + b'"' in server.requests[0]


@pytest.mark.parametrize("answer, says", [
    (b'{"code":200}', "no token and expiry"),
    (b'{"code":200,"expire":"soon","token":"t"}', "no token and expiry"),
    (b'{"code":200,"expire":"2999-01-01T00:00:00Z","token":"t\\nX-Evil: 1"}', "not printable ASCII"),
    (b"[]", "no token and expiry"),
])
def test_garbage_login_answers(lab, answer, says):
    with raw_server(lab, lambda req, c: http("200 OK", answer)) as server:
        client = LapiClient(server.url, machine_id="gw-m", password=PASSWORD, timeout=2)
        err = failure(client.login, "protocol", [PASSWORD])
        assert says in str(err)


def test_closed_port(lab):
    with netns(lab.netns("server")):
        s = socket.socket()
    with s:
        s.bind((lab.info.server.ipv4, 0))          # bound, not listening: the port is closed
        url = f"http://{lab.info.server.ipv4}:{s.getsockname()[1]}"
        err = failure(lambda: LapiClient(url, api_key=KEY).stream(True), "unreachable", [KEY])
    assert "refused" in str(err)
