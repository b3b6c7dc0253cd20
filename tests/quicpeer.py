"""A QUIC client and server (aioquic) for the lab tests, each run in a namespace with
``ip netns exec NS python quicpeer.py ...``.

  quicpeer.py server --port 443 --cert C --key K
      An echo server (ALPN hq-interop): each stream's bytes come back, then its end. Prints
      "ready" once bound, then one JSON line per ClientHello it parses, {"sni": name}: aioquic's
      own parser, watched, so the log says exactly which names the server read.
  quicpeer.py client --host ADDR --port 443 --sni NAME [--pq] [--version 1|2] [--timeout S]
      Connects, sends "ping NAME" on a stream and reads the echo. Prints one JSON line,
      {"ok": true, "echo": "..."} or {"ok": false, "error": "TimeoutError"}. --pq: aioquic's
      quantum-readiness test pads the ClientHello by 1200 bytes, so it spans two datagrams as a
      browser's post-quantum one does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys

from aioquic import tls
from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import StreamDataReceived
from aioquic.quic.packet import QuicProtocolVersion

ALPN = ["hq-interop"]
VERSIONS = {1: QuicProtocolVersion.VERSION_1, 2: QuicProtocolVersion.VERSION_2}


class Echo(QuicConnectionProtocol):
    def quic_event_received(self, event) -> None:
        if isinstance(event, StreamDataReceived):
            self._quic.send_stream_data(event.stream_id, event.data, end_stream=event.end_stream)
            self.transmit()


def watch_client_hellos() -> None:
    """Print the server_name of each ClientHello aioquic's server parses."""
    real = tls.pull_client_hello

    def watched(buf):
        hello = real(buf)
        print(json.dumps({"sni": hello.server_name}), flush=True)
        return hello
    tls.pull_client_hello = watched


async def run_server(args) -> None:
    cfg = QuicConfiguration(is_client=False, alpn_protocols=ALPN)
    cfg.load_cert_chain(args.cert, args.key)
    watch_client_hellos()
    await serve("::", args.port, configuration=cfg, create_protocol=Echo)
    print("ready", flush=True)
    await asyncio.Event().wait()


async def run_client(args) -> dict:
    cfg = QuicConfiguration(is_client=True, alpn_protocols=ALPN, server_name=args.sni, verify_mode=ssl.CERT_NONE,
                            quantum_readiness_test=args.pq)
    if args.version:
        cfg.supported_versions = [VERSIONS[args.version]]
    try:
        async with asyncio.timeout(args.timeout):
            async with connect(args.host, args.port, configuration=cfg) as conn:
                reader, writer = await conn.create_stream()
                writer.write(f"ping {args.sni}".encode())
                writer.write_eof()
                data = await reader.read()
    except Exception as exc:  # noqa: BLE001 - the test reads the outcome
        return {"ok": False, "error": type(exc).__name__}
    return {"ok": True, "echo": data.decode(errors="replace")}


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("--port", type=int, default=443)
    s.add_argument("--cert", required=True)
    s.add_argument("--key", required=True)
    c = sub.add_parser("client")
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, default=443)
    c.add_argument("--sni", required=True)
    c.add_argument("--pq", action="store_true")
    c.add_argument("--version", type=int, choices=sorted(VERSIONS))
    c.add_argument("--timeout", type=float, default=3.0)
    args = ap.parse_args()
    if args.role == "server":
        try:
            asyncio.run(run_server(args))
        except KeyboardInterrupt:
            pass
        return
    print(json.dumps(asyncio.run(run_client(args))), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
