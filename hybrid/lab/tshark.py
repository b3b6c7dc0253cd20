"""An independent oracle for the names hybrid decides on: what Wireshark's dissectors read.

hybrid reads a TLS server_name, an HTTP Host and a DNS question name with its own parsers (in
the engine, hybrid/engine/packet.py and quic.py, and in the kernel's name reader, bpf/names.h).
A test that compares those with a second, unrelated implementation catches the mistakes that a
test written from the same understanding would repeat. :func:`names` asks ``tshark`` (Debian's
package, installed by scripts/setup.sh) which names each frame of a capture carries:

- ``tls_sni``: ``tls.handshake.extensions_server_name`` of a TLS ClientHello over TCP;
- ``quic_sni``: the same field in a QUIC Initial (tshark 4.0 derives the Initial keys and
  dissects the ClientHello inside, as hybrid does);
- ``http_host``: ``http.host``, each request's Host header (one per pipelined request);
- ``dns_qname``: ``dns.qry.name`` of DNS *queries* only (``dns.flags.response == 0``); the
  names a response repeats are not the client's.

tshark reassembles TCP, so a name split over segments is reported on the frame that completes
it, which is also the segment hybrid decides on. Names are returned as tshark shows them (case
kept; tshark shows a DNS root or empty name as ``<Root>``); comparing them with hybrid's
lower-cased forms is the caller's business. tshark decodes HTTP, TLS and DNS on their usual
ports: ``decode_as`` adds others (``"tcp.port==8080,http"``, tshark's ``-d``).

tshark missing, a file it cannot read (not a capture, cut short, missing): one
:class:`~hybrid.errors.HybridError` line, never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Sequence
from typing import NamedTuple

from hybrid.errors import HybridError, ToolMissingError
from hybrid.kernel import sysutil

log = logging.getLogger(__name__)

KINDS = ("tls_sni", "quic_sni", "http_host", "dns_qname")
TIMEOUT = 300.0

_SNI = "tls.handshake.extensions_server_name"
_FIELDS = ("frame.number", "frame.protocols", _SNI, "http.host", "dns.flags.response", "dns.qry.name")
_FILTER = f"{_SNI} or http.host or (dns.flags.response == 0 and dns.qry.name)"
# tshark's own chatter on stderr that is not an error
_NOISE = ("Running as user",)


class Name(NamedTuple):
    frame: int       # 1-based frame number, as tshark and Wireshark number them
    kind: str        # one of KINDS
    name: str


def tshark_path() -> str:
    """tshark's path, or a ToolMissingError that says how to install it."""
    try:
        return sysutil.which("tshark")
    except ToolMissingError:
        raise ToolMissingError("'tshark' not found: install it (apt-get install tshark) or run "
                               "scripts/setup.sh") from None


def names(capture: str | os.PathLike, *, decode_as: Sequence[str] = ()) -> list[Name]:
    """Every (frame, kind, name) Wireshark's dissectors read in ``capture`` (pcap or pcapng), in
    frame order (within a frame: SNI, Host, DNS, each in the order of the packet)."""
    path = os.fspath(capture)
    if not os.path.isfile(path):
        raise HybridError(f"{path}: no such capture file")
    if os.path.getsize(path) == 0:                  # tshark reads an empty file as no packets
        raise HybridError(f"tshark cannot read {path}: the file is empty, not a capture")
    argv = [tshark_path(), "-n", "-r", path, "-Y", _FILTER, "-T", "json"]
    for d in decode_as:
        argv += ["-d", d]
    for field in _FIELDS:
        argv += ["-e", field]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, errors="replace")
    except subprocess.TimeoutExpired:
        raise HybridError(f"tshark took more than {TIMEOUT:g} s to read {path}") from None
    if proc.returncode != 0:
        raise HybridError(f"tshark cannot read {path}: {_reason(proc.stderr) or f'exit status {proc.returncode}'}")
    try:
        packets = json.loads(proc.stdout) if proc.stdout.strip() else []
    except ValueError:
        raise HybridError(f"tshark's output for {path} is not JSON: {sysutil.last_line(proc.stdout)[:200]}") from None
    out: list[Name] = []
    for packet in packets:
        out += _frame_names(packet.get("_source", {}).get("layers", {}))
    return out


def _frame_names(layers: dict) -> list[Name]:
    frame = int(layers["frame.number"][0])
    protocols = set(layers.get("frame.protocols", [""])[0].split(":"))
    found = []
    sni_kind = "quic_sni" if "quic" in protocols else "tls_sni"
    found += [Name(frame, sni_kind, n) for n in layers.get(_SNI, [])]
    found += [Name(frame, "http_host", n) for n in layers.get("http.host", [])]
    # dns.flags.response is one value per DNS message in the frame (TCP may carry several), and
    # dns.qry.name one per question: a frame that mixes queries and responses is rare enough to
    # take as a whole (only a frame whose every message is a query gives its names).
    responses = layers.get("dns.flags.response", [])
    if responses and all(r in ("0", "False", "false") for r in responses):
        found += [Name(frame, "dns_qname", n) for n in layers.get("dns.qry.name", [])]
    return found


def _reason(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.strip().startswith(_NOISE)]
    return lines[-1].removeprefix("tshark: ") if lines else ""
