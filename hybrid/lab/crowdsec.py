"""A private, real CrowdSec Local API (Debian's crowdsec 1.4.6) for tests and scripts.

    with Lapi() as lapi:                       # own config dir, SQLite database and loopback port
        key = lapi.add_bouncer("gw-a")         # a bouncer's API key (cscli bouncers add)
        lapi.add_decision("198.18.0.5", duration="1h")
        ... LapiClient(lapi.url, api_key=key).stream(startup=True) ...
        lapi.kill(); lapi.start()              # same database, same port

Tests keep its traffic inside a lab: ``Lapi(netns=lab.netns("server"), host=lab.info.server.ipv4)``
listens on the lab server's address, and a client in the gateway's namespace (a bouncer there,
or a test thread inside ``hybrid.lab.topology.netns(lab.netns("gw"))``) reaches it across the lab.

What it runs: ``crowdsec -c <tmp>/config.yaml -no-cs -no-capi``: the Local API only (no agent, no
acquisition, no hub, no Central API), SQLite in the temp dir, listening on a free port of
127.0.0.1 (or of ``host`` inside the network namespace ``netns``), optionally over HTTPS with a
throwaway CA (``tls=True``, made with ``openssl``; :attr:`Lapi.ca_file`). ``cscli -c <tmp>/config.yaml``
manages it: bouncers and machines go straight to the database; decisions go through the API as
the fixture's own machine ("hybrid-test-cscli"), exactly as an operator's cscli does.

Nothing under /etc/crowdsec or /var/lib/crowdsec is read or written (checked with strace: the
only other files opened are libraries and /etc/localtime), and the system's crowdsec service
does not need to run. On exit (also after a failure) the process is stopped (SIGTERM, SIGKILL
after :data:`STOP_TIMEOUT`) and the temp dir removed.

Facts of 1.4.6 this fixture works around (each verified on this machine):
- ``cscli decisions import`` overrides every line's scope with ``--scope`` (default ``Ip``), and
  stores the flag verbatim: ``--scope range`` is invisible to bouncers, ``--scope Range`` works.
  :meth:`Lapi.import_decisions` groups by scope and passes the LAPI's spelling.
- ``cscli decisions delete --range R`` deletes every decision *containing* R (a /16 too);
  :meth:`Lapi.delete_decision` deletes by exact value.
- every cscli call that uses the API logs in first (bcrypt): one cscli call takes ~0.15-0.3 s.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence

from hybrid.lab.topology import netns as in_netns

CROWDSEC = "crowdsec"
CSCLI = "cscli"
STOP_TIMEOUT = 10.0
START_TIMEOUT = 30.0
CSCLI_MACHINE = "hybrid-test-cscli"
# The LAPI's own spelling of the scopes it knows (a bouncer's scopes filter maps ip/range to these).
SCOPES = {"ip": "Ip", "range": "Range"}
INSTALL_HINT = "install Debian's crowdsec (apt-get install crowdsec; see scripts/setup.sh)"


IMPORT_TRIES = 5           # cscli decisions import attempts while SQLite says "database is locked"


class LapiFixtureError(RuntimeError):
    """The fixture could not do what it was asked; the message is one line."""


def missing() -> str | None:
    """Why a Lapi cannot run here (a skip reason), or None when crowdsec and cscli exist."""
    for tool in (CROWDSEC, CSCLI):
        if shutil.which(tool) is None:
            return f"'{tool}' not found: {INSTALL_HINT}"
    return None


def decision_values(n: int, *, family: int = 4, offset: int = 0) -> list[str]:
    """``n`` distinct host addresses from the test ranges (198.18.0.0/15 or 2001:2::/48),
    starting ``offset`` hosts in: values for decisions that never leave the test ranges."""
    net = ipaddress.ip_network("198.18.0.0/15" if family == 4 else "2001:2::/48")
    if offset < 0 or n < 0 or offset + n > net.num_addresses:
        raise ValueError(f"{n} addresses from offset {offset} do not fit in {net}")
    base = int(net.network_address) + offset
    cls = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    return [str(cls(base + i)) for i in range(n)]


def _yaml_str(s: str) -> str:
    return json.dumps(s)            # a JSON string is a valid YAML flow scalar


class Lapi:
    """A real CrowdSec Local API of its own; see the module docstring. Use as a context manager
    (or call :meth:`open` and :meth:`close`)."""

    def __init__(self, *, tls: bool = False, netns: str | None = None, host: str = "127.0.0.1",
                 port: int | None = None, log_level: str = "info", parent: str | None = None):
        self.tls, self.netns, self.host, self.log_level = tls, netns, host, log_level
        self.parent = parent
        self.port = port
        self.dir: str | None = None
        self.proc: subprocess.Popen | None = None
        self.ca_file: str | None = None
        self._cscli_password = ""
        self._log_offset = 0

    # -- paths ---------------------------------------------------------------------------------

    def _p(self, name: str) -> str:
        assert self.dir is not None, "Lapi is not open"
        return os.path.join(self.dir, name)

    @property
    def config(self) -> str:
        return self._p("config.yaml")

    @property
    def log_file(self) -> str:
        """The LAPI's own log (requests, decisions, errors)."""
        return self._p("crowdsec_api.log")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    # -- life cycle ----------------------------------------------------------------------------

    def __enter__(self) -> Lapi:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        """Write the config, register cscli's machine, start the LAPI and wait until it answers."""
        reason = missing()
        if reason:
            raise LapiFixtureError(reason)
        self.dir = tempfile.mkdtemp(prefix="hybrid-lapi-", dir=self.parent)
        try:
            os.mkdir(self._p("data"))
            os.mkdir(self._p("hub"))
            if self.tls:
                self._make_ca()
            pick = self.port is None
            for attempt in range(3):
                if pick:
                    self.port = self._free_port()
                self._write_config()
                if attempt == 0:
                    self._register_cscli()
                self._write_cscli_credentials()
                try:
                    self.start()
                    return
                except LapiFixtureError as exc:
                    # another process took the port between our probe and crowdsec's bind
                    if not pick or "address already in use" not in str(exc):
                        raise
            raise LapiFixtureError(f"no free port for the LAPI after 3 tries (last {self.port})")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the LAPI (if running) and remove the temp dir. Idempotent."""
        try:
            self.stop()
        finally:
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start crowdsec on the existing config and database (a restart after :meth:`stop` or
        :meth:`kill`: same database, same port) and return once ``/health`` answers."""
        if self.running:
            raise LapiFixtureError("the LAPI is already running")
        # /health alone could be another server that took the port: also wait for this run's
        # "listening" line in crowdsec's log
        with contextlib.suppress(OSError):
            self._log_offset = os.path.getsize(self._p("crowdsec.log"))
        out = open(self._p("crowdsec.out"), "ab")
        try:
            self.proc = subprocess.Popen(
                self._ns([shutil.which(CROWDSEC), "-c", self.config, "-no-cs", "-no-capi"]),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=self.dir,
                env={**os.environ, "LC_ALL": "C"})
        finally:
            out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.proc = None
                raise LapiFixtureError(f"crowdsec exited with status {rc} before answering: {self._tail()}")
            if self._listening() and self._healthy():
                return
            time.sleep(0.05)
        self.kill()
        raise LapiFixtureError(f"crowdsec did not answer on {self.url}/health within {timeout:g}s: {self._tail()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.running else None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT`; waits for the process. Idempotent."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL (a crash: no shutdown work); waits for the process. Idempotent."""
        self._signal(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _signal(self, sig: int) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # -- cscli ---------------------------------------------------------------------------------

    def cscli(self, *args: str, json_out: bool = False, timeout: float = 300.0):
        """Run ``cscli -c <config> ARGS``; with ``json_out``, ``-o json`` and the parsed output
        (None for cscli's ``null``), else stdout. A failure raises with cscli's last line."""
        argv = [shutil.which(CSCLI), "-c", self.config, *args]
        if json_out:
            argv += ["-o", "json"]
        proc = subprocess.run(self._ns(argv), capture_output=True, text=True, timeout=timeout,
                              cwd=self.dir, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
            raise LapiFixtureError(f"cscli {' '.join(args[:2])} failed ({proc.returncode}): {last}")
        if json_out:
            try:
                return json.loads(proc.stdout)
            except ValueError:
                raise LapiFixtureError(f"cscli {' '.join(args[:2])} printed no JSON: {proc.stdout[:200]!r}") from None
        return proc.stdout

    def add_bouncer(self, name: str) -> str:
        """Register a bouncer; returns its API key (the only time cscli shows it)."""
        key = self.cscli("bouncers", "add", name, "-o", "raw").strip()
        if not key or not key.isalnum():
            raise LapiFixtureError(f"cscli bouncers add {name} printed no key")
        return key

    def delete_bouncer(self, name: str) -> None:
        """Revoke a bouncer: its key is refused from the next request on."""
        self.cscli("bouncers", "delete", name)

    def bouncers(self) -> list[dict]:
        return self.cscli("bouncers", "list", json_out=True) or []

    def add_machine(self, name: str) -> tuple[str, str]:
        """Register a (validated) machine with a generated password; returns (machine_id,
        password). The password never appears on a command line (cscli generates it)."""
        out = self.cscli("machines", "add", name, "--auto", "-f", "-")
        creds = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
        if creds.get("login") != name or not creds.get("password"):
            raise LapiFixtureError(f"cscli machines add {name} printed no credentials")
        return name, creds["password"]

    def delete_machine(self, name: str) -> None:
        self.cscli("machines", "delete", name)

    def add_decision(self, value: str, duration: str = "4h", type: str = "ban",
                     scope: str | None = None, reason: str | None = None) -> None:
        """``cscli decisions add`` (through the API, origin "cscli"). ``scope``: "ip" or "range"
        (default: from the value), or any other scope name (then passed verbatim)."""
        scope = scope or ("range" if "/" in value else "ip")
        argv = ["decisions", "add", "--duration", duration, "--type", type]
        if scope.lower() == "ip":
            argv += ["--ip", value]
        elif scope.lower() == "range":
            argv += ["--range", value]
        else:
            argv += ["--scope", scope, "--value", value]
        if reason:
            argv += ["--reason", reason]
        self.cscli(*argv)

    def delete_decision(self, id: int | None = None, value: str | None = None) -> None:
        """Delete (the LAPI soft-deletes: expires now) one decision by id, or every decision
        whose value is exactly ``value``."""
        if (id is None) == (value is None):
            raise ValueError("delete_decision: give exactly one of id and value")
        if id is not None:
            self.cscli("decisions", "delete", "--id", str(int(id)))
        else:
            self.cscli("decisions", "delete", "--value", value)

    def decisions(self) -> list[dict]:
        """Every active decision (all origins, scopes and types, also those a longer decision on
        the same value hides from bouncers and from ``cscli decisions list``): dicts with id,
        origin, type, scope, value, duration, scenario, simulated, read from ``cscli alerts
        list --all`` (without ``--all``, cscli shows only origins crowdsec and cscli: not
        cscli-import, not hybrid). Expired ones (a duration Go writes with a "-") are left out."""
        alerts = self.cscli("alerts", "list", "--all", "--limit", "0", json_out=True) or []
        return [d for a in alerts for d in (a.get("decisions") or []) if not d["duration"].startswith("-")]

    def import_decisions(self, values: Iterable[str], *, duration: str = "4h", type: str = "ban",
                         reason: str = "hybrid-test-flood", scope: str | None = None) -> float:
        """Add many decisions at once (origin "cscli-import"): one ``cscli decisions import`` of
        a JSON file per scope (the fastest real way in 1.4.6: one login and one alert carrying
        every decision; 10,000 in about 1.5 s here). ``scope`` defaults to each value's own (a
        "/" makes it a range). Returns the wall time it took, in seconds."""
        by_scope: dict[str, list[dict]] = {}
        for v in values:
            sc = SCOPES.get((scope or ("range" if "/" in v else "ip")).lower(), scope)
            by_scope.setdefault(sc, []).append({"value": v, "duration": duration, "type": type,
                                                "reason": reason})
        t0 = time.perf_counter()
        for sc, rows in by_scope.items():
            path = self._p(f"import-{secrets.token_hex(4)}.json")
            with open(path, "w") as f:
                json.dump(rows, f)
            try:
                # A bouncer pulling meanwhile can make the import fail with "database is locked"
                # (SQLite; docs/crowdsec.md). It is tried again: decisions stored twice by a half
                # stored attempt are served once per value and type.
                for attempt in range(IMPORT_TRIES):
                    try:
                        self.cscli("decisions", "import", "-i", path, "--scope", sc)
                        break
                    except LapiFixtureError as exc:
                        if "database is locked" not in str(exc) or attempt == IMPORT_TRIES - 1:
                            raise
                        time.sleep(0.5)
            finally:
                os.unlink(path)
        return time.perf_counter() - t0

    def flood(self, n: int = 10_000, *, family: int = 4, offset: int = 0, duration: str = "4h") -> list[str]:
        """Import ``n`` IP bans on distinct test addresses; returns the values."""
        values = decision_values(n, family=family, offset=offset)
        self.import_decisions(values, duration=duration)
        return values

    # -- internals -----------------------------------------------------------------------------

    def _ns(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else list(argv)

    def _in_ns(self):
        """This thread in the LAPI's namespace (sockets made inside stay there)."""
        return in_netns(self.netns) if self.netns else contextlib.nullcontext()

    def _free_port(self) -> int:
        with self._in_ns(), socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET) as s:
            s.bind((self.host, 0))
            return s.getsockname()[1]

    def _listening(self) -> bool:
        try:
            with open(self._p("crowdsec.log"), errors="replace") as f:
                f.seek(self._log_offset)
                return f"CrowdSec Local API listening on {self._listen_uri()}" in f.read()
        except OSError:
            return False

    def _listen_uri(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _healthy(self) -> bool:
        try:
            if self.tls:
                ctx = ssl.create_default_context(cafile=self.ca_file)
                conn = http.client.HTTPSConnection(self.host, self.port, timeout=1, context=ctx)
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=1)
            try:
                with self._in_ns():
                    conn.connect()
                conn.request("GET", "/health")
                return conn.getresponse().status == 200
            finally:
                conn.close()
        except (OSError, http.client.HTTPException):
            return False

    def _tail(self) -> str:
        """The last error line of crowdsec's logs, else the last line of its output."""
        found = last = ""
        for name in ("crowdsec.out", "crowdsec.log", "crowdsec_api.log"):
            with contextlib.suppress(OSError), open(self._p(name), errors="replace") as f:
                for line in f:
                    if "level=fatal" in line or "level=error" in line:
                        found = line.strip()
                    elif name == "crowdsec.out" and line.strip():
                        last = line.strip()
        return found or last or "no output"

    def _write_config(self) -> None:
        d = self.dir
        tls = ""
        if self.tls:
            tls = (f"    tls:\n      cert_file: {_yaml_str(self._p('server.pem'))}\n"
                   f"      key_file: {_yaml_str(self._p('server.key'))}\n")
        files = {
            "config.yaml": f"""\
common:
  daemonize: false
  log_media: file
  log_level: {self.log_level}
  log_dir: {_yaml_str(d + '/')}
  working_dir: {_yaml_str(d)}
config_paths:
  config_dir: {_yaml_str(d + '/')}
  data_dir: {_yaml_str(self._p('data') + '/')}
  simulation_path: {_yaml_str(self._p('simulation.yaml'))}
  hub_dir: {_yaml_str(self._p('hub') + '/')}
  index_path: {_yaml_str(self._p('hub/.index.json'))}
  notification_dir: {_yaml_str(self._p('notifications') + '/')}
  plugin_dir: {_yaml_str(self._p('plugins') + '/')}
crowdsec_service:
  acquisition_path: {_yaml_str(self._p('acquis.yaml'))}
cscli:
  output: human
  color: "no"
db_config:
  log_level: {self.log_level}
  type: sqlite
  db_path: {_yaml_str(self._p('data/crowdsec.db'))}
  use_wal: true
api:
  client:
    insecure_skip_verify: {'true' if self.tls else 'false'}
    credentials_path: {_yaml_str(self._p('local_api_credentials.yaml'))}
  server:
    log_level: {self.log_level}
    listen_uri: {_yaml_str(self._listen_uri())}
    profiles_path: {_yaml_str(self._p('profiles.yaml'))}
    console_path: {_yaml_str(self._p('console.yaml'))}
    trusted_ips:
      - 127.0.0.1
      - ::1
{tls}prometheus:
  enabled: false
""",
            # the Debian default profile: an alert without decisions about an Ip gets a 4h ban
            "profiles.yaml": """\
name: default_ip_remediation
filters:
 - Alert.Remediation == true && Alert.GetScope() == "Ip"
decisions:
 - type: ban
   duration: 4h
on_success: break
""",
            "simulation.yaml": "simulation: off\n",
            "acquis.yaml": "",
        }
        for name, text in files.items():
            with open(self._p(name), "w") as f:
                f.write(text)

    def _register_cscli(self) -> None:
        out = self.cscli("machines", "add", CSCLI_MACHINE, "--auto", "-f", "-")
        creds = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
        if not creds.get("password"):
            raise LapiFixtureError("cscli machines add printed no password for cscli's own machine")
        self._cscli_password = creds["password"]

    def _write_cscli_credentials(self) -> None:
        path = self._p("local_api_credentials.yaml")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"url: {_yaml_str(self.url)}\nlogin: {_yaml_str(CSCLI_MACHINE)}\n"
                    f"password: {_yaml_str(self._cscli_password)}\n")

    def _make_ca(self) -> None:
        """A throwaway CA and a server certificate for ``host`` (EC P-256, 2 days), signed by it."""
        openssl = shutil.which("openssl")
        if openssl is None:
            raise LapiFixtureError("'openssl' not found: apt-get install openssl")
        ca_key, ca, key, csr, cert = (self._p(n) for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
        ext = self._p("server.ext")
        san = f"IP:{self.host}" if _is_ip(self.host) else f"DNS:{self.host}"
        with open(ext, "w") as f:
            f.write(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
                    "extendedKeyUsage=serverAuth\n")
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        for argv in ([openssl, "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2",
                      "-subj", "/CN=hybrid test LAPI CA"],
                     [openssl, "req", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={self.host}"],
                     [openssl, "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
                      "-out", cert, "-days", "2", "-extfile", ext]):
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            if proc.returncode != 0:
                raise LapiFixtureError(f"openssl {argv[1]} failed: {(proc.stderr.strip() or '?').splitlines()[-1]}")
        self.ca_file = ca


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False
