"""A Prometheus endpoint for the hybrid instance of this network namespace.

``serve_metrics(host, port)`` starts a thread in the calling process that answers
``GET /metrics`` in the Prometheus text format. Every scrape reads the current figures (nothing
is cached, nothing runs between scrapes): the kernel counters per interface and per flag reason
from the pinned maps, the flows in the table by verdict, the netfilter queue's own counters,
and what the engines publish in their stats files (packets, actions, flow verdicts, per-rule
verdict counts, and a histogram of the per-packet decision time).

The instance is the network namespace's of the calling process, fixed when the server starts;
the endpoint works before hybrid is attached and across re-attaches (``hybrid_attached`` says
which). The server binds where it is told; ``hybridctl run`` keeps it off unless configured
and binds it to localhost by default: the figures name flows and rules.
"""

from __future__ import annotations

import errno as _errno
import logging
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from hybrid.errors import ConfigError, HybridError
from hybrid.observe import views

log = logging.getLogger(__name__)

UNREGISTERED = "(unregistered)"   # interface label of packets on interfaces hybrid did not register

# kernel counter -> help text; counters not listed (new ones) still appear, with a generic help.
_KERNEL_HELP = {
    "xdp_packets": "Packets seen by the XDP program.",
    "xdp_drop_flow": "Packets dropped at XDP: their flow is in BLOCK.",
    "xdp_drop_prefix": "Packets dropped at XDP: a blocked prefix.",
    "packets": "Packets seen by the tc program (every outcome below adds up to this).",
    "not_ip": "Packets that are not IPv4/IPv6 (passed).",
    "malformed_l3": "Packets with an unparseable IP header (passed unflagged).",
    "flagged": "Packets marked for the verdict engine.",
    "bypassed": "Packets of flows in BYPASS (kept in the kernel).",
    "passed": "Packets passed unflagged (no reason to queue them).",
    "drop_tc_flow": "Packets dropped at tc: their flow is in BLOCK.",
    "drop_tc_prefix": "Packets dropped at tc: a blocked prefix.",
    "flow_new": "Flows created in the flow table.",
    "flow_full": "Flows that could not be inserted (table full).",
    "verdict_expired": "Flow verdicts that expired and reverted to none.",
}


class InstanceCollector:
    """prometheus_client collector: one snapshot of the instance per scrape."""

    def __init__(self, instance: str):
        self.instance = instance
        self.scrape_errors = 0

    def describe(self) -> list:
        return []       # nothing to read at registration time

    def collect(self) -> Iterator:
        try:
            snap = views.snapshot(self.instance)
        except HybridError as exc:   # detached mid-scrape, maps of another version, ...
            self.scrape_errors += 1
            log.warning("metrics: reading instance %s failed: %s", self.instance, exc)
            snap = None
        up = GaugeMetricFamily("hybrid_attached", "1 when hybrid is attached in this network namespace.",
                               labels=["instance"])
        up.add_metric([self.instance], 1 if snap and snap["attached"] else 0)
        yield up
        errs = CounterMetricFamily("hybrid_metrics_scrape_errors", "Scrapes that could not read the instance.")
        errs.add_metric([], self.scrape_errors)
        yield errs
        if snap is None:
            return
        yield from _kernel(snap)
        yield from _flows(snap)
        yield from _queues(snap)
        yield from _engines(snap)


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
        ("hellos_joined", "TLS ClientHellos split over segments, joined and decided whole."),
        ("hellos_abandoned", "Split ClientHellos given up (gap, too big, timeout, table full)."),
        ("http_heads_joined", "HTTP request heads split over segments, joined and decided whole."),
        ("http_heads_abandoned", "Split HTTP request heads given up (gap, too big, timeout, table full)."),
        ("reloads", "Rule reloads (SIGHUP) that succeeded."),
        ("reload_errors", "Rule reloads refused (the old rules stayed)."),
        ("reject_send_errors", "Reject messages (TCP RSTs, ICMP errors) not built or not sent; "
                               "the packets were dropped all the same."),
    )}
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
        for key, fam in misc.items():
            fam.add_metric(q, e.get(key, 0))
        slots = e.get("decision_ns_log2")
        if slots:
            buckets = [(_le(bound), n) for bound, n in views.decision_buckets(slots)]
            hist.add_metric(q, buckets, e.get("decision_ns_sum", 0) / 1e9)
    yield from (up, packets, actions, flowv, rules, *misc.values(), hist)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


# ---- the server ---------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    registry: CollectorRegistry   # set on the subclass made per server

    def do_GET(self) -> None:   # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            try:
                body, ctype, code = generate_latest(self.registry), CONTENT_TYPE_LATEST, 200
            except Exception as exc:   # noqa: BLE001 - a scrape must never kill the server
                log.warning("metrics: scrape failed: %s", exc)
                body, ctype, code = f"scrape failed: {exc}\n".encode(), "text/plain; charset=utf-8", 500
        elif path == "/":
            body, ctype, code = b"hybrid metrics: see /metrics\n", "text/plain; charset=utf-8", 200
        else:
            body, ctype, code = b"not found: try /metrics\n", "text/plain; charset=utf-8", 404
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args) -> None:
        log.debug("metrics: %s %s", self.address_string(), fmt % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        log.debug("metrics: connection from %s failed", client_address, exc_info=True)


class MetricsServer:
    """A running endpoint: ``.host``, ``.port`` (the one bound, also when 0 was asked), ``.url``,
    ``.stop()`` (idempotent). Also a context manager."""

    def __init__(self, server: _Server, thread: threading.Thread, host: str, collector: InstanceCollector):
        self._server, self._thread = server, thread
        self.host = host
        self.port: int = server.server_address[1]
        self.collector = collector

    @property
    def url(self) -> str:
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


def serve_metrics(host: str, port: int, *, instance: str | None = None) -> MetricsServer:
    """Serve /metrics on ``host``:``port`` (0: a free port, see ``.port``) from a daemon thread of
    this process, for the hybrid instance of this process's network namespace."""
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"metrics port {port!r}: expected 0-65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"metrics address {host!r} is not an IP address or a name this host resolves "
                          f"({exc})") from None
    family, _, _, _, sockaddr = infos[0]
    name = instance or views.instance_state()[0]
    registry = CollectorRegistry(auto_describe=False)
    collector = InstanceCollector(name)
    registry.register(collector)
    handler = type("MetricsHandler", (_Handler,), {"registry": registry})
    server_cls = type("MetricsHTTPServer", (_Server,), {"address_family": family})
    try:
        server = server_cls(sockaddr[:2], handler)
    except OSError as exc:
        hint = " (another process serves there: pick another port)" if exc.errno == _errno.EADDRINUSE else ""
        raise HybridError(f"cannot serve metrics on {host}:{port}: {exc.strerror}{hint}", exc.errno) from None
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                              name=f"metrics-{server.server_address[1]}", daemon=True)
    thread.start()
    log.info("metrics for instance %s on %s:%d/metrics", name, host, server.server_address[1])
    return MetricsServer(server, thread, host, collector)


__all__ = ["serve_metrics", "MetricsServer", "InstanceCollector"]
