"""The CrowdSec link of ``hybridctl run``: one thread of the supervisor that pulls bans into the
kernel (hybrid/fleet/bouncer.py) and pushes the engines' shared blocks (hybrid/fleet/share.py).

The thread waits on the engines' share socket and a stop pipe until the next pull is due
(``poll_interval``). A failed request (hybrid.fleet.lapi.LapiError: unreachable, a refused key,
garbage) changes nothing in the kernel; the link retries after a backoff that doubles from the
poll interval up to BACKOFF_MAX, with jitter, and its next pull is a snapshot. A failure is
logged when it starts, when its kind changes, and when the link is back (with how long it was
down), not once per retry.

What the link knows is written to ``/run/hybrid/run-INSTANCE.crowdsec.json`` (hybrid.instance;
hybridctl status, top and the metrics read it): connected, last pull, the bouncer's counts and the pusher's.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import random
import select
import socket
import threading
import time

from hybrid import instance as inst
from hybrid.fleet import lapi
from hybrid.fleet.bouncer import Bouncer
from hybrid.fleet.policy import Policy
from hybrid.fleet.share import MAX_DATAGRAM, SharePusher

log = logging.getLogger(__name__)

BACKOFF_MAX = 30.0          # seconds between two attempts at most
OWN_REFRESH = 30.0          # seconds between two reads of the gateway's own (and the LAPI's) addresses
PUBLISH_EVERY = 1.0
STOP_WAIT = 10.0            # seconds stop() waits for the thread         # seconds between two writes of crowdsec.json at most


def own_addresses() -> list[str]:
    """Every address on every interface of this network namespace."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        return sorted({a.get_attr("IFA_ADDRESS") for a in ipr.get_addr() if a.get_attr("IFA_ADDRESS")})


def lapi_addresses(url: str) -> list[str]:
    """The Local API's addresses (protected: banning them would cut the link itself)."""
    from urllib.parse import urlsplit
    host = urlsplit(url).hostname or ""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    with contextlib.suppress(OSError):
        return sorted({ai[4][0] for ai in socket.getaddrinfo(host, None)})
    return []


def policy_from(cfg) -> Policy:
    return Policy(scopes=cfg["crowdsec.scopes"], types=cfg["crowdsec.types"], origins=cfg["crowdsec.origins"],
                  never_block=cfg["crowdsec.never_block"], min_prefix_v4=cfg["crowdsec.min_prefix_v4"],
                  min_prefix_v6=cfg["crowdsec.min_prefix_v6"], lapi_addresses=lapi_addresses(cfg["crowdsec.lapi_url"]),
                  own=own_addresses())


class Link:
    """Start with :meth:`start`, end with :meth:`stop`. ``maps``: the pinned maps (the bouncer
    writes hybrid_bans); ``share_sock``: the link's end of the engines' socket, or None;
    ``api_key`` and ``password``: read by the caller from the files the configuration names."""

    def __init__(self, cfg, maps, share_sock: socket.socket | None, *, api_key: str | None = None,
                 password: str | None = None, instance: str | None = None):
        self.cfg = cfg
        self.interval = cfg["crowdsec.poll_interval"]
        self.policy = policy_from(cfg)
        self.client = lapi.LapiClient(cfg["crowdsec.lapi_url"], api_key=api_key, machine_id=cfg["crowdsec.machine_id"],
                                      password=password, timeout=cfg["crowdsec.timeout"], ca_file=cfg["crowdsec.ca_file"])
        self.bouncer = Bouncer(self.client, maps, self.policy) if cfg["crowdsec.bouncer_key_file"] else None
        self.pusher = SharePusher(self.policy, cfg["crowdsec.share_per_minute"]) if cfg["crowdsec.machine_id"] else None
        self.share_sock = share_sock
        self.path = inst.crowdsec_path(instance)
        self.state = {"connected": None, "last_pull": None, "last_push": None, "last_error": None, "error_kind": None,
                      "down_since": None, "errors": {}, "push_errors": {}}
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="crowdsec-link", daemon=True)
        self._published = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread. One in the middle of a long pull (a 100,000-decision snapshot takes
        seconds) finishes it and then stops; it is not waited for beyond STOP_WAIT."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        self._thread.join(timeout=STOP_WAIT)
        if self._thread.is_alive():
            log.warning("crowdsec link: still finishing a request after %.0f s; it stops when that ends", STOP_WAIT)
            return                        # its pipe stays open for it
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    # -- the thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        next_pull = next_push = 0.0
        pull_backoff = push_backoff = 0.0
        own_at = time.monotonic()
        watch = [self._stop_r] + ([self.share_sock] if self.share_sock is not None else [])
        while True:
            now = time.monotonic()
            due = min(next_pull if self.bouncer else float("inf"),
                      next_push if self.pusher and self.pusher.pending else float("inf"), now + self.interval)
            ready = select.select(watch, [], [], max(0.0, due - now))[0]
            if self._stop_r in ready or self._stopping.is_set():
                return
            try:
                if self.share_sock is not None and self.share_sock in ready:
                    self._drain()
                now = time.monotonic()
                if now - own_at > OWN_REFRESH:
                    own_at = now
                    with contextlib.suppress(Exception):
                        self.policy.set_own(own_addresses())
                    # A LAPI named by host name is resolved again; a failed lookup keeps the last
                    # addresses protected rather than none.
                    with contextlib.suppress(Exception):
                        if lapi_now := lapi_addresses(self.cfg["crowdsec.lapi_url"]):
                            self.policy.set_lapi(lapi_now)
                if self._stopping.is_set():
                    continue
                if self.bouncer is not None and now >= next_pull:
                    pull_backoff = self._pull(pull_backoff)
                    next_pull = time.monotonic() + (pull_backoff or self.interval)
                if self.pusher is not None and self.pusher.pending and time.monotonic() >= next_push:
                    push_backoff = self._push(push_backoff)
                    next_push = time.monotonic() + push_backoff
                self._publish()
            except Exception as exc:     # noqa: BLE001 - the link must outlive any one bad step
                log.error("crowdsec link: unexpected error, running on: %s", exc, exc_info=True,
                          extra={"event": "internal_error", "fields": {"error": str(exc)}})
                next_pull = time.monotonic() + self.interval

    def _drain(self) -> None:
        for _ in range(10_000):
            try:
                data = self.share_sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            self.pusher.receive(data)

    def _pull(self, backoff: float) -> float:
        """One pull (or an expiry tick while failing); returns the next backoff (0: healthy)."""
        try:
            result = self.bouncer.pull()
        except lapi.LapiError as exc:
            self.bouncer.failed()
            self.bouncer.tick()
            self._failure("pull", exc)
            return min(BACKOFF_MAX, max(self.interval, backoff * 2 or self.interval)) * random.uniform(0.8, 1.2)
        self._up()
        self.state["last_pull"] = time.time()
        if result["startup"] or result["added"] or result["removed"]:
            log.info("crowdsec %s: %d new, %d deleted, %d applied, %d removed, %d expired; %d decisions",
                     "snapshot" if result["startup"] else "delta", result["new"], result["deleted"],
                     result["added"], result["removed"], result["expired"], len(self.bouncer.table),
                     extra={"event": "crowdsec_pull", "fields": result})
        return 0.0

    def _push(self, backoff: float) -> float:
        try:
            pushed = self.pusher.flush(self._push_batch)
        except lapi.LapiError as exc:
            self._failure("push", exc)
            return min(BACKOFF_MAX, max(self.interval, backoff * 2 or self.interval)) * random.uniform(0.8, 1.2)
        if pushed:
            self.state["last_push"] = time.time()
            if self.bouncer is None:           # a machine alone: its pushes say whether the link is up
                self._up()
        return 0.0

    def _up(self) -> None:
        st = self.state
        if st["connected"] is not True:
            down = time.time() - st["down_since"] if st["down_since"] else None
            n = len(self.bouncer.table) if self.bouncer else 0
            log.info("crowdsec link up: %s, %d decisions in the kernel%s", self.cfg["crowdsec.lapi_url"], n,
                     f" (down {down:.1f} s)" if down is not None else "",
                     extra={"event": "crowdsec_connected", "fields": {"url": self.cfg["crowdsec.lapi_url"],
                            "decisions": n, "down_s": down}})
        st.update(connected=True, down_since=None, error_kind=None)

    def _push_batch(self, batch) -> None:
        """One POST of alerts, each carrying one ban decision (ShareRequest, seconds left)."""
        self.client.push_alerts([lapi.Alert(value=req.value, duration_s=left, scenario=f"hybrid/{req.rule}",
                                            message=req.reason) for req, left in batch])

    def _failure(self, what: str, exc: lapi.LapiError) -> None:
        st = self.state
        key = "errors" if what == "pull" else "push_errors"
        st[key][exc.kind] = st[key].get(exc.kind, 0) + 1
        if st["connected"] is not False or st["error_kind"] != exc.kind:
            log.error("crowdsec link %s failed: %s; the kernel keeps its bans until they expire, retrying",
                      what, exc, extra={"event": "crowdsec_down", "fields": {"what": what, "kind": exc.kind,
                                                                              "error": str(exc)}})
        if st["connected"] is not False:
            st["down_since"] = time.time()
        st.update(connected=False, last_error=str(exc), error_kind=exc.kind)

    def snapshot(self) -> dict:
        return {"url": self.cfg["crowdsec.lapi_url"], "poll_interval": self.interval, **self.state,
                "own": list(self.policy.own), "lapi_addresses": list(self.policy.lapi),
                "bouncer": self.bouncer.snapshot() if self.bouncer else None,
                "share": self.pusher.snapshot() if self.pusher else None}

    def _publish(self) -> None:
        now = time.monotonic()
        if now - self._published < PUBLISH_EVERY:
            return
        self._published = now
        with contextlib.suppress(OSError):
            inst.write_json(self.path, {**self.snapshot(), "pid": os.getpid(), "updated": time.time()})

