"""Example plugin: drop UDP datagrams bigger than 1000 bytes, let the other rules decide the rest.

Referenced from a rules file as ``plugin = "sizecheck:decide"`` with this directory in
``plugin_paths``. A plugin gets the packet and returns a Verdict (the rule matches) or None (it
does not); an exception counts as "does not match" and is logged, rate-limited.
"""

from hybrid.plugin import Verdict

LIMIT = 1000


def decide(packet):
    if packet.proto == 17 and packet.payload_len > LIMIT:
        return Verdict("drop", flow="block", ttl=30)
    return None


def explode(packet):
    """Always fails: used by the tests to show a failing plugin never stops the engine."""
    raise RuntimeError("example failure")
