"""The Python mirror (hybrid/abi.py) against what bcc compiled from bpf/hybrid_common.h, the
maps the kernel created, the pinned variant (reopened by a second compile), and the three ways
Maps finds an instance's maps."""

from __future__ import annotations

import ctypes
import os
import subprocess
import tempfile

import pytest

from hybrid.datapath import loader
from hybrid.datapath.maps import Maps
from hybrid.errors import ConfigError, KernelFeatureError, NotFoundError
from hybrid.kernel import abi, bpfsys

pytestmark = pytest.mark.bpf


def _layout(ctype) -> list[tuple[str, int, int]]:
    """(name, offset, size) of every named field; bcc adds its own padding fields (__pad_*)."""
    if not hasattr(ctype, "_fields_"):
        return [("", 0, ctypes.sizeof(ctype))]
    out = []
    for name, _ in ctype._fields_:
        if name.startswith("__pad"):
            continue
        field = getattr(ctype, name)
        out.append((name, field.offset, field.size))
    return out


@pytest.mark.parametrize("name", [n for n in abi.MAP_NAMES + abi.NAME_CACHE_MAPS if n in abi.MAP_LAYOUTS])
def test_python_mirror_matches_bcc(datapath, name):
    table = datapath.bpf.get_table(name.encode())
    ktype, vtype = abi.MAP_LAYOUTS[name]
    bcc_leaf = table.sLeaf if name in abi.PERCPU_MAPS else table.Leaf
    assert ctypes.sizeof(table.Key) == ctypes.sizeof(ktype)
    assert ctypes.sizeof(bcc_leaf) == ctypes.sizeof(vtype)
    assert _layout(table.Key) == _layout(ktype)
    assert _layout(bcc_leaf) == _layout(vtype)


def test_sizes_stated_in_header(datapath):
    for ctype, size in abi.SIZES.items():
        assert ctypes.sizeof(ctype) == size, ctype.__name__


EXPECTED_MAPS = {
    abi.MAP_CONFIG: (bpfsys.BPF_MAP_TYPE_ARRAY, 1, 0),
    abi.MAP_FLOWS: (bpfsys.BPF_MAP_TYPE_LRU_HASH, abi.FLOW_TABLE_SIZE, 0),
    abi.MAP_PREFIXES: (bpfsys.BPF_MAP_TYPE_LPM_TRIE, abi.PREFIX_TABLE_SIZE, 1),   # BPF_F_NO_PREALLOC
    abi.MAP_PORTS: (bpfsys.BPF_MAP_TYPE_ARRAY, abi.PORTS_SIZE, 0),
    abi.MAP_IFACES: (bpfsys.BPF_MAP_TYPE_HASH, abi.MAX_IFACES, 0),
    abi.MAP_STATS: (bpfsys.BPF_MAP_TYPE_PERCPU_ARRAY, abi.MAX_IFACES, 0),
    abi.MAP_SOURCES: (bpfsys.BPF_MAP_TYPE_LRU_HASH, abi.SOURCE_TABLE_SIZE, 0),
    abi.MAP_BUDGET: (bpfsys.BPF_MAP_TYPE_ARRAY, 1, 0),
    abi.MAP_PINNED: (bpfsys.BPF_MAP_TYPE_HASH, abi.PINNED_TABLE_SIZE, 1),          # BPF_F_NO_PREALLOC
    abi.MAP_BANS: (bpfsys.BPF_MAP_TYPE_LPM_TRIE, abi.BAN_TABLE_SIZE, 1),          # BPF_F_NO_PREALLOC
    abi.MAP_NAMES_SCRATCH: (bpfsys.BPF_MAP_TYPE_PERCPU_ARRAY, 1, 0),
    abi.MAP_NAME_CACHE: (bpfsys.BPF_MAP_TYPE_LRU_HASH, abi.NAME_CACHE_SIZE, 0),
    abi.MAP_NAME_STATE: (bpfsys.BPF_MAP_TYPE_ARRAY, 1, 0),
    abi.MAP_NAME_EVENTS: (bpfsys.BPF_MAP_TYPE_RINGBUF, abi.NAME_EVENTS_SIZE, 0),
}


def test_kernel_maps(datapath):
    for name, fd in datapath.map_fds().items():
        info = bpfsys.map_info(fd)
        assert info.name == name
        assert (info.type, info.max_entries, info.map_flags) == EXPECTED_MAPS[name], name


def _map_type(map_id: int) -> int:
    fd = bpfsys.map_get_fd_by_id(map_id)
    try:
        return bpfsys.map_info(fd).type
    finally:
        os.close(fd)


def test_programs_and_from_prog_id(datapath):
    xdp, tc = bpfsys.prog_info(datapath.xdp_fd), bpfsys.prog_info(datapath.tc_fd)
    assert xdp.name == abi.PROG_XDP and tc.name == abi.PROG_TC[:15]  # kernel names: 15 characters
    assert xdp.type == 6 and tc.type == 3                             # XDP, SCHED_CLS
    with datapath.maps() as mine, Maps.from_prog_id(tc.id) as found:
        mine.set_config(abi.Config(mark_value=0x77, mark_mask=0xFF, first_n=9))
        assert (found.get_config().mark_value, found.get_config().first_n) == (0x77, 9)
        prog_arrays = {i for i in tc.map_ids if _map_type(i) == bpfsys.BPF_MAP_TYPE_PROG_ARRAY}
        assert len(prog_arrays) == 1                                  # the parser programs'
        assert {bpfsys.map_info(fd).id for fd in found.fds().values()} == set(tc.map_ids) - prog_arrays
    with pytest.raises(NotFoundError, match="hybrid_ports, hybrid_budget, hybrid_pinned: pass the id of the tc program"):
        Maps.from_prog_id(xdp.id)                                     # XDP never reads the ports


def test_from_fds_dups_and_survives_close(datapath):
    maps = datapath.maps()
    fds = maps.fds()
    assert not set(fds.values()) & set(datapath.map_fds().values())
    maps.set_config(abi.Config(first_n=5))
    maps.close()
    maps.close()                                                      # idempotent
    with datapath.maps() as again:
        assert again.get_config().first_n == 5


def test_loader_rejects_bad_knobs():
    with pytest.raises(ConfigError, match="flow table size"):
        loader.compile_datapath(None, flow_table_size=0)
    with pytest.raises(ConfigError, match="ban table size"):
        loader.compile_datapath(None, ban_table_size=(1 << 24) + 1)
    with pytest.raises(ConfigError, match="pin directory"):
        loader.compile_datapath('/tmp/a"b')
    with pytest.raises(NotFoundError, match="does not exist"):
        loader.compile_datapath("/nonexistent/hybrid-pins")


def test_loader_wraps_compile_errors():
    with pytest.raises(KernelFeatureError, match=r"compiling .*hybrid\.bpf\.c with bcc failed.*kernel headers"):
        loader.compile_datapath(None, extra_cflags=["-DHYBRID_FLOW_TABLE_SIZE=("])


# ---- pinned maps -------------------------------------------------------------------------------------
@pytest.fixture
def tmp_bpffs():
    """A private bpffs on a temp dir under /run, unmounted (and emptied) afterwards."""
    path = tempfile.mkdtemp(prefix="hybrid-test-bpffs-", dir="/run")
    subprocess.run(["mount", "-t", "bpf", "-o", "mode=0700", "bpf", path], check=True)
    try:
        yield path
    finally:
        for dirpath, _dirs, files in os.walk(path, topdown=False):
            for name in files:
                if name not in ("maps.debug", "progs.debug"):
                    os.unlink(os.path.join(dirpath, name))
            if dirpath != path:
                os.rmdir(dirpath)
        subprocess.run(["umount", path], check=True)
        os.rmdir(path)


def test_pinned_maps_are_reopened_by_a_second_compile(tmp_bpffs):
    pin_dir = os.path.join(tmp_bpffs, "inst")
    os.mkdir(pin_dir)
    with pytest.raises(NotFoundError, match=f"no hybrid maps pinned in {pin_dir}"):
        Maps.open_pinned(pin_dir)
    first = loader.compile_datapath(pin_dir, flow_table_size=1024)
    try:
        assert sorted(n for n in os.listdir(pin_dir)) == sorted(abi.MAP_NAMES)
        ids = {n: bpfsys.map_info(fd).id for n, fd in first.map_fds().items()}
        with first.maps() as m:
            m.set_config(abi.Config(mark_value=0x20, mark_mask=0x20, reasons=abi.REASONS_ALL, first_n=3))
            m.add_prefix("198.18.0.0/15", abi.PREFIX_WATCH)
            key, _ = m.flow_key("198.18.1.2", "198.18.2.2", 1, 2, 6)
            m.set_verdict(key, abi.VERDICT_BYPASS, None)
            m.write_bans({"198.18.7.0/24": 0, "2001:2::/64": 123}, [])
    finally:
        first.close()
    # The first Datapath is gone: only the pins keep the maps alive.
    with Maps.open_pinned(pin_dir) as m:
        assert m.get_config().first_n == 3 and m.flow_count() == 1
    second = loader.compile_datapath(pin_dir, flow_table_size=1024)
    try:
        assert {n: bpfsys.map_info(fd).id for n, fd in second.map_fds().items()} == ids
        with second.maps() as m:
            assert m.get_config().mark_value == 0x20
            assert m.prefixes() == {"198.18.0.0/15": abi.PREFIX_WATCH}
            assert m.get_flow(key).verdict == abi.VERDICT_BYPASS
            assert m.bans() == {"198.18.7.0/24": 0, "2001:2::/64": 123}      # bans survive a restart
            assert m.get_config().flags & abi.CFG_HAVE_BANS
    finally:
        second.close()
