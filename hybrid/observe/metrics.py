"""A Prometheus endpoint for the hybrid instance of this network namespace.

``serve_metrics_unix(path)`` (what ``hybridctl run`` does by default) or ``serve_metrics(host,
port)`` starts a thread in the calling process that answers ``GET /metrics`` in the Prometheus
text format: the kernel counters per interface and per flag reason from the pinned maps, the
flows in the table by verdict, the netfilter queue's own counters, and what the engines publish
in their stats files (packets, actions, flow verdicts, per-rule verdict counts, and a histogram
of the per-packet decision time).

The figures name flows and rules, which the rest of hybrid keeps root-only, and reading them
walks the flow table and runs iptables-save, so the endpoint guards both:

- who: a Unix socket is 0600 root (0660 with a group); over TCP, a bearer token when one is
  given, compared in constant time (the configuration requires one beyond loopback);
- how much: a snapshot is read at most once per second (:class:`SnapshotCache`; scrapes in
  between share it), at most ``max_concurrent`` requests are handled at once (more are answered
  503 at once), and a request must arrive within ``request_timeout`` seconds, whole;
- what was refused: ``hybrid_metrics_refused_total{reason}``.

The instance is the network namespace's of the calling process, fixed when the server starts;
the endpoint works before hybrid is attached and across re-attaches (``hybrid_attached`` says
which).
"""

from __future__ import annotations

import contextlib
import errno as _errno
import grp
import hmac
import io
import logging
import os
import socket
import socketserver
import stat
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from hybrid import instance as inst
from hybrid.errors import ConfigError, HybridError
from hybrid.observe import views

log = logging.getLogger(__name__)

CACHE_SECONDS = 1.0       # a snapshot serves the scrapes of this long
MAX_CONCURRENT = 4        # requests handled at once; more are answered 503
REQUEST_TIMEOUT = 5.0     # seconds for a request's whole head to arrive (and for each write of the answer)
MAX_HEAD = 8192           # bytes of request line and headers
BUSY_READ_S = 0.05        # how long the accepting thread waits for a refused request's bytes

UNREGISTERED = "(unregistered)"   # interface label of packets on interfaces hybrid did not register

# kernel counter -> help text; counters not listed (new ones) still appear, with a generic help.
_KERNEL_HELP = {
    "cache_passed": "First payloads passed on a decision of the name cache (no engine round trip).",
    "cache_dropped": "First payloads dropped on a decision of the name cache.",
    "cache_miss": "Names read with no entry of the current rules in the name cache (to the engine).",
    "cache_expired": "Names whose cache entry had expired (deleted; to the engine).",
    "cache_refused": "Names with an entry, in packets the engine would doubt (to the engine).",
    "cache_lost": "Name-cache decisions whose report found the ring buffer full.",
    "names_no_prog": "First payloads whose parser program was missing (to the engine).",
    "xdp_packets": "Packets seen by the XDP program.",
    "xdp_drop_flow": "Packets dropped at XDP: their flow is in BLOCK.",
    "xdp_drop_prefix": "Packets dropped at XDP: a blocked prefix.",
    "xdp_drop_ban": "Packets dropped at XDP: source or destination in a live ban (the fleet's bans).",
    "packets": "Packets seen by the tc program (every outcome below adds up to this).",
    "not_ip": "Packets that are not IPv4/IPv6 (passed).",
    "malformed_l3": "Packets with an unparseable IP header (passed unflagged).",
    "flagged": "Packets marked for the verdict engine.",
    "bypassed": "Packets of flows in BYPASS (kept in the kernel).",
    "passed": "Packets passed unflagged (no reason to queue them).",
    "drop_tc_flow": "Packets dropped at tc: their flow is in BLOCK.",
    "drop_tc_prefix": "Packets dropped at tc: a blocked prefix.",
    "drop_tc_ban": "Packets dropped at tc: source or destination in a live ban (the fleet's bans).",
    "flow_new": "Flows created in the flow table.",
    "flow_full": "Flows that could not be inserted (table full).",
    "verdict_expired": "Flow verdicts that expired and reverted to none.",
}


class SnapshotCache:
    """The instance's last snapshot, reused for ``seconds``: however many scrapes arrive, at once
    or back to back, the instance is read (the flow table walked, the queue rule's counters
    read) at most once per ``seconds``. One thread reads while the others wait for its result.
    ``reads`` counts the reads; ``clock`` is for tests."""

    def __init__(self, read: Callable[[], Any], seconds: float = CACHE_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self._read, self.seconds, self._clock = read, seconds, clock
        self._lock = threading.Lock()
        self._value: Any = None
        self._at: float | None = None      # clock() when the value was read
        self.reads = 0

    def get(self) -> Any:
        with self._lock:
            if self._at is None or self._clock() - self._at >= self.seconds:
                self.reads += 1
                self._value = self._read()
                self._at = self._clock()   # after the read: a slow read does not shorten the pause
            return self._value


REFUSALS = ("unauthorized", "busy", "timeout")


class InstanceCollector:
    """prometheus_client collector: the instance's snapshot (cached, :class:`SnapshotCache`) and
    the endpoint's own counters."""

    def __init__(self, instance: str, *, cache_seconds: float = CACHE_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.instance = instance
        self.scrape_errors = 0
        self.cache = SnapshotCache(self._read, cache_seconds, clock)
        self.refused = dict.fromkeys(REFUSALS, 0)
        self._refused_lock = threading.Lock()

    def count_refused(self, reason: str) -> None:
        with self._refused_lock:
            self.refused[reason] += 1

    def describe(self) -> list:
        return []       # nothing to read at registration time

    def _read(self) -> dict | None:
        try:
            return views.snapshot(self.instance)
        except HybridError as exc:   # detached mid-scrape, maps of another version, ...
            self.scrape_errors += 1
            log.warning("metrics: reading instance %s failed: %s", self.instance, exc)
            return None

    def collect(self) -> Iterator:
        snap = self.cache.get()
        up = GaugeMetricFamily("hybrid_attached", "1 when hybrid is attached in this network namespace.",
                               labels=["instance"])
        up.add_metric([self.instance], 1 if snap and snap["attached"] else 0)
        yield up
        errs = CounterMetricFamily("hybrid_metrics_scrape_errors", "Reads of the instance that failed.")
        errs.add_metric([], self.scrape_errors)
        yield errs
        yield CounterMetricFamily("hybrid_metrics_snapshots",
                                  f"Reads of the instance (scrapes within {self.cache.seconds:g} s share one).",
                                  value=self.cache.reads)
        refused = CounterMetricFamily("hybrid_metrics_refused",
                                      "Requests refused: unauthorized (no or wrong bearer token), busy (over "
                                      "the limit of concurrent requests, 503), timeout (no request in time).",
                                      labels=["reason"])
        with self._refused_lock:
            for reason, n in self.refused.items():
                refused.add_metric([reason], n)
        yield refused
        if snap is None:
            return
        yield from _kernel(snap)
        yield from _flows(snap)
        yield from _queues(snap)
        yield from _engines(snap)
        yield from _fail_open(snap)
        yield from _crowdsec(snap.get("crowdsec"))


def _crowdsec(cs: dict | None) -> Iterator:
    """The CrowdSec link (hybrid/fleet/link.py), when ``hybridctl run`` has one."""
    if not cs:
        return
    up = GaugeMetricFamily("hybrid_crowdsec_connected", "1 while the last request to the CrowdSec Local API "
                           "succeeded (0: down, the kernel keeps its bans until they expire).")
    up.add_metric([], 1 if cs.get("alive") and cs.get("connected") else 0)
    yield up
    if cs.get("last_pull"):
        yield GaugeMetricFamily("hybrid_crowdsec_last_pull_timestamp_seconds",
                                "When the decision stream was last pulled (Unix time).", value=cs["last_pull"])
    b, sh = cs.get("bouncer"), cs.get("share")
    if b is not None:
        dec = GaugeMetricFamily("hybrid_crowdsec_decisions", "Decisions enforced in the kernel, by origin and scope.",
                                labels=["origin", "scope"])
        for key, n in b["applied"].items():
            origin, _, scope = key.rpartition("/")
            dec.add_metric([origin, scope], n)
        yield dec
        ref = CounterMetricFamily("hybrid_crowdsec_refused", "Decisions refused because they would blackhole the "
                                  "gateway: invalid, too_broad, protected.", labels=["reason"])
        for reason, n in b["refused"].items():
            ref.add_metric([reason], n)
        yield ref
        ne = CounterMetricFamily("hybrid_crowdsec_not_enforced", "Decisions not enforced: a type or scope "
                                 "hybrid does not apply (type:captcha, scope:country, ...), or an origin filtered.",
                                 labels=["what"])
        for what, n in b["unsupported"].items():
            ne.add_metric([what], n)
        if b["filtered"].get("origin"):
            ne.add_metric(["origin"], b["filtered"]["origin"])
        yield ne
        pulls = CounterMetricFamily("hybrid_crowdsec_pulls", "Successful pulls of the decision stream.",
                                    labels=["kind"])
        counts = b["counts"]
        pulls.add_metric(["snapshot"], counts.get("snapshots", 0))
        pulls.add_metric(["delta"], counts.get("pulls", 0) - counts.get("snapshots", 0))
        yield pulls
        drops = CounterMetricFamily("hybrid_crowdsec_dropped_packets", "Packets dropped by a ban.", labels=["hook"])
        drops.add_metric(["xdp"], cs.get("dropped_xdp", 0))
        drops.add_metric(["tc"], cs.get("dropped_tc", 0))
        yield drops
    errs = CounterMetricFamily("hybrid_crowdsec_errors", "Failed requests to the Local API, by operation and kind "
                               "(unreachable, auth, protocol, server).", labels=["op", "kind"])
    for op, key in (("pull", "errors"), ("push", "push_errors")):
        for kind, n in (cs.get(key) or {}).items():
            errs.add_metric([op, kind], n)
    yield errs
    if sh is not None:
        shared = CounterMetricFamily("hybrid_crowdsec_shared", "Blocks shared with the fleet as alerts: pushed, "
                                     "deduplicated, rate_limited, protected (never reported), malformed, "
                                     "lost_while_down, expired_unsent.", labels=["what"])
        for what, n in sh.items():
            if what != "pending":
                shared.add_metric([what], n)
        yield shared
        yield GaugeMetricFamily("hybrid_crowdsec_share_pending", "Alerts waiting for the Local API.",
                                value=sh.get("pending", 0))


def _kernel(snap: dict) -> Iterator:
    rows = list(snap["interfaces"].items())
    if any(snap["unregistered"].values()):
        rows.append((UNREGISTERED, snap["unregistered"]))
    names: list[str] = []
    for _, counters in rows:
        names += [k for k in counters if not k.startswith("reason_") and k not in names]
    for name in names:
        fam = CounterMetricFamily(f"hybrid_kernel_{name}",
                                  _KERNEL_HELP.get(name, f"Kernel counter {name} (bpf/hybrid_common.h)."),
                                  labels=["interface"])
        for ifname, counters in rows:
            fam.add_metric([ifname], counters.get(name, 0))
        yield fam
    fam = CounterMetricFamily("hybrid_kernel_flagged_by_reason",
                              "Flagged packets by reason (a packet may have several reasons).",
                              labels=["interface", "reason"])
    for ifname, counters in rows:
        for key, value in counters.items():
            if key.startswith("reason_"):
                fam.add_metric([ifname, key[len("reason_"):]], value)
    yield fam


def _flows(snap: dict) -> Iterator:
    if snap["flows"] is None:
        return
    fam = GaugeMetricFamily("hybrid_flows", "Entries in the kernel flow table, by effective verdict.",
                            labels=["verdict"])
    for verdict, n in (snap["flows_by_verdict"] or {}).items():
        fam.add_metric([verdict], n)
    yield fam
    if snap.get("flow_table_size"):
        yield GaugeMetricFamily("hybrid_flow_table_size", "Capacity of the flow table (LRU).",
                                value=snap["flow_table_size"])


def _queues(snap: dict) -> Iterator:
    waiting = GaugeMetricFamily("hybrid_nfqueue_waiting",
                                "Packets in the netfilter queue waiting for a verdict (queue_total).",
                                labels=["queue"])
    queued = CounterMetricFamily("hybrid_nfqueue_queued",
                                 "Packets queued to userspace (id_sequence; restarts when the queue is re-bound).",
                                 labels=["queue"])
    dropped = CounterMetricFamily("hybrid_nfqueue_dropped",
                                  "Packets the kernel dropped: queue full and fail-closed, or netlink failure.",
                                  labels=["queue"])
    udropped = CounterMetricFamily("hybrid_nfqueue_user_dropped",
                                   "Packets lost because the engine's socket buffer was full.", labels=["queue"])
    for q, c in sorted(snap["queues"].items()):
        label = [str(q)]
        waiting.add_metric(label, c["waiting"])
        queued.add_metric(label, c["queued_total"])
        dropped.add_metric(label, c["dropped"])
        udropped.add_metric(label, c["user_dropped"])
    yield from (waiting, queued, dropped, udropped)
    over = snap.get("overflow") or {}
    if over.get("passed_overflow") is not None:
        yield CounterMetricFamily(
            "hybrid_nfqueue_passed_overflow",
            "Flagged packets a full queue let through uninspected (fail-open), all queues, since the "
            "engines bound; derived from the queue rule's counter (the kernel counts none).",
            value=over["passed_overflow"])


def _engines(snap: dict) -> Iterator:
    engines = sorted(snap["engines"], key=lambda e: e.get("queue", 0))
    up = GaugeMetricFamily("hybrid_engine_up", "1 while the engine process of this queue runs.", labels=["queue"])
    packets = CounterMetricFamily("hybrid_engine_packets", "Packets the engine decided.", labels=["queue"])
    actions = CounterMetricFamily("hybrid_engine_actions", "Packet verdicts by action.", labels=["queue", "action"])
    flowv = CounterMetricFamily("hybrid_engine_flow_verdicts", "Flow verdicts written to the kernel.",
                                labels=["queue", "verdict"])
    rules = CounterMetricFamily("hybrid_engine_rule_verdicts",
                                "Packets decided by each rule ('(default)': no rule matched).",
                                labels=["queue", "rule"])
    misc = {key: CounterMetricFamily(f"hybrid_engine_{key}", text, labels=["queue"]) for key, text in (
        ("errors", "Packets whose handling raised (accepted, fail-open)."),
        ("flow_write_errors", "Flow verdicts that could not be written to the kernel."),
        ("pinned_write_errors", "BLOCK verdicts written to the flow table but not pinned (pinned table "
                                "full): an eviction would lose them."),
        ("hellos_joined", "TLS ClientHellos split over segments, joined and decided whole."),
        ("hellos_abandoned", "Split ClientHellos given up (gap, too big, timeout, table full)."),
        ("http_heads_joined", "HTTP request heads split over segments, joined and decided whole."),
        ("http_heads_abandoned", "Split HTTP request heads given up (gap, too big, timeout, table full)."),
        ("reloads", "Rule reloads (SIGHUP) that succeeded."),
        ("reload_errors", "Rule reloads refused (the old rules stayed)."),
        ("reject_send_errors", "Reject messages (TCP RSTs, ICMP errors) not built or not sent; "
                               "the packets were dropped all the same."),
        ("reject_no_mac", "Rejects on a bridge whose onward RST was not sent: the receiver's MAC on its "
                          "port was not known yet (the packet was dropped all the same)."),
    )}
    cached = CounterMetricFamily("hybrid_engine_cache_rule_verdicts",
                                 "First payloads the kernel decided from the name cache, by the rule that "
                                 "taught the decision, as the engine heard of them (its ring buffer).",
                                 labels=["queue", "rule"])
    hist = HistogramMetricFamily("hybrid_engine_decision_seconds",
                                 "Time in the engine's packet handler, from the packet handed over to its "
                                 "verdict sent (log2 buckets).", labels=["queue"])
    for e in engines:
        q = [str(e.get("queue", ""))]
        up.add_metric(q, 1 if e.get("alive") else 0)
        packets.add_metric(q, e.get("packets", 0))
        for action, n in e.get("actions", {}).items():
            actions.add_metric(q + [action], n)
        for verdict, n in e.get("flow_verdicts", {}).items():
            flowv.add_metric(q + [verdict], n)
        for rule, n in e.get("rules", {}).items():
            rules.add_metric(q + [rule], n)
        rules.add_metric(q + ["(default)"], e.get("default", 0))
        for rule, n in ((e.get("name_cache") or {}).get("kernel_rules") or {}).items():
            cached.add_metric(q + [rule], n)
        for key, fam in misc.items():
            fam.add_metric(q, e.get(key, 0))
        slots = e.get("decision_ns_log2")
        if slots:
            buckets = [(_le(bound), n) for bound, n in views.decision_buckets(slots)]
            hist.add_metric(q, buckets, e.get("decision_ns_sum", 0) / 1e9)
    yield from (up, packets, actions, flowv, rules, cached, *misc.values(), hist)


def _fail_open(snap: dict) -> Iterator:
    """The ways a flagged packet can pass uninspected (views.FAIL_OPEN_WAYS), and the doubts, summed
    over interfaces and engines, as ``hybridctl status`` shows them."""
    fo = snap.get("fail_open") or {}
    fam = CounterMetricFamily(
        "hybrid_fail_open",
        "Ways a flagged packet passed uninspected, each counted in its own unit: " + "; ".join(
            f"{way}: {text}" for way, text in views.FAIL_OPEN_WAYS.items())
        + ". A way that cannot be counted now is absent.", labels=["way"])
    for way, n in (fo.get("ways") or {}).items():
        if n is not None:
            fam.add_metric([way], n)
    yield fam
    d = snap.get("doubts") or {}
    doubts = CounterMetricFamily(
        "hybrid_doubts",
        "Packets the engines could not be sure about (what the server will see may differ from what "
        "the engine read), by reason: the flow is never bypassed for them; the policy says what is done.",
        labels=["reason"])
    for reason, n in (d.get("reasons") or {}).items():
        doubts.add_metric([reason], n)
    yield doubts
    actions = CounterMetricFamily(
        "hybrid_doubt_actions",
        "What was done with the doubts: inspect (the flow kept inspected), drop, reset (dropped and reset).",
        labels=["action"])
    for action, n in (d.get("actions") or {}).items():
        actions.add_metric([action], n)
    yield actions
    policy = GaugeMetricFamily("hybrid_engine_doubt_policy",
                               "1 for the doubt policy of each engine (inspect, drop or reset).",
                               labels=["queue", "policy"])
    for queue, name in sorted((d.get("policy") or {}).items()):
        policy.add_metric([queue, name], 1)
    yield policy
    fw = snap.get("follow") or {}
    fam_follow = CounterMetricFamily(
        "hybrid_follow",
        "The engines' following of a flow's messages after its first (every HTTP request, every DNS "
        "message): " + "; ".join(f"{k}: {v}" for k, v in views.FOLLOW_WHAT.items()) + ".", labels=["what"])
    for what in views.FOLLOW_WHAT:
        if what in fw:
            fam_follow.add_metric([what], fw[what])
    yield fam_follow
    q = snap.get("quic") or {}
    fam_quic = CounterMetricFamily(
        "hybrid_quic",
        "The engines' reading of QUIC handshakes: " + "; ".join(f"{k}: {v}" for k, v in views.QUIC_WHAT.items())
        + ".", labels=["what"])
    for what in views.QUIC_WHAT:
        if what in q:
            fam_quic.add_metric([what.removeprefix("quic_")], q[what])
    yield fam_quic
    scoped = CounterMetricFamily(
        "hybrid_scoped_verdicts",
        "Flow verdicts narrowed to the side that spoke, by kind (responder-side, block-packet-only, ...).",
        labels=["scope"])
    for kind, n in (d.get("scoped") or {}).items():
        scoped.add_metric([kind], n)
    yield scoped


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


# ---- the server ---------------------------------------------------------------------------------
def check_bearer(header: str | None, token: bytes) -> bool:
    """``header``, an Authorization header's value, is ``Bearer <token>``. The token is compared
    in constant time (hmac.compare_digest), so response times do not tell how much was right."""
    scheme, _, given = (header or "").strip().partition(" ")
    same = hmac.compare_digest(given.strip().encode("latin-1", "replace"), token)
    return scheme.lower() == "bearer" and same


def _response(code: int, reason: str, text: str, extra: str = "") -> bytes:
    """A whole HTTP/1.0 response, for the answers given without http.server's help."""
    body = text.encode()
    return (f"HTTP/1.0 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n").encode() + body


_BUSY = _response(503, "Service Unavailable", "busy: too many scrapes at once; try again\n", "Retry-After: 1\r\n")
_TIMEOUT = _response(408, "Request Timeout", "request not received in time\n")
_TOO_LARGE = _response(431, "Request Header Fields Too Large", "request head too large\n")


class _HeadTooLarge(Exception):
    pass


def _read_head(sock: socket.socket, timeout: float) -> bytes:
    """The request line and headers, read within ``timeout`` seconds in all (a client that trickles
    bytes gains nothing), at most MAX_HEAD bytes. TimeoutError, _HeadTooLarge; b"" if the client
    closed without a request."""
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\r\n\r\n" not in buf and b"\n\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(4096)
        if not chunk:
            return buf
        buf += chunk
        if len(buf) > MAX_HEAD:
            raise _HeadTooLarge
    sock.settimeout(timeout)          # for the answer: a client that does not read is dropped too
    return buf


class _Handler(BaseHTTPRequestHandler):
    """One request per connection (HTTP/1.0), its head read by :func:`_read_head`."""

    server: _GuardedServer
    protocol_version = "HTTP/1.0"

    def handle(self) -> None:
        try:
            head = _read_head(self.connection, self.server.request_timeout)
        except TimeoutError:
            self.server.collector.count_refused("timeout")
            log.debug("metrics: %s sent no request within %.1f s: dropped", self.address_string(),
                      self.server.request_timeout)
            with contextlib.suppress(OSError):
                self.connection.sendall(_TIMEOUT)
            return
        except _HeadTooLarge:
            with contextlib.suppress(OSError):
                self.connection.sendall(_TOO_LARGE)
            return
        if not head:
            return
        self.rfile.close()
        self.rfile = io.BytesIO(head)
        self.handle_one_request()

    def do_GET(self) -> None:   # noqa: N802 - http.server's name
        token = self.server.token
        if token is not None and not check_bearer(self.headers.get("Authorization"), token):
            self.server.collector.count_refused("unauthorized")
            self._reply(401, b"unauthorized: send the header 'Authorization: Bearer TOKEN' with the token of "
                             b"metrics.token_file\n", "text/plain; charset=utf-8",
                        {"WWW-Authenticate": 'Bearer realm="hybrid metrics"'})
            return
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            try:
                body, ctype, code = generate_latest(self.server.registry), CONTENT_TYPE_LATEST, 200
            except Exception as exc:   # noqa: BLE001 - a scrape must never kill the server
                log.warning("metrics: scrape failed: %s", exc)
                body, ctype, code = f"scrape failed: {exc}\n".encode(), "text/plain; charset=utf-8", 500
        elif path == "/":
            body, ctype, code = b"hybrid metrics: see /metrics\n", "text/plain; charset=utf-8", 200
        else:
            body, ctype, code = b"not found: try /metrics\n", "text/plain; charset=utf-8", 404
        self._reply(code, body, ctype)

    def _reply(self, code: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def address_string(self) -> str:
        return self.client_address[0] if isinstance(self.client_address, tuple) else "unix socket"

    def log_message(self, fmt: str, *args) -> None:
        log.debug("metrics: %s %s", self.address_string(), fmt % args)


class _GuardedServer(socketserver.ThreadingMixIn):
    """A thread per request, at most ``max_concurrent`` at once: beyond that a connection is
    answered 503 at once by the accepting thread, and no thread is started for it."""

    daemon_threads = True
    block_on_close = False            # stop() does not wait for a slow client
    request_queue_size = 64           # listen backlog: a burst waits to be answered (or refused)
    # set by _start before the server binds
    registry: CollectorRegistry
    collector: InstanceCollector
    token: bytes | None
    request_timeout: float
    slots: threading.BoundedSemaphore

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.collector.count_refused("busy")
            self._refuse_busy(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def _refuse_busy(self, request) -> None:
        try:
            # Read the request if it has come or comes within BUSY_READ_S, so that the client can
            # read the 503: a client still sending to a closed Unix socket gets EPIPE, and a TCP
            # socket closed with unread data is reset, the reset overtaking the 503.
            request.settimeout(BUSY_READ_S)
            with contextlib.suppress(OSError):
                request.recv(MAX_HEAD)
            request.sendall(_BUSY)
        except OSError:
            pass
        finally:
            self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        log.debug("metrics: connection from %s failed", client_address or "unix socket", exc_info=True)


class _TCPServer(_GuardedServer, socketserver.TCPServer):
    allow_reuse_address = True


class _UnixServer(_GuardedServer, socketserver.UnixStreamServer):
    """Binds, gives the socket its group and mode, and only then listens: no connection is
    accepted before the file's permissions are the ones asked for."""

    socket_mode: int
    socket_gid: int | None
    group_name: str

    def server_bind(self) -> None:
        super().server_bind()
        path = self.server_address
        try:
            if self.socket_gid is not None and os.stat(path).st_gid != self.socket_gid:
                try:
                    os.chown(path, -1, self.socket_gid)
                except PermissionError:
                    raise HybridError(
                        f"cannot give the metrics socket {path} to group {self.group_name}: operation not "
                        "permitted (no CAP_CHOWN, as under the systemd unit): put the socket in a directory of "
                        f"that group with the setgid bit, e.g. install -d -m 2750 -g {self.group_name} "
                        "/run/hybrid-metrics (docs/operations.md)") from None
            os.chmod(path, self.socket_mode)
            self.inode = os.stat(path).st_ino
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise

    def server_close(self) -> None:
        super().server_close()
        with contextlib.suppress(OSError):      # ours only: a successor may have bound the path
            if os.stat(self.server_address).st_ino == getattr(self, "inode", None):
                os.unlink(self.server_address)


class MetricsServer:
    """A running endpoint: ``.host`` and ``.port`` (the one bound, also when 0 was asked) or
    ``.path`` (a Unix socket), ``.url``, ``.collector``, ``.stop()`` (idempotent). Also a context
    manager."""

    def __init__(self, server: _GuardedServer, thread: threading.Thread, collector: InstanceCollector):
        self._server, self._thread = server, thread
        self.collector = collector
        if isinstance(server, _UnixServer):
            self.host, self.port, self.path = None, None, server.server_address
        else:
            self.host, self.port, self.path = server.host, server.server_address[1], None

    @property
    def url(self) -> str:
        """``http://HOST:PORT/metrics``, or ``unix:PATH`` for a socket."""
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        if self._thread is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._thread = None

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _start(server: _GuardedServer, name: str | None, token: bytes | None, cache_seconds: float,
           max_concurrent: int, request_timeout: float) -> MetricsServer:
    """Configure ``server`` (made with bind_and_activate=False), bind, listen, serve from a
    daemon thread."""
    collector = InstanceCollector(name or views.instance_state()[0], cache_seconds=cache_seconds)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server.registry, server.collector, server.token = registry, collector, token
    server.request_timeout, server.slots = request_timeout, threading.BoundedSemaphore(max_concurrent)
    try:
        server.server_bind()
        server.server_activate()
    except BaseException:
        server.server_close()
        raise
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                              name="metrics", daemon=True)
    thread.start()
    return MetricsServer(server, thread, collector)


def serve_metrics(host: str, port: int, *, token: bytes | None = None, instance: str | None = None,
                  cache_seconds: float = CACHE_SECONDS, max_concurrent: int = MAX_CONCURRENT,
                  request_timeout: float = REQUEST_TIMEOUT) -> MetricsServer:
    """Serve /metrics on ``host``:``port`` (0: a free port, see ``.port``) from a daemon thread of
    this process, for the hybrid instance of this process's network namespace. With ``token``,
    every request must carry ``Authorization: Bearer TOKEN`` (else 401). Whether an address
    may go without a token is the configuration's decision (hybrid.service.config)."""
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"metrics port {port!r}: expected 0-65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"metrics address {host!r} is not an IP address or a name this host resolves "
                          f"({exc})") from None
    family, _, _, _, sockaddr = infos[0]
    server_cls = type("MetricsTCPServer", (_TCPServer,), {"address_family": family})
    server = server_cls(sockaddr[:2], _Handler, bind_and_activate=False)
    server.host = host
    try:
        handle = _start(server, instance, token, cache_seconds, max_concurrent, request_timeout)
    except OSError as exc:
        hint = " (another process serves there: pick another port)" if exc.errno == _errno.EADDRINUSE else ""
        raise HybridError(f"cannot serve metrics on {host}:{port}: {exc.strerror}{hint}", exc.errno) from None
    log.info("metrics for instance %s on %s:%d/metrics%s", handle.collector.instance, host, handle.port,
             " (bearer token required)" if token is not None else "")
    return handle


def serve_metrics_unix(path: str, *, group: str | int | None = None, token: bytes | None = None,
                       instance: str | None = None, cache_seconds: float = CACHE_SECONDS,
                       max_concurrent: int = MAX_CONCURRENT,
                       request_timeout: float = REQUEST_TIMEOUT) -> MetricsServer:
    """Serve /metrics on the Unix socket ``path``: mode 0600 (root only), or 0660 with ``group``
    (a name or a gid) owning it. The socket's directories must be root's and writable by no one
    else (so that no one can swap the file), and with ``group`` searchable by that group; a
    missing directory is created (0700). A socket left by a dead server is replaced; one that
    answers is not (one path per instance)."""
    path = os.path.abspath(path)
    gid = _group_id(group)
    _check_socket_dirs(path, group, gid)
    _clear_stale_socket(path)
    server = _UnixServer(path, _Handler, bind_and_activate=False)
    server.socket_mode, server.socket_gid, server.group_name = (0o600 if gid is None else 0o660), gid, str(group)
    try:
        handle = _start(server, instance, token, cache_seconds, max_concurrent, request_timeout)
    except OSError as exc:
        hint = " (another process serves there: choose another path)" if exc.errno == _errno.EADDRINUSE else ""
        raise HybridError(f"cannot serve metrics on {path}: {exc.strerror}{hint}", exc.errno) from None
    log.info("metrics for instance %s on unix:%s (mode %s)", handle.collector.instance, path,
             "0600" if gid is None else f"0660, group {group}")
    return handle


def _group_id(group: str | int | None) -> int | None:
    if group is None or isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"metrics socket group {group!r}: no such group on this host") from None


def _check_socket_dirs(path: str, group: str | int | None, gid: int | None) -> None:
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise HybridError(f"cannot serve metrics on {path}: cannot create {parent}: {exc.strerror}",
                          exc.errno) from None
    d = os.path.realpath(parent)
    while True:
        st = os.stat(d)
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            raise ConfigError(f"cannot serve metrics on {path}: {d} is writable by other users (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}, uid {st.st_uid}), who could replace the socket: "
                              f"put it in a directory only root writes to, e.g. {inst.RUN_ROOT}")
        if gid is not None and not (st.st_mode & 0o001 or (st.st_mode & 0o010 and st.st_gid == gid)):
            raise ConfigError(f"cannot serve metrics on {path} for group {group}: the group cannot reach it, "
                              f"{d} has mode {stat.S_IMODE(st.st_mode):04o}: put the socket in a directory the "
                              "group can search, e.g. /run/hybrid-metrics (docs/operations.md)")
        if d == "/":
            return
        d = os.path.dirname(d)


def _clear_stale_socket(path: str) -> None:
    """Remove a socket at ``path`` that no one listens on (left by a killed server); HybridError
    if someone does, or if something else is there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise HybridError(f"cannot serve metrics on {path}: a file that is not a socket is there: remove it "
                          "or choose another metrics.listen")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)           # stale: its server is gone
            return
        except OSError as exc:
            raise HybridError(f"cannot serve metrics on {path}: {exc.strerror or exc}", exc.errno) from None
    raise HybridError(f"cannot serve metrics on {path}: another process serves there (every network "
                      "namespace's hybrid needs its own metrics.listen)", _errno.EADDRINUSE)


__all__ = ["serve_metrics", "serve_metrics_unix", "MetricsServer", "InstanceCollector", "SnapshotCache",
           "check_bearer"]
