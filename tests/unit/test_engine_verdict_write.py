"""Maps.write_verdict() starting from the entry get_flow() just read (one flow-table read per
engine decision): the bpf() calls stand in for a flow table held in a dict, so the test counts
the reads and checks that what tc keeps in the entry survives the write."""

import ctypes

import pytest

from hybrid.datapath import maps as mapsmod
from hybrid.kernel import abi

pytestmark = pytest.mark.unit
KEY = bytes(range(40))


class Table:
    """The flow table as a dict of key bytes -> value bytes; counts lookups and updates."""

    def __init__(self):
        self.entries: dict[bytes, bytes] = {}
        self.lookups = self.updates = 0

    def lookup(self, fd, key, value, *, name="map"):
        self.lookups += 1
        raw = self.entries.get(bytes(key))
        if raw is None:
            return False
        ctypes.memmove(ctypes.addressof(value), raw, len(raw))
        return True

    def update(self, fd, key, value, flags=0, *, name="map"):
        self.updates += 1
        self.entries[bytes(key)] = bytes(value)


@pytest.fixture
def table(monkeypatch):
    t = Table()
    monkeypatch.setattr(mapsmod.bpfsys, "map_lookup", t.lookup)
    monkeypatch.setattr(mapsmod.bpfsys, "map_update", t.update)
    return t


@pytest.fixture
def maps(table):
    m = object.__new__(mapsmod.Maps)          # no kernel: fds are never used by the stand-ins
    m._fds = {name: -1 for name in abi.MAP_NAMES}
    m._scratch, m._pin_scratch, m._last_prune_ns = abi.Flow(), abi.PinnedVerdict(), None
    yield m
    m._fds = {}


def tc_entry(table: Table, key: bytes) -> None:
    flow = abi.Flow()
    flow.flags = abi.FLOW_ISN0 | abi.FLOW_ISN1
    flow.isn[0], flow.isn[1] = 1000, 5000
    flow.ttl_max[0], flow.ttl_max[1] = 64, 63
    flow.packets[0] = 3
    table.entries[key] = bytes(flow)


def written(table: Table, key: bytes) -> abi.Flow:
    return abi.Flow.from_buffer_copy(table.entries[key])


def test_a_write_after_the_read_of_the_same_key_reads_nothing_more_and_keeps_the_entry(table, maps):
    tc_entry(table, KEY)
    key = bytes(KEY)
    assert maps.get_flow(key).isn[1] == 5000
    maps.write_verdict(key, abi.VERDICT_BYPASS, 10**9, conn_scoped=True)
    assert (table.lookups, table.updates) == (1, 1)
    flow = written(table, KEY)
    assert flow.verdict == abi.VERDICT_BYPASS and flow.flags & abi.FLOW_CONN_VERDICT
    assert (flow.isn[0], flow.isn[1], flow.ttl_max[1], flow.packets[0]) == (1000, 5000, 63, 3)


def test_a_read_that_found_nothing_makes_a_fresh_entry(table, maps):
    key = bytes(KEY)
    assert maps.get_flow(key) is None
    maps.write_verdict(key, abi.VERDICT_BYPASS, 10**9)
    assert (table.lookups, table.updates) == (1, 1)
    flow = written(table, KEY)
    assert flow.flags == 0 and flow.first_seen_ns == flow.last_seen_ns > 0


def test_another_key_object_reads_again(table, maps):
    """Equal bytes, another object: the read is only reused for the key it was made under (the
    engine's one packet), never for a later packet of the same flow."""
    tc_entry(table, KEY)
    maps.get_flow(bytes(KEY))
    maps.write_verdict(bytearray(KEY), abi.VERDICT_BYPASS, 10**9)
    assert (table.lookups, table.updates) == (2, 1)


def test_a_read_serves_one_write_only(table, maps):
    """A second write (or a write of another flow in between) reads the entry again: the first
    write changed the buffer the read was in, and tc may have changed the entry since."""
    tc_entry(table, KEY)
    key = bytes(KEY)
    maps.get_flow(key)
    maps.write_verdict(key, abi.VERDICT_INSPECT, 10**9)
    table.entries[KEY] = bytes(table.entries[KEY])      # (tc's next packet would rewrite it)
    maps.write_verdict(key, abi.VERDICT_BYPASS, 10**9)
    assert (table.lookups, table.updates) == (2, 2)


def test_an_old_read_is_not_reused(table, maps, monkeypatch):
    tc_entry(table, KEY)
    key = bytes(KEY)
    maps.get_flow(key)
    later = maps._read_ns + mapsmod.READ_REUSE_NS
    monkeypatch.setattr(mapsmod.time, "monotonic_ns", lambda: later)
    maps.write_verdict(key, abi.VERDICT_BYPASS, 10**9)
    assert (table.lookups, table.updates) == (2, 1)


def test_get_flow_returns_a_copy_the_write_does_not_touch(table, maps):
    tc_entry(table, KEY)
    key = bytes(KEY)
    mine = maps.get_flow(key)
    maps.write_verdict(key, abi.VERDICT_BYPASS, 10**9)
    assert mine.verdict == abi.VERDICT_NONE
