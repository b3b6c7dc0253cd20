"""hybrid as a long-running service (``hybridctl run``): attach from the configuration, run one
engine process per queue, reload on SIGHUP, stop cleanly on SIGTERM.

The supervisor never touches packets. It starts the engines, which bind their queues first, then
attaches (idempotent: a restart reuses the pinned flow table, counters and verdicts, and never
duplicates a rule) and lets the engines open the maps and decide: so no flagged packet passes
for want of a bound engine at start. Then it waits for signals with ``sigtimedwait`` (signals
are blocked, so none is lost between two checks):

- SIGHUP: read the configuration and the rules again. A broken file keeps everything as it was
  and says why. Otherwise attach options that changed are applied by attaching again, engine
  settings that changed (queues, rules file, flow_ttl, queue length, fail-open, verdict log,
  log level) restart the engines, and if only the rules file's content changed the engines
  reload it themselves (they keep their old rules if it is broken).
- SIGTERM/SIGINT: stop the engines, then detach, or leave the kernel side in place when
  ``service.keep_attached_on_stop`` is set, so that the next start has no blind window:
  bypassed and blocked flows stay so in the kernel meanwhile, and new flows follow the
  fail-open/fail-closed policy.
- An engine that dies is started again; five deaths within a minute stop the service (exit 1),
  so that systemd's ``Restart=on-failure`` takes over. With ``service.standby_engines`` (the
  default) each queue has a spare engine that has started Python and loaded the rules and waits
  on a pipe: a dead engine's queue is bound again by the spare in milliseconds, where a new
  engine process needs a large fraction of a second, a window in which new flows pass
  uninspected with fail-open or are dropped with fail-closed (``hybridctl bench --takeover``
  measures both; docs/benchmarks.md), and a new spare starts behind it.

Engines are child processes (``argv_for_child(spec)`` runs :func:`run_engine_child`); each asks
the kernel to send it SIGTERM when the supervisor dies (``PR_SET_PDEATHSIG``), so a ``kill -9``
of the supervisor leaves no engine bound to a queue that the next start would need.

Everything is logged through :mod:`logging` with an ``event`` name and ``fields``;
:class:`JsonFormatter` turns each record into one JSON object per line.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import fcntl
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from hybrid import __version__
from hybrid import instance as inst
from hybrid.datapath import attach as att
from hybrid.datapath.maps import Maps
from hybrid.engine import loop as eng
from hybrid.engine import runner
from hybrid.engine.rules import load_rules
from hybrid.errors import ConfigError, HybridError
from hybrid.fleet import share
from hybrid.kernel import bpffs, caps, sysutil
from hybrid.service.config import (
    Config,
    read_secret,
    read_token,
    split_listen,
    unix_path,
)

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
STOP_TIMEOUT = 10.0            # seconds an engine gets to unbind after SIGTERM
CRASH_LIMIT, CRASH_WINDOW = 5, 60.0
BIND_RETRY = 10.0              # seconds a starting engine retries a queue still held by a dying one
SPARE_RETRY = 30.0             # seconds before a spare that died (e.g. a rules file broken on disk) is tried again
PR_SET_PDEATHSIG = 1
# Settings an engine process is started with: a change restarts the engines.
ENGINE_KEYS = ("attach.queues", "attach.fail_open", "attach.mark_mask", "engine.rules", "engine.flow_ttl",
               "engine.queue_len", "log.verdicts", "log.level", "service.standby_engines", "crowdsec.machine_id")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, event, msg, then the record's fields.
    Records without an event (a library's ordinary log calls) get ``"event": "log"`` and the
    logger's name."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        event = getattr(record, "event", None)
        rec = {"ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
               "level": record.levelname.lower(), "event": event or "log", "msg": record.getMessage()}
        if event is None:
            rec["logger"] = record.name
        for k, v in (getattr(record, "fields", None) or {}).items():
            rec.setdefault(k, v)
        if record.exc_info:
            rec["error"] = self.formatException(record.exc_info)
        return json.dumps(rec, default=str, separators=(",", ":"))


def setup_json_logging(level: str, stream=None) -> None:
    """Route every log record of this process to ``stream`` (standard output) as JSON lines."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())


def event(level: int, name: str, msg: str, /, **fields) -> None:
    log.log(level, msg, extra={"event": name, "fields": fields})


# -- the supervisor --------------------------------------------------------------------------------

@dataclass
class QueueEngines:
    """What the supervisor keeps for one queue: the engine serving it, the pipes of that engine's
    start handshake while it lasts, and the spare engine waiting to take over."""

    engine: subprocess.Popen | None = None
    ready_fd: int | None = None         # read end: the engine bound its queue (handshake)
    go_fd: int | None = None            # write end: go ahead, the maps are there (handshake)
    spare: subprocess.Popen | None = None
    spare_go_fd: int | None = None      # write end: a byte promotes the spare, EOF stops it
    spare_retry_at: float = 0.0         # no new spare before this (time.monotonic)


class Service:
    def __init__(self, load_config: Callable[[], Config], argv_for_child: Callable[[dict], list[str]]):
        self.load_config = load_config
        self.argv_for_child = argv_for_child
        self.cfg: Config | None = None
        self.queues: dict[int, QueueEngines] = {}      # queue -> its engines
        self.deaths: list[float] = []
        self.metrics = None
        self.attached = False
        self.pin_dir: str | None = None
        self.link = None                                # the CrowdSec link (hybrid/fleet/link.py)
        self._link_maps = None
        # The engines' blocks shared with the fleet reach the link through a socketpair (share.py), made by run().
        self._share_link = self._share_engines = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def run(self) -> int:
        """Attach, serve, and return the exit status once stopped. Bad configuration raises
        ConfigError before anything changes; a failed attach leaves nothing behind."""
        cfg = self.load_config()
        load_rules(cfg["engine.rules"], cfg["engine.flow_ttl"])
        _check_verdict_log(cfg)
        secrets = _crowdsec_secrets(cfg)
        self.cfg = cfg
        lock = _lock_instance()
        self._share_link, self._share_engines = share.socketpair()
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        rc = 1
        try:
            event(logging.INFO, "starting", f"hybrid {__version__} starting from {cfg.path or 'options'}",
                  config=cfg.path, pid=os.getpid(), version=__version__)
            self._start_metrics(cfg)
            # The engines bind their queues before the attach: tc flags packets from the moment it
            # is attached, and a flow whose first packets pass while no engine is bound (fail-open)
            # is never inspected. Already attached (a restart that kept the kernel side), they go
            # ahead at once with the pinned maps; otherwise once the attach has created them.
            try:
                already = _attached_here()
                self._start_engines(handshake=True)
                if already:
                    self._go()
                self._attach(cfg, "attached")
                self._go()
                self._start_link(cfg, secrets)
            except HybridError as exc:
                event(logging.ERROR, "start_failed", f"start failed: {exc}", error=str(exc))
                raise
            rc = self._loop()
        finally:
            self._stop_link()
            self._stop_engines()
            self._stop_metrics()
            if self.attached:
                self._release()
            with contextlib.suppress(OSError):
                os.unlink(inst.spares_path())
            for sock in (self._share_link, self._share_engines):
                sock.close()
            self._share_link = self._share_engines = None
            _unlock_instance(lock)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        event(logging.INFO, "stopped", "hybrid stopped", exit_status=rc)
        return rc

    def _loop(self) -> int:
        while True:
            info = signal.sigtimedwait(SIGNALS, 1.0)
            sig = info.si_signo if info else None
            if sig in (signal.SIGTERM, signal.SIGINT):
                event(logging.INFO, "stopping", f"{signal.Signals(sig).name}: stopping", signal=signal.Signals(sig).name)
                return 0
            try:
                if sig == signal.SIGHUP:
                    self.reload()
                if not self._reap():
                    return 1
            except Exception as exc:   # noqa: BLE001 - the service outlives a failed reload or restart
                log.error("unexpected error, running on: %s", exc, exc_info=True,
                          extra={"event": "internal_error", "fields": {"error": str(exc)}})

    def _release(self) -> None:
        if self.cfg["service.keep_attached_on_stop"]:
            event(logging.INFO, "kept_attached", "hybrid stays attached (service.keep_attached_on_stop): "
                  "bypassed and blocked flows stay so in the kernel; new flows follow "
                  + ("fail-open" if self.cfg["attach.fail_open"] else "fail-closed") + " until the next start",
                  interfaces=self.cfg["attach.interfaces"])
            return
        try:
            res = att.detach(None)
        except HybridError as exc:
            event(logging.ERROR, "detach_failed", f"detach failed: {exc}", error=str(exc))
            return
        event(logging.INFO, "detached", "hybrid detached", interfaces=res.interfaces,
              netfilter=res.netfilter_families, pins_removed=res.pins_removed,
              **({"sysctls": res.sysctls} if res.sysctls else {}))

    # -- attach ------------------------------------------------------------------------------------
    def _attach(self, cfg: Config, name: str, changed: list[str] | None = None) -> None:
        res = att.attach(cfg.attach_options())
        self.attached = True
        self.pin_dir = res.pin_dir
        fields = dict(interfaces=res.interfaces, instance=res.instance, pin_dir=res.pin_dir,
                      reused_pins=res.reused_pins, queues=cfg["attach.queues"],
                      fail_open=cfg["attach.fail_open"])
        if res.bridges:     # bridge mode: the ports attached and br_netfilter's sysctls set
            fields.update(bridges=res.bridges, sysctls=res.sysctls)
        if changed is not None:
            fields["changed"] = changed
        event(logging.INFO, name, ("attached again" if changed is not None else "attached")
              + (" (pinned flow table, verdicts and counters kept)" if res.reused_pins else ""), **fields)

    # -- engines -----------------------------------------------------------------------------------
    def _spec(self, queue: int) -> dict:
        c = self.cfg
        return {"queue": queue, "rules": c["engine.rules"], "flow_ttl": c["engine.flow_ttl"],
                "queue_len": c["engine.queue_len"], "fail_open": c["attach.fail_open"],
                "mark_mask": c["attach.mark_mask"], "verdicts": c["log.verdicts"], "level": c["log.level"],
                "parent": os.getpid(),
                "share_fd": self._share_engines.fileno() if c["crowdsec.machine_id"] and self._share_engines else None}

    def _start_engine(self, queue: int, handshake: bool = False) -> None:
        """Start the engine of one queue. With ``handshake`` it binds its queue and then waits
        for :meth:`_go` before it opens the maps and decides packets."""
        spec = self._spec(queue)
        fds: tuple[int, ...] = () if spec["share_fd"] is None else (spec["share_fd"],)
        if handshake:
            ready_r, ready_w = os.pipe()
            go_r, go_w = os.pipe()
            spec.update(ready_fd=ready_w, go_fd=go_r)
            fds += (ready_w, go_r)
        try:
            proc = subprocess.Popen(self.argv_for_child(spec), stdin=subprocess.DEVNULL, pass_fds=fds)
        finally:
            for fd in fds:
                if fd != spec["share_fd"]:
                    os.close(fd)
        q = self.queues.setdefault(queue, QueueEngines())
        if handshake:
            q.ready_fd, q.go_fd = ready_r, go_w
        q.engine = proc
        event(logging.INFO, "engine_started", f"engine for queue {queue} started (pid {proc.pid})",
              queue=queue, pid=proc.pid, rules=self.cfg["engine.rules"])

    def _start_engines(self, handshake: bool = False) -> None:
        first, last = self.cfg.queues
        for queue in range(first, last + 1):
            self._start_engine(queue, handshake)
        if handshake:
            self._wait_ready()
        for queue in range(first, last + 1):
            self._start_standby(queue)

    def _start_standby(self, queue: int) -> None:
        """A spare engine for ``queue``: it loads the rules, then waits for a byte on its pipe
        (:meth:`_promote`) before it binds the queue; EOF instead (:meth:`_stop_standbys`, or
        the supervisor's death) and it exits."""
        q = self.queues.setdefault(queue, QueueEngines())
        if not self.cfg["service.standby_engines"] or q.spare is not None or time.monotonic() < q.spare_retry_at:
            return
        go_r, go_w = os.pipe()
        spec = self._spec(queue)
        spec["standby_fd"] = go_r
        fds = (go_r,) if spec["share_fd"] is None else (go_r, spec["share_fd"])
        try:
            proc = subprocess.Popen(self.argv_for_child(spec), stdin=subprocess.DEVNULL, pass_fds=fds)
        except BaseException:
            os.close(go_w)
            raise
        finally:
            os.close(go_r)
        q.spare, q.spare_go_fd = proc, go_w
        self._publish_spares()
        event(logging.INFO, "engine_standby", f"spare engine for queue {queue} waiting (pid {proc.pid})",
              queue=queue, pid=proc.pid)

    def _promote(self, queue: int) -> bool:
        """Hand ``queue`` to its spare engine; False when there is none (or it is gone)."""
        q = self.queues.get(queue)
        if q is None or q.spare is None:
            return False
        proc, go_w = q.spare, q.spare_go_fd
        q.spare = q.spare_go_fd = None
        self._publish_spares()
        alive = proc.poll() is None
        try:
            if alive:
                os.write(go_w, b"1")
        except OSError:                    # EPIPE: it died meanwhile
            alive = False
        finally:
            os.close(go_w)
        if not alive:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            return False
        q.engine = proc
        event(logging.INFO, "engine_promoted", f"spare engine (pid {proc.pid}) takes over queue {queue}",
              queue=queue, pid=proc.pid)
        return True

    def _stop_standbys(self) -> None:
        spares = [q for q in self.queues.values() if q.spare is not None]
        for q in self.queues.values():
            q.spare_retry_at = 0.0         # whoever starts spares next does so with a new configuration
        for q in spares:
            os.close(q.spare_go_fd)        # EOF: the spare exits without binding
        for q in spares:
            try:
                q.spare.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                q.spare.kill()
                q.spare.wait()
        for q in spares:
            q.spare = q.spare_go_fd = None
        self._publish_spares()

    def _publish_spares(self) -> None:
        """For `hybridctl status`: which queues have a spare engine waiting."""
        doc = {"supervisor": os.getpid(),
               "spares": {str(queue): q.spare.pid for queue, q in sorted(self.queues.items()) if q.spare is not None}}
        with contextlib.suppress(OSError):
            inst.write_json(inst.spares_path(), doc)

    def _wait_ready(self) -> None:
        """Until every engine started with a handshake has bound its queue."""
        deadline = time.monotonic() + BIND_RETRY + 30
        while waiting := {queue: q for queue, q in self.queues.items() if q.ready_fd is not None}:
            for queue, q in waiting.items():
                if select.select([q.ready_fd], [], [], 0)[0]:
                    if os.read(q.ready_fd, 1):
                        os.close(q.ready_fd)
                        q.ready_fd = None
                        continue
                    rc = q.engine.wait()
                    raise HybridError(f"the engine for queue {queue} exited ({rc}) before binding it; "
                                      "its log lines say why")
            if still := [queue for queue, q in waiting.items() if q.ready_fd is not None]:
                if time.monotonic() > deadline:
                    raise HybridError(f"the engines for queues {sorted(still)} did not bind in time")
                select.select([self.queues[queue].ready_fd for queue in still], [], [], 0.2)

    def _go(self) -> None:
        """Let the engines waiting in their handshake open the maps and decide packets."""
        for q in self.queues.values():
            if q.go_fd is not None:
                with contextlib.suppress(OSError):
                    os.write(q.go_fd, b"1")
                os.close(q.go_fd)
                q.go_fd = None

    def _stop_engines(self) -> None:
        self._stop_standbys()              # first: none may take over a queue being stopped
        for q in self.queues.values():
            for fd in (q.ready_fd, q.go_fd):
                if fd is not None:
                    os.close(fd)          # an engine still in its handshake reads EOF and exits
            q.ready_fd = q.go_fd = None
        engines = sorted((queue, q.engine) for queue, q in self.queues.items() if q.engine is not None)
        for _, proc in engines:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for queue, proc in engines:
            try:
                rc = proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
                event(logging.WARNING, "engine_killed", f"engine for queue {queue} did not stop in "
                      f"{STOP_TIMEOUT:.0f} s: killed", queue=queue, pid=proc.pid)
            else:
                event(logging.INFO, "engine_stopped", f"engine for queue {queue} stopped", queue=queue,
                      pid=proc.pid, exit_status=rc)
        self.queues.clear()

    def _reap(self) -> bool:
        """Replace every engine that died, by its spare when there is one, and every spare that
        died. False: they die too often; stop the service."""
        for queue, q in sorted(self.queues.items()):
            proc = q.engine
            if proc is None or (rc := proc.poll()) is None:
                continue
            event(logging.ERROR, "engine_died", f"engine for queue {queue} exited with status {rc}",
                  queue=queue, pid=proc.pid, exit_status=rc)
            if not self._count_death():
                return False
            if not self._promote(queue):
                self._start_engine(queue)
            self._start_standby(queue)
        for queue, q in sorted(self.queues.items()):
            proc = q.spare
            if proc is None or (rc := proc.poll()) is None:
                continue
            os.close(q.spare_go_fd)
            q.spare = q.spare_go_fd = None
            self._publish_spares()
            # Not a death that stops the service: the queue's engine is serving. A spare killed by
            # a signal is replaced at once; one that exited by itself could not start (its own log
            # line says why: a rules file broken on disk since the last reload, say), so it is
            # tried again later, not in a loop.
            later = rc >= 0
            if later:
                q.spare_retry_at = time.monotonic() + SPARE_RETRY
            event(logging.ERROR, "standby_died", f"spare engine for queue {queue} exited with status {rc}"
                  + (f"; trying again in {SPARE_RETRY:.0f} s" if later else ""), queue=queue, pid=proc.pid,
                  exit_status=rc)
        for queue, q in sorted(self.queues.items()):
            if q.engine is not None:
                self._start_standby(queue)     # a spare that is missing and due
        return True

    def _count_death(self) -> bool:
        now = time.monotonic()
        self.deaths = [t for t in self.deaths if now - t < CRASH_WINDOW] + [now]
        if len(self.deaths) >= CRASH_LIMIT:
            event(logging.ERROR, "giving_up", f"{len(self.deaths)} engine deaths within "
                  f"{CRASH_WINDOW:.0f} s: stopping", deaths=len(self.deaths))
            return False
        return True

    # -- reload ------------------------------------------------------------------------------------
    def reload(self) -> bool:
        """SIGHUP. Returns whether the new configuration is in effect."""
        old = self.cfg
        try:
            new = self.load_config()
            load_rules(new["engine.rules"], new["engine.flow_ttl"])
            _check_verdict_log(new)
        except ConfigError as exc:
            event(logging.ERROR, "reload_refused", f"reload refused, keeping the running configuration: {exc}",
                  error=str(exc))
            return False
        changed = [k for k in new.values if new.values[k] != old.values[k]]
        attach_changed = [k for k in changed if k.startswith("attach.")]
        if new.attach_options() != old.attach_options():
            try:
                self._attach(new, "reattached", attach_changed)
            except HybridError as exc:
                event(logging.ERROR, "reload_refused", f"attaching with the new configuration failed, "
                      f"keeping the running one: {exc}", error=str(exc), changed=attach_changed)
                with contextlib.suppress(HybridError):
                    self._attach(old, "reattached", [])      # attach is a transaction, but be sure
                return False
        self.cfg = new
        if "log.level" in changed:
            logging.getLogger().setLevel(new["log.level"].upper())
        if any(k.startswith("metrics.") for k in changed):
            self._stop_metrics()
            try:
                self._start_metrics(new)
            except HybridError as exc:
                event(logging.ERROR, "metrics_failed", str(exc), error=str(exc))
        if any(k.startswith("crowdsec.") for k in changed):
            self._stop_link()
            try:
                self._start_link(new, _crowdsec_secrets(new))
            except HybridError as exc:
                event(logging.ERROR, "crowdsec_failed", f"the CrowdSec link cannot start: {exc}", error=str(exc))
        restart = [k for k in ENGINE_KEYS if k in changed]
        if restart:
            self._stop_engines()
            self._start_engines()
            event(logging.INFO, "reloaded", "configuration reloaded; engines restarted for "
                  + ", ".join(restart), changed=changed)
        else:
            for q in self.queues.values():
                if q.engine is not None and q.engine.poll() is None:
                    q.engine.send_signal(signal.SIGHUP)
            self._stop_standbys()          # spares load the rules when they start: start them again
            for queue in range(self.cfg.queues[0], self.cfg.queues[1] + 1):
                self._start_standby(queue)
            event(logging.INFO, "reloaded", "configuration reloaded; engines reload the rules",
                  changed=changed, rules=new["engine.rules"])
        return True

    # -- the CrowdSec link -------------------------------------------------------------------------
    def _start_link(self, cfg: Config, secrets: tuple[str | None, str | None]) -> None:
        if cfg["crowdsec.lapi_url"] is None:
            return
        from hybrid.fleet import link  # the HTTP client, only when there is a Local API
        self._link_maps = Maps.open_pinned(self.pin_dir)
        try:
            self.link = link.Link(cfg, self._link_maps, self._share_link, api_key=secrets[0], password=secrets[1])
        except Exception:
            self._link_maps.close()
            self._link_maps = None
            raise
        self.link.start()
        event(logging.INFO, "crowdsec_started", f"CrowdSec link to {cfg['crowdsec.lapi_url']}: "
              + ", ".join(w for w, on in (("pulling bans", cfg["crowdsec.bouncer_key_file"]),
                                          ("sharing blocks", cfg["crowdsec.machine_id"])) if on),
              url=cfg["crowdsec.lapi_url"], bouncer=bool(cfg["crowdsec.bouncer_key_file"]),
              machine=cfg["crowdsec.machine_id"])

    def _stop_link(self) -> None:
        if self.link is not None:
            self.link.stop()
            self.link = None
        if self._link_maps is not None:
            self._link_maps.close()
            self._link_maps = None

    # -- metrics -----------------------------------------------------------------------------------
    def _start_metrics(self, cfg: Config) -> None:
        if not cfg["metrics.enabled"]:
            return
        try:        # prometheus_client is imported only when metrics are on
            from hybrid.observe import metrics
        except ImportError as exc:
            raise HybridError(f"metrics are enabled but cannot be served ({exc}): install prometheus_client "
                              "(scripts/setup.sh) or set metrics.enabled = false") from None
        listen, group = cfg["metrics.listen"], cfg["metrics.socket_group"]
        token = read_token(cfg["metrics.token_file"]) if cfg["metrics.token_file"] else None
        path = unix_path(listen)
        try:
            if path is not None:
                self.metrics = metrics.serve_metrics_unix(path, group=group, token=token)
            else:
                host, port = split_listen(listen)
                self.metrics = metrics.serve_metrics(host, port, token=token)
        except OSError as exc:
            raise HybridError(f"metrics endpoint {listen}: {exc.strerror or exc}; "
                              "choose another metrics.listen") from None
        if path is not None:
            auth, where = "socket", f"{path} (mode " + ("0600)" if group is None else f"0660, group {group})")
        else:
            auth, where = ("token" if token is not None else "none"), self.metrics.url
        # Loopback TCP without a token: every local user can read the figures. Allowed (the
        # configuration refuses it beyond loopback), but said at warning level.
        level = logging.WARNING if auth == "none" else logging.INFO
        note = "; no token_file: any local user can read them" if auth == "none" else ""
        event(level, "metrics_serving", f"metrics on {where}{note}", listen=listen, port=self.metrics.port,
              path=path, auth=auth)

    def _stop_metrics(self) -> None:
        if self.metrics is not None:
            with contextlib.suppress(Exception):
                self.metrics.stop()
            self.metrics = None


def _crowdsec_secrets(cfg: Config) -> tuple[str | None, str | None]:
    """The bouncer key and the machine password, read from their files (never from the command
    line, never logged)."""
    key = pw = None
    if cfg["crowdsec.lapi_url"] is not None:
        if cfg["crowdsec.bouncer_key_file"]:
            key = read_secret(cfg["crowdsec.bouncer_key_file"], "bouncer_key_file").decode()
        if cfg["crowdsec.machine_password_file"]:
            pw = read_secret(cfg["crowdsec.machine_password_file"], "machine_password_file").decode()
    return key, pw


def _attached_here() -> bool:
    """hybrid is attached in this namespace and its pinned maps are there."""
    try:
        settings = runner.settings_for_instance()
    except HybridError:
        return False
    return bool(settings.pin_access) and os.path.exists(os.path.join(settings.pin_access, "hybrid_flows"))


def _lock_instance() -> tuple[int, str]:
    """One `hybridctl run` per instance: a second one would attach over the first and, on its
    way out, detach it. The lock is an flock, so a killed holder releases it."""
    os.makedirs(inst.RUN_ROOT, mode=0o700, exist_ok=True)
    path = inst.lock_path()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise HybridError(f"another 'hybridctl run' (pid {holder}) serves this network namespace: stop it "
                          "first (systemctl stop hybrid)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd, path


def _unlock_instance(lock: tuple[int, str]) -> None:
    fd, path = lock
    with contextlib.suppress(OSError):
        os.unlink(path)
    os.close(fd)


def _check_verdict_log(cfg: Config) -> None:
    path = cfg["log.verdicts"]
    if path in (None, "-"):
        return
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    except OSError as exc:
        raise ConfigError(f"log.verdicts {path}: {exc.strerror}; create its directory or choose another "
                          "path") from None


# -- one engine (a child of the supervisor) --------------------------------------------------------

def run_engine_child(spec: dict) -> int:
    """Serve one queue until SIGTERM; ``spec`` comes from :meth:`Service._spec`.

    With ``ready_fd``/``go_fd`` (the engines started before the attach): bind the queue, say so
    on ``ready_fd``, and wait for a byte on ``go_fd`` before opening the pinned maps (EOF
    instead: the start was abandoned). Signals stay blocked meanwhile; closing ``go_fd`` is how
    the supervisor stops an engine that never got going.

    Run as root, the engine gives up every capability it does not use (``caps.ENGINE``) once its
    verdict log is open, before it reads the rules or waits as a spare: it parses what the network
    sends, and a process that does should hold no more than it needs. The rules file is read
    again on SIGHUP without those capabilities, so it is read without them from the start too."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != spec["parent"]:
        return 1                                   # the supervisor is already gone
    queue = spec["queue"]
    maps = stream = None
    instance = inst.name()          # before the drop: naming an unnamed namespace reads /proc/2/ns
    held = _hold_bpffs()
    try:
        if spec["verdicts"] == "-":
            stream = sys.stdout
        elif spec["verdicts"]:
            stream = os.fdopen(os.open(spec["verdicts"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a")
        if os.geteuid() == 0:
            kept = caps.limit_to(caps.ENGINE)
            event(logging.INFO, "engine_capabilities", f"queue {queue}: the engine keeps "
                  f"{' '.join(caps.names(kept.effective)) or 'no capabilities'} (bounding set "
                  f"{' '.join(caps.names(kept.bounding)) or 'empty'}, no new privileges)", queue=queue,
                  pid=os.getpid(), kept=caps.names(kept.effective), bounding=caps.names(kept.bounding))
        engine = eng.Engine(queue, spec["rules"], maps=None, mark_mask=spec["mark_mask"],
                            fail_open=spec["fail_open"], maxlen=spec["queue_len"], log_stream=stream,
                            stats_path=inst.engine_stats_path(instance, queue), flow_ttl=spec["flow_ttl"],
                            share_fd=spec.get("share_fd"))
        if spec.get("standby_fd") is not None:     # a spare: wait to be promoted (EOF: never)
            go = os.read(spec["standby_fd"], 1)
            os.close(spec["standby_fd"])
            if not go:
                return 0
        _bind(engine)
        event(logging.INFO, "engine_bound", f"queue {queue} bound ("
              + ("fail-open" if spec["fail_open"] else "fail-closed") + ")", queue=queue, pid=os.getpid())
        if spec.get("go_fd") is not None:
            os.write(spec["ready_fd"], b"1")
            os.close(spec["ready_fd"])
            go = os.read(spec["go_fd"], 1)
            os.close(spec["go_fd"])
            if not go:
                return 0
        settings = runner.settings_for_instance((queue, queue), spec["fail_open"], instance)
        pin_dir = _held_pins(held, settings.instance) if held else settings.pin_access
        maps = Maps.open_pinned(pin_dir) if pin_dir else None
        engine.maps = maps
        engine.install_signals()
        event(logging.INFO, "engine_running", f"queue {queue}: deciding packets", queue=queue, pid=os.getpid())
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)    # blocked since the supervisor forked us
            engine.run()
        except eng._Stop:           # a SIGTERM that was pending when the signals were unblocked
            engine.close()
        st = engine.snapshot()
        event(logging.INFO, "engine_exit", f"queue {queue}: {st['packets']} packets", queue=queue,
              packets=st["packets"], actions=st["actions"], errors=st["errors"])
        return 0
    finally:                        # an engine that never ran unbinds when the process exits
        if stream not in (None, sys.stdout):
            stream.close()
        if maps is not None:
            maps.close()
        if held:
            os.close(held[0])


def _hold_bpffs() -> tuple[int, str] | None:
    """When the hybrid bpffs is not mounted in this process's mount namespace (``ip netns exec``
    made a private one, and the supervisor's attach mounted the bpffs in the initial namespace
    after it), an O_PATH descriptor on the directory above its mount point in the initial
    namespace, and the rest of the path from there; else None.

    The supervisor reaches such a bpffs through /proc/2/root (hybrid.kernel.bpffs). Following
    another process's /proc/PID/root needs every capability that process holds (a ptrace access
    check, ptrace(2)): an engine that has given up its capabilities cannot. A descriptor opened
    before can be followed for good (/proc/self/fd/N is always ours), and reaches no further than
    that directory and what is below it."""
    root = bpffs.bpffs_root()
    if root in bpffs.mounted_bpffs() or sysutil.in_init_ns("mnt") is not False:
        return None
    for pid in sysutil.INIT_NS_PIDS:
        above = os.path.dirname(root)
        while True:
            try:
                fd = os.open(f"/proc/{pid}/root{above}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                return fd, os.path.relpath(root, above)
            except FileNotFoundError:
                if above == "/":
                    break
                above = os.path.dirname(above)
            except OSError:
                break
    return None


def _held_pins(held: tuple[int, str], instance: str) -> str | None:
    """The instance's pin directory through the descriptor of :func:`_hold_bpffs`, or None while
    no bpffs is mounted there."""
    base = f"/proc/self/fd/{held[0]}/{held[1]}"
    return os.path.join(base, instance) if os.path.ismount(base) else None


def _bind(engine) -> None:
    """Bind the queue; an engine of the previous run may still be unbinding it (its supervisor
    was just killed), so retry for a while."""
    deadline = time.monotonic() + BIND_RETRY
    while True:
        try:
            engine.bind()
            return
        except HybridError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
