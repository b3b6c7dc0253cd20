"""The compile cache (hybrid/datapath/objcache.py) against bcc: a datapath loaded from the cache
is the build bcc made (the kernel's program tags, the maps each program uses, every map's kind
and sizes, the name parsers in the program array, the same verdicts on the same frames); pins
are created and reopened as bcc's BPF_TABLE_PINNED does; the key follows the sources and flags
but not the pin directory; a cache anyone else could write to, or an entry that is not a
cache entry, is never loaded.

Two bcc compiles (one unpinned with the name cache, one pinned without); the rest is cache hits."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import tempfile

import pytest
from bpfkit import Runner, reset, tcp4, tcp6, udp4

from hybrid.datapath import loader, objcache
from hybrid.kernel import abi, bpfsys

pytestmark = pytest.mark.bpf

FRAMES = [tcp4("S"), tcp4("A", b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n"), tcp6("S"), udp4(b"x" * 20, dport=53),
          tcp4("SA", sport=80, dport=40000, src="198.18.2.2", dst="198.18.1.2")]


@pytest.fixture
def cache_dir(monkeypatch):
    path = tempfile.mkdtemp(prefix="hybrid-test-cache-")
    monkeypatch.setenv(objcache.ENV, path)
    try:
        yield path
    finally:
        shutil.rmtree(path)


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


def _prog(fd: int) -> tuple:
    """(type, kernel name, tag, translated length, names of the maps it uses in the kernel's
    order). The tag is the kernel's hash of the instructions with map references blanked."""
    info = bpfsys.BpfProgInfo()
    ids = (ctypes.c_uint32 * 64)()
    info.nr_map_ids, info.map_ids = 64, ctypes.addressof(ids)
    size = ctypes.c_uint32(ctypes.sizeof(info))
    assert bpfsys.lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)) == 0
    used = []
    for map_id in ids[:info.nr_map_ids]:
        mfd = bpfsys.map_get_fd_by_id(map_id)
        try:
            used.append(bpfsys.map_info(mfd).name)
        finally:
            os.close(mfd)
    return info.type, info.name.decode(), bytes(info.tag).hex(), info.xlated_prog_len, used


def programs(dp) -> dict[str, tuple]:
    out = {"xdp": _prog(dp.xdp_fd), "tc": _prog(dp.tc_fd)}
    if dp.names:
        progs = dp.bpf.get_table(abi.MAP_NAME_PROGS.encode()).get_fd()     # not among map_fds()
        for idx in abi.NAME_PROG_FUNCS:
            prog_id = ctypes.c_uint32()
            assert bpfsys.map_lookup(progs, ctypes.c_uint32(idx), prog_id)    # the array holds ids
            fd = bpfsys.prog_get_fd_by_id(prog_id.value)
            try:
                out[f"names[{idx}]"] = _prog(fd)
            finally:
                os.close(fd)
    return out


def maps(dp) -> dict[str, tuple]:
    out = {}
    fds = dp.map_fds()
    if dp.names:
        fds[abi.MAP_NAME_PROGS] = dp.bpf.get_table(abi.MAP_NAME_PROGS.encode()).get_fd()
    for name, fd in fds.items():
        m = bpfsys.map_info(fd)
        out[name] = (m.name, m.type, m.key_size, m.value_size, m.max_entries, m.map_flags)
    return out


def map_ids(dp) -> dict[str, int]:
    return {name: bpfsys.map_info(fd).id for name, fd in dp.map_fds().items()}


def pinned_id(path: str) -> int:
    fd = bpfsys.obj_get(path)
    try:
        return bpfsys.map_info(fd).id
    finally:
        os.close(fd)


def verdicts(dp) -> list:
    """Each frame's tc action and mark and XDP action, and the counters afterwards."""
    with dp.maps() as m:
        reset(m)
        run = Runner(dp, m)
        out = [(r.action, r.mark, run.xdp(f)) for f in FRAMES for r in [run.tc(f)]]
        out.append(run.nonzero())
        reset(m)
    return out


def test_a_build_from_the_cache_is_the_build_bcc_made(cache_dir):
    first = loader.compile_datapath(None, names=True)
    try:
        assert not isinstance(first.bpf, objcache.CachedBuild)          # compiled by bcc ...
        assert len(os.listdir(cache_dir)) == 1                           # ... and kept
        second = loader.compile_datapath(None, names=True)
        try:
            assert isinstance(second.bpf, objcache.CachedBuild)
            want = programs(first)
            assert set(want) == {"xdp", "tc", "names[0]", "names[1]"}
            assert programs(second) == want
            assert maps(second) == maps(first)
            assert not set(map_ids(second).values()) & set(map_ids(first).values())   # maps of its own
            assert verdicts(second) == verdicts(first)
        finally:
            second.close()
    finally:
        first.close()
    assert len(os.listdir(cache_dir)) == 1


def test_pins_are_created_and_reopened_as_bcc_does(cache_dir, tmp_bpffs):
    a, b = os.path.join(tmp_bpffs, "a"), os.path.join(tmp_bpffs, "b")
    os.mkdir(a)
    os.mkdir(b)
    first = loader.compile_datapath(a, flow_table_size=1024)
    try:
        second = loader.compile_datapath(b, flow_table_size=1024)       # another instance: a hit
        try:
            assert isinstance(second.bpf, objcache.CachedBuild)
            assert sorted(os.listdir(b)) == sorted(os.listdir(a)) == sorted(abi.MAP_NAMES)
            assert programs(second) == programs(first) and maps(second) == maps(first)
            ids = map_ids(second)
            assert {n: pinned_id(os.path.join(b, n)) for n in ids} == ids          # what b's pins hold
            with second.maps() as m:
                m.add_prefix("198.18.0.0/15", abi.PREFIX_WATCH)
        finally:
            second.close()
        again = loader.compile_datapath(b, flow_table_size=1024)        # reopens b's pins
        try:
            assert isinstance(again.bpf, objcache.CachedBuild) and map_ids(again) == ids
            with again.maps() as m:
                assert m.prefixes() == {"198.18.0.0/15": abi.PREFIX_WATCH}
        finally:
            again.close()
    finally:
        first.close()


def test_the_key_follows_sources_and_flags_not_the_pin_dir(tmp_path):
    src_dir = tmp_path / "bpf"
    shutil.copytree(loader.bpf_dir(), src_dir)
    src = str(src_dir / loader.SOURCE_NAME)
    flags = loader.cflags("/run/x/one", include_dir=src_dir)
    k = objcache.key(src, flags)
    assert objcache.key(src, loader.cflags("/run/y/two", include_dir=src_dir)) == k
    assert objcache.key(src, loader.cflags(None, include_dir=src_dir)) != k
    assert objcache.key(src, flags + ["-DHYBRID_NAMES"]) != k
    assert objcache.key(src, loader.cflags("/run/x/one", flow_table_size=1024, include_dir=src_dir)) != k
    header = src_dir / "parsing.h"
    header.write_text(header.read_text() + "\n")
    assert objcache.key(src, flags) != k


def test_a_cache_others_can_write_or_a_foreign_entry_is_never_loaded(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    path.mkdir(mode=0o700)
    monkeypatch.setenv(objcache.ENV, str(path))
    assert objcache.from_env() is not None
    path.chmod(0o770)
    assert objcache.from_env() is None                       # group-writable
    path.chmod(0o700)
    os.chown(path, 65534, 65534)
    assert objcache.from_env() is None                       # someone else's
    os.chown(path, 0, 0)
    monkeypatch.setenv(objcache.ENV, str(tmp_path / "missing"))
    assert objcache.from_env() is None
    cache = objcache.Cache(str(path))
    (path / "k1.json").write_text("not json")
    assert cache._read("k1") is None
    (path / "k2.json").write_text(json.dumps({"format": objcache.FORMAT, "maps": []}))
    assert cache._read("k2") is not None
    os.chmod(path / "k2.json", 0o666)
    assert cache._read("k2") is None                          # writable by others
    os.chmod(path / "k2.json", 0o600)
    os.chown(path / "k2.json", 65534, 65534)
    assert cache._read("k2") is None                          # someone else's


def test_only_programs_that_load_without_btf_are_kept():
    """The kernel's verifier is asked before an entry is written: a program it refuses (here one
    that returns an unset register) makes the build not cacheable; one it accepts does not."""
    mov_r0_0, exit_ = bytes.fromhex("b700000000000000"), bytes.fromhex("9500000000000000")
    objcache._check_loads_without_btf("hybrid_tc_ingress", mov_r0_0 + exit_, b"GPL")
    objcache._check_loads_without_btf(abi.PROG_XDP, mov_r0_0 + exit_, b"GPL")
    with pytest.raises(objcache._NotCacheable, match="does not load without BTF"):
        objcache._check_loads_without_btf("hybrid_tc_ingress", exit_, b"GPL")
