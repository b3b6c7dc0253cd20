"""A stand-in for the kernel's flow table in engine unit tests (hybrid.datapath.maps.Maps): it
records the flow verdicts the engine writes, and answers the engine's one question about a
connection (``get_flow``) with an entry shaped exactly as tc keeps it (abi.Flow), built by
:meth:`FlowTableFake.connection` from the client's first packet."""

from __future__ import annotations

from hybrid.engine.packet import decode
from hybrid.kernel import abi


class FlowTableFake:
    """``writes``: (verdict, ttl_ns) in order; ``conn_scoped``: the flag of each write; ``follows``:
    the follow-ups written (hybrid.engine.follow)."""

    def __init__(self):
        self.writes: list[tuple[int, int | None]] = []
        self.conn_scoped: list[bool] = []
        self.follows: list = []
        self.flows: dict[bytes, abi.Flow] = {}

    def get_flow(self, key: abi.FlowKey) -> abi.Flow | None:
        return self.flows.get(bytes(key))

    def write_verdict(self, key: bytes, verdict: int | None, ttl_ns: int | None, conn_scoped: bool = False,
                      follow=None) -> None:
        if follow is not None:          # the follow-up (hybrid.engine.follow): kept apart
            self.follows.append(follow)
        if verdict is None:             # only the follow-up was written
            return
        self.writes.append((verdict, ttl_ns))
        self.conn_scoped.append(conn_scoped)

    def connection(self, client_packet: bytes, *, isn: int | None = None, server_isn: int | None = 7,
                   ttl: int = 64, server_ttl: int = 64, handshake: bool = True) -> abi.Flow:
        """The entry tc keeps for the TCP or UDP connection that ``client_packet`` (IP bytes, sent
        by the client) belongs to, as if tc had seen its SYN (``isn``: by default the client's
        first payload byte is the stream's first) and, with ``handshake``, the SYN-ACK."""
        pkt = decode(client_packet)
        key, direction = pkt.flow_key()
        flow = abi.Flow()
        flags = abi.FLOW_ORIG_HI if direction else 0
        if pkt.proto == 6 and handshake:
            seq = pkt.tcp_seq - 1 if isn is None else isn
            flow.isn[direction] = seq & 0xFFFFFFFF
            flow.isn[1 - direction] = server_isn
            flags |= abi.FLOW_ISN0 | abi.FLOW_ISN1
        flow.flags = flags
        flow.ttl_max[direction] = ttl
        flow.ttl_max[1 - direction] = server_ttl
        self.flows[key] = flow
        return flow
