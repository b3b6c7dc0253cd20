"""Real servers inside a lab namespace, for the demo and the integration tests.

Each server is a context manager: ``__enter__`` starts it in its own temp dir and returns once
its ports are listening (polled with ``ss``, never a fixed sleep); ``__exit__`` stops it
(SIGTERM, SIGKILL after 5 s), closes every file it opened and removes the temp dir. Paths such
as :attr:`Nginx.cert` are valid inside the ``with`` block only. No system configuration is read
or written: every program gets its config on the command line or from the temp dir.

- :class:`Nginx`: HTTP, and HTTPS with a throwaway self-signed certificate (``openssl`` CLI).
- :class:`Dns`: dnsmasq (Debian's ``dnsmasq-base``, no system service) answering A/AAAA for
  given names, NXDOMAIN for any other name, no upstream.
- :class:`UdpSink`: a socket in the namespace that keeps the exact bytes of every datagram.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from hybrid.errors import ConfigError, HybridError, ToolMissingError
from hybrid.kernel import sysutil
from hybrid.lab.topology import Lab, netns

log = logging.getLogger(__name__)

# Debian packages of the tools used here (sysutil's table does not know them).
_PACKAGES = {"dnsmasq": "dnsmasq-base", "openssl": "openssl", "nginx": "nginx-light"}
STOP_TIMEOUT = 5.0


def _tool(name: str) -> str:
    try:
        return sysutil.which(name)
    except ToolMissingError:
        raise ToolMissingError(f"'{name}' not found: install it (apt-get install {_PACKAGES.get(name, name)}) "
                               f"or run scripts/setup.sh") from None


def _addresses(lab: Lab, role: str) -> list[str]:
    """The lab addresses of ``role`` (IPv4 first), the ones a server there listens on."""
    i = lab.info
    hosts = {"client": [i.client], "server": [i.server], "gw": [i.gw_client, i.gw_server]}
    lab.netns(role)   # validates the role
    return [h.ipv4 for h in hosts[role]] + [h.ipv6 for h in hosts[role]]


def _listening(lab: Lab, role: str, port: int, udp: bool = False, pid: int | None = None) -> bool:
    """Something (with ``pid``: that process) listens on TCP/binds UDP ``port`` in the namespace."""
    flags = ("-Hlun" if udp else "-Hltn") + ("p" if pid is not None else "")
    out = lab.run(role, ["ss", flags, f"sport = :{port}"], check=False).stdout
    return f"pid={pid}," in out if pid is not None else bool(out.strip())


def _wait_port(lab: Lab, role: str, port: int, timeout: float = 5.0, *, udp: bool = False,
               proc: subprocess.Popen | None = None, logfile: str | None = None) -> None:
    """Return once something listens on TCP (or binds UDP) ``port`` in ``role``'s namespace.
    With ``proc``, the socket must be that process's own (not a previous server's still on the
    port), and its exit fails at once, quoting ``logfile``'s last line. (``lab.popen`` runs
    ``ip netns exec``, which execs the program: ``proc.pid`` is the server's pid.)"""
    deadline = time.monotonic() + timeout
    pid = proc.pid if proc is not None else None
    while time.monotonic() < deadline:
        if _listening(lab, role, port, udp, pid):
            return
        if proc is not None and proc.poll() is not None:
            raise HybridError(f"{_progname(proc)} exited "
                              f"with status {proc.returncode} in {lab.netns(role)} before listening on port "
                              f"{port}: {_tail(logfile) or 'no output'}")
        time.sleep(0.05)
    raise HybridError(f"nothing listens on {'UDP' if udp else 'TCP'} port {port} in {lab.netns(role)} "
                      f"after {timeout:g}s{': ' + _tail(logfile) if _tail(logfile) else ''}")


def _progname(proc: subprocess.Popen) -> str:
    # lab.popen runs "ip netns exec NS PROGRAM ...": the program is the fifth word.
    args = list(proc.args) if isinstance(proc.args, (list, tuple)) else [str(proc.args)]
    return os.path.basename(str(args[4] if len(args) > 4 else args[0]))


def _tail(path: str | None) -> str:
    if not path:
        return ""
    try:
        with open(path, errors="replace") as f:
            return sysutil.last_line(f.read())
    except OSError:
        return ""


def _stop(proc: subprocess.Popen | None) -> None:
    """SIGTERM, SIGKILL after STOP_TIMEOUT, reap; close any pipes."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


class _Server:
    """Temp dir + one process + cleanup; subclasses implement ``_start``."""

    prefix = "hybrid-server-"

    def __init__(self, lab: Lab, role: str):
        lab.netns(role)   # validates the role early
        self.lab, self.role = lab, role
        self.dir: str | None = None
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:   # pragma: no cover - abstract
        raise NotImplementedError

    def __enter__(self):
        self.dir = tempfile.mkdtemp(prefix=self.prefix)
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            _stop(self.proc)
        finally:
            self.proc = None
            if self.dir:
                shutil.rmtree(self.dir, ignore_errors=True)

    def _popen(self, argv: Sequence[str], logname: str) -> str:
        """Start ``argv`` in the namespace with stdout/stderr to a log file in the temp dir."""
        logfile = os.path.join(self.dir, logname)
        with open(logfile, "wb") as out:   # the child keeps its own copy of the descriptor
            self.proc = self.lab.popen(self.role, argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        return logfile


class Nginx(_Server):
    """nginx serving a small static site (``index.html``) in a lab namespace, on ``port`` (HTTP,
    IPv4 and IPv6) and, with ``tls_port``, HTTPS with a self-signed certificate made at start for
    ``server_names`` (CN = the first, SANs = all of them and the host's addresses). One default
    server answers any Host/SNI. Verify with ``curl --cacert nginx.cert --resolve NAME:PORT:ADDR``.
    """

    prefix = "hybrid-nginx-"
    INDEX = "hello from the hybrid lab\n"

    def __init__(self, lab: Lab, role: str = "server", port: int = 80, root: str | None = None, *,
                 tls_port: int | None = None, server_names: Sequence[str] = ("example.test",),
                 extra_servers: str = ""):
        super().__init__(lab, role)
        if tls_port is not None and not server_names:
            raise ConfigError("Nginx with tls_port needs at least one server name for the certificate")
        self.port, self.tls_port = port, tls_port
        self.server_names = tuple(server_names)
        self.extra_servers = extra_servers
        self._root = root
        self.root: str | None = root
        self.conf: str | None = None
        self.cert: str | None = None   # PEM certificate (also the CA a client trusts), with tls_port
        self.key: str | None = None

    def _start(self) -> None:
        d = self.dir
        self.root = self._root or os.path.join(d, "www")
        os.makedirs(self.root, exist_ok=True)
        if self._root is None:
            with open(os.path.join(self.root, "index.html"), "w") as f:
                f.write(self.INDEX)
        listen = f"listen {self.port} reuseport; listen [::]:{self.port} reuseport;"
        tls = ""
        if self.tls_port is not None:
            self._make_cert()
            listen += f" listen {self.tls_port} ssl reuseport; listen [::]:{self.tls_port} ssl reuseport;"
            tls = f"ssl_certificate {self.cert}; ssl_certificate_key {self.key};"
        self.conf = os.path.join(d, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(f"""daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d};
  fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};
  keepalive_requests 100000;
  server {{ {listen} root {self.root}; {tls} }}
{self.extra_servers} }}
""")
        logfile = self._popen([_tool("nginx"), "-c", self.conf, "-e", f"{d}/error.log"], "stderr.log")
        for port in (self.port, self.tls_port):
            if port is not None:
                _wait_port(self.lab, self.role, port, proc=self.proc, logfile=logfile)

    def _make_cert(self) -> None:
        self.cert, self.key = os.path.join(self.dir, "cert.pem"), os.path.join(self.dir, "key.pem")
        sans = [f"DNS:{n}" for n in self.server_names] + [f"IP:{a}" for a in _addresses(self.lab, self.role)]
        sysutil.run([_tool("openssl"), "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                     "-nodes", "-keyout", self.key, "-out", self.cert, "-days", "2",
                     "-subj", f"/CN={self.server_names[0]}", "-addext", f"subjectAltName={','.join(sans)}"],
                    what="making the lab's TLS certificate")


class Dns(_Server):
    """dnsmasq on port 53 (UDP and TCP) of ``role``'s lab addresses, answering exactly the names
    in ``records`` (name -> one address or several, IPv4 and/or IPv6): A/AAAA from those, NODATA
    for a missing type, NXDOMAIN for every other name (subdomains too). No upstream, no
    /etc/hosts, no /etc/dnsmasq.conf; queries are logged to :attr:`log`."""

    prefix = "hybrid-dns-"

    def __init__(self, lab: Lab, role: str = "server",
                 records: Mapping[str, str | Iterable[str]] | None = None, port: int = 53):
        super().__init__(lab, role)
        if records is None:
            records = {"example.test": [lab.info.server.ipv4, lab.info.server.ipv6]}
        self.port = port
        self.records: dict[str, list[str]] = {}
        for name, addrs in records.items():
            addrs = [addrs] if isinstance(addrs, str) else list(addrs)
            try:
                addrs = [str(ipaddress.ip_address(a)) for a in addrs]
            except ValueError as exc:
                raise ConfigError(f"Dns record {name!r}: {exc}") from None
            if not name or "," in name or "/" in name or not addrs:
                raise ConfigError(f"Dns record {name!r}: need a plain name and at least one address")
            self.records[name.rstrip(".").lower()] = addrs
        self.log: str | None = None

    def _start(self) -> None:
        argv = [_tool("dnsmasq"),
                "--no-daemon",            # foreground, and TCP queries in-process (no forked children)
                "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                "--local=/#/",            # every name is local: unknown -> NXDOMAIN, never forwarded
                "--bind-interfaces", f"--listen-address={','.join(_addresses(self.lab, self.role))}",
                f"--port={self.port}", f"--pid-file={self.dir}/dnsmasq.pid",
                "--log-facility=-", "--log-queries"]   # log to stderr (our file), never syslog
        # --host-record, not --address=/name/: exact names only, NODATA for the missing type.
        argv += [f"--host-record={name},{','.join(addrs)}" for name, addrs in self.records.items()]
        self.log = self._popen(argv, "dnsmasq.log")
        _wait_port(self.lab, self.role, self.port, proc=self.proc, logfile=self.log)
        _wait_port(self.lab, self.role, self.port, udp=True, proc=self.proc, logfile=self.log)


@dataclass(frozen=True)
class Datagram:
    data: bytes
    src: str     # sender address (IPv4 in dotted form even on the dual-stack socket)
    sport: int


class UdpSink:
    """A dual-stack UDP socket on ``port`` in ``role``'s namespace, read by a thread that keeps
    every datagram's exact bytes in :attr:`received`. ``wait(n)`` blocks until n have arrived."""

    def __init__(self, lab: Lab, role: str = "server", port: int = 9999):
        self.netns = lab.netns(role)
        self.lab, self.role, self.port = lab, role, port
        self.received: list[Datagram] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def payloads(self) -> list[bytes]:
        with self._cond:
            return [d.data for d in self.received]

    def __enter__(self) -> UdpSink:
        with netns(self.netns):
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", self.port))
            sock.settimeout(0.1)   # so the reader notices _stop
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._thread = threading.Thread(target=self._read, name=f"udpsink-{self.netns}:{self.port}", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            src = addr[0].removeprefix("::ffff:") if addr[0].startswith("::ffff:") else addr[0]
            with self._cond:
                self.received.append(Datagram(data, src, addr[1]))
                self._cond.notify_all()

    def wait(self, count: int = 1, timeout: float = 5.0) -> list[bytes]:
        """The payloads once at least ``count`` datagrams have arrived; HybridError on timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.received) >= count, timeout):
                raise HybridError(f"UDP sink {self.netns}:{self.port}: {len(self.received)} of {count} "
                                  f"datagrams after {timeout:g}s")
            return [d.data for d in self.received]

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def udp_send_from_client(lab: Lab, payload: bytes, port: int, sport: int = 0, *, ipv6: bool = False) -> int:
    """Send one datagram client -> server ``port`` (from ``sport``, 0 = any); the source port used."""
    fam = socket.AF_INET6 if ipv6 else socket.AF_INET
    src = lab.info.client.ipv6 if ipv6 else lab.info.client.ipv4
    dst = lab.info.server.ipv6 if ipv6 else lab.info.server.ipv4
    with netns(lab.netns("client")):
        sock = socket.socket(fam, socket.SOCK_DGRAM)
    with contextlib.closing(sock):
        sock.bind((src, sport))
        sock.sendto(payload, (dst, port))
        return sock.getsockname()[1]


def iperf3(lab: Lab, seconds: float, *, port: int = 5201, client: Sequence[str] = (),
           server: Sequence[str] = (), parse: bool = True) -> dict | None:
    """One iperf3 run client -> server through the gateway: a one-shot server (``-s -1``, plus
    ``server`` options) and a client for ``seconds`` (plus ``client`` options, e.g. ``-P 4`` or
    ``-u -b 0 -l 64``). The client's parsed JSON result (``-J``), or None with ``parse=False``
    (the client's own failure is then not checked). The server is stopped in every case."""
    srv = lab.popen("server", ["iperf3", "-s", "-1", *server, "-B", lab.info.server.ipv4, "-p", str(port)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(lab, "server", port)
        proc = lab.run("client", ["iperf3", *client, "-c", lab.info.server.ipv4, "-p", str(port),
                                  "-t", str(seconds), *(["-J"] if parse else [])],
                       timeout=seconds + 30, check=False, what="iperf3 client")
        if not parse:
            return None
        try:
            result = json.loads(proc.stdout)
        except ValueError:
            raise HybridError(f"iperf3 failed: {sysutil.last_line(proc.stderr) or 'no output'}") from None
        if "error" in result:
            raise HybridError(f"iperf3 failed: {result['error']}")
        return result
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            srv.wait(timeout=5)
        if srv.poll() is None:
            srv.kill()
            srv.wait()
