"""Thin ctypes wrapper over libbpf.so.1: map access, pinning, object lookup by id, object info
and BPF_PROG_TEST_RUN.

A process that only reads and writes maps (the verdict engine, ``hybridctl status``) imports
this module and never bcc: it needs neither LLVM nor kernel headers, only libbpf1 (which libbcc
links, so it is installed wherever bcc is).

Every failure raises :class:`~hybrid.errors.HybridError` (or a subclass) carrying ``errno`` and
a one-line message naming the operation and the object. Lookups that merely find nothing
return False/None instead of raising: absence is an answer, not an error.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import logging
import os
from dataclasses import dataclass

from hybrid.errors import HybridError, KernelFeatureError, NotFoundError, PrivilegeError

log = logging.getLogger(__name__)

_LIBBPF_NAMES = ("libbpf.so.1", "libbpf.so")

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_OBJ_NAME_LEN = 16

# BPF map types we look at (uapi enum bpf_map_type)
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PROG_ARRAY = 3
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_RINGBUF = 27
PERCPU_MAP_TYPES = frozenset({BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY,
                              BPF_MAP_TYPE_LRU_PERCPU_HASH})


class BpfSysError(HybridError):
    """A bpf() operation failed."""


# ---- uapi / libbpf structs -----------------------------------------------------------------------
class BpfTestRunOpts(ctypes.Structure):
    """libbpf's struct bpf_test_run_opts (libbpf >= 0.7 layout; sz tells libbpf which)."""
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class BpfMapBatchOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class BpfProgInfo(ctypes.Structure):
    """The leading part of uapi struct bpf_prog_info; the kernel fills at most info_len bytes."""
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", ctypes.c_uint32),
        ("_flags", ctypes.c_uint32),
    ]


class BpfMapInfo(ctypes.Structure):
    """The leading part of uapi struct bpf_map_info."""
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


class SkBuff(ctypes.Structure):
    """uapi struct __sk_buff: the ctx of tc programs. BPF_PROG_TEST_RUN accepts only mark,
    priority, ingress_ifindex, ifindex, cb, tstamp, wire_len, gso_segs, gso_size and hwtstamp
    as input; every other field must be zero."""
    _fields_ = [
        ("len", ctypes.c_uint32),
        ("pkt_type", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("queue_mapping", ctypes.c_uint32),
        ("protocol", ctypes.c_uint32),
        ("vlan_present", ctypes.c_uint32),
        ("vlan_tci", ctypes.c_uint32),
        ("vlan_proto", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("tc_index", ctypes.c_uint32),
        ("cb", ctypes.c_uint32 * 5),
        ("hash", ctypes.c_uint32),
        ("tc_classid", ctypes.c_uint32),
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("napi_id", ctypes.c_uint32),
        ("family", ctypes.c_uint32),
        ("remote_ip4", ctypes.c_uint32),
        ("local_ip4", ctypes.c_uint32),
        ("remote_ip6", ctypes.c_uint32 * 4),
        ("local_ip6", ctypes.c_uint32 * 4),
        ("remote_port", ctypes.c_uint32),
        ("local_port", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("flow_keys", ctypes.c_uint64),
        ("tstamp", ctypes.c_uint64),
        ("wire_len", ctypes.c_uint32),
        ("gso_segs", ctypes.c_uint32),
        ("sk", ctypes.c_uint64),
        ("gso_size", ctypes.c_uint32),
        ("tstamp_type", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 3),
        ("hwtstamp", ctypes.c_uint64),
    ]


class XdpMd(ctypes.Structure):
    """uapi struct xdp_md: the ctx of XDP programs. For BPF_PROG_TEST_RUN data must be 0 (no
    metadata), data_end the frame length, ingress_ifindex an existing device (or 0)."""
    _fields_ = [
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("rx_queue_index", ctypes.c_uint32),
        ("egress_ifindex", ctypes.c_uint32),
    ]


# ---- library loading -----------------------------------------------------------------------------
_lib: ctypes.CDLL | None = None

_SIGNATURES = {
    "bpf_map_update_elem": ([ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64], ctypes.c_int),
    "bpf_map_lookup_elem": ([ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int),
    "bpf_map_delete_elem": ([ctypes.c_int, ctypes.c_void_p], ctypes.c_int),
    "bpf_map_get_next_key": ([ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int),
    "bpf_map_lookup_batch": ([ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                              ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p],
                             ctypes.c_int),
    "bpf_map_update_batch": ([ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32),
                              ctypes.c_void_p], ctypes.c_int),
    "bpf_map_delete_batch": ([ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p],
                             ctypes.c_int),
    "bpf_obj_pin": ([ctypes.c_int, ctypes.c_char_p], ctypes.c_int),
    "bpf_obj_get": ([ctypes.c_char_p], ctypes.c_int),
    "bpf_prog_get_fd_by_id": ([ctypes.c_uint32], ctypes.c_int),
    "bpf_map_get_fd_by_id": ([ctypes.c_uint32], ctypes.c_int),
    "bpf_obj_get_info_by_fd": ([ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)], ctypes.c_int),
    "bpf_prog_test_run_opts": ([ctypes.c_int, ctypes.POINTER(BpfTestRunOpts)], ctypes.c_int),
    "libbpf_num_possible_cpus": ([], ctypes.c_int),
}


def lib() -> ctypes.CDLL:
    """The loaded libbpf, with argument types declared (loaded once, on first use)."""
    global _lib
    if _lib is not None:
        return _lib
    names = list(_LIBBPF_NAMES)
    found = ctypes.util.find_library("bpf")
    if found:
        names.append(found)
    last: OSError | None = None
    for name in names:
        try:
            handle = ctypes.CDLL(name, use_errno=True)
            break
        except OSError as exc:
            last = exc
    else:
        raise KernelFeatureError(f"cannot load libbpf.so.1 ({last}): install libbpf1 (apt-get install libbpf1)")
    for fn, (argtypes, restype) in _SIGNATURES.items():
        try:
            f = getattr(handle, fn)
        except AttributeError as exc:
            raise KernelFeatureError(f"libbpf lacks {fn}: install libbpf1 >= 1.0 (apt-get install libbpf1)") from exc
        f.argtypes = argtypes
        f.restype = restype
    _lib = handle
    return handle


def _error(ret: int, what: str) -> HybridError:
    """The exception for a failed call: libbpf 1.x returns -errno (and sets errno)."""
    err = -ret if ret < 0 else ctypes.get_errno() or _errno.EIO
    text = f"{what}: {os.strerror(err)}"
    if err in (_errno.EPERM, _errno.EACCES):
        return PrivilegeError(f"{text} (needs root or CAP_BPF)", err)
    if err == _errno.ENOENT:
        return NotFoundError(text, err)
    return BpfSysError(text, err)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise _error(ret, what)
    return ret


def _ref(obj) -> int | bytes | None:
    """A ctypes object's address (bytes pass as they are: ctypes hands c_void_p a pointer to
    their buffer, which suits keys the kernel only reads). addressof() is several times cheaper
    than cast(byref()), and map access is on the verdict engine's per-packet path."""
    if obj is None or type(obj) is bytes:
        return obj
    return ctypes.addressof(obj)


# ---- maps ------------------------------------------------------------------------------------------
# The verdict engine's per-packet path calls map_lookup and map_update (one or two per flow
# verdict): they test the argument types inline rather than through _ref(), and reach libbpf's
# function through _lib once it is loaded (lib() is only called the first time).
_addressof = ctypes.addressof


def map_update(fd: int, key, value, flags: int = BPF_ANY, *, name: str = "map") -> None:
    """Create or replace an element (flags: BPF_ANY, BPF_NOEXIST, BPF_EXIST)."""
    ret = (_lib or lib()).bpf_map_update_elem(fd, key if key.__class__ is bytes else _addressof(key),
                                              value if value.__class__ is bytes else _addressof(value), flags)
    if ret < 0:
        raise _error(ret, f"updating an element of {name}")


def map_lookup(fd: int, key, value, *, name: str = "map") -> bool:
    """Fill ``value`` (a ctypes object); False when the key is absent."""
    ret = (_lib or lib()).bpf_map_lookup_elem(fd, key if key.__class__ is bytes else _addressof(key),
                                              _addressof(value))
    if ret < 0:
        if ret == -_errno.ENOENT:
            return False
        raise _error(ret, f"looking up an element of {name}")
    return True


def map_delete(fd: int, key, *, name: str = "map") -> bool:
    """Delete an element; False when it was absent."""
    ret = lib().bpf_map_delete_elem(fd, _ref(key))
    if ret == -_errno.ENOENT:
        return False
    _check(ret, f"deleting an element of {name}")
    return True


def map_get_next_key(fd: int, key, next_key, *, name: str = "map") -> bool:
    """Fill ``next_key`` with the key after ``key`` (the first key when ``key`` is None);
    False at the end of the map."""
    ret = lib().bpf_map_get_next_key(fd, _ref(key), _ref(next_key))
    if ret == -_errno.ENOENT:
        return False
    _check(ret, f"iterating the keys of {name}")
    return True


def map_lookup_batch(fd: int, in_batch, out_batch, keys, values, count: int, *,
                     name: str = "map") -> tuple[int, bool]:
    """One BPF_MAP_LOOKUP_BATCH step: up to ``count`` elements into the ``keys``/``values``
    arrays. ``in_batch`` is None for the first call, then the previous ``out_batch``.
    Returns (elements read, done)."""
    n = ctypes.c_uint32(count)
    opts = BpfMapBatchOpts(sz=ctypes.sizeof(BpfMapBatchOpts))
    ret = lib().bpf_map_lookup_batch(fd, _ref(in_batch), _ref(out_batch), _ref(keys), _ref(values),
                                     ctypes.byref(n), ctypes.cast(ctypes.byref(opts), ctypes.c_void_p))
    if ret < 0:
        if ret == -_errno.ENOENT:  # the end of the map; n holds what this call still read
            return n.value, True
        raise _error(ret, f"batch lookup in {name}")
    return n.value, False


def map_update_batch(fd: int, keys, values, count: int, flags: int = BPF_ANY) -> tuple[int, int]:
    """One BPF_MAP_UPDATE_BATCH: ``count`` elements from the ``keys``/``values`` buffers (packed
    back to back), each with ``flags``. Returns (elements written, 0), or (elements written
    before the one that failed, its errno): the kernel stops at the first failure."""
    n = ctypes.c_uint32(count)
    opts = BpfMapBatchOpts(sz=ctypes.sizeof(BpfMapBatchOpts), elem_flags=flags)
    ret = lib().bpf_map_update_batch(fd, _ref(keys), _ref(values), ctypes.byref(n),
                                     ctypes.cast(ctypes.byref(opts), ctypes.c_void_p))
    return n.value, (-ret if ret < 0 else 0)


def map_delete_batch(fd: int, keys, count: int) -> tuple[int, int]:
    """One BPF_MAP_DELETE_BATCH of ``count`` keys; as :func:`map_update_batch` (an absent key
    stops it with ENOENT)."""
    n = ctypes.c_uint32(count)
    opts = BpfMapBatchOpts(sz=ctypes.sizeof(BpfMapBatchOpts))
    ret = lib().bpf_map_delete_batch(fd, _ref(keys), ctypes.byref(n), ctypes.cast(ctypes.byref(opts), ctypes.c_void_p))
    return n.value, (-ret if ret < 0 else 0)


# ---- objects -----------------------------------------------------------------------------------------
def obj_pin(fd: int, path: str) -> None:
    _check(lib().bpf_obj_pin(fd, os.fsencode(path)), f"pinning fd {fd} at {path}")


def obj_get(path: str) -> int:
    """A new fd for the object pinned at ``path`` (NotFoundError when nothing is pinned)."""
    return _check(lib().bpf_obj_get(os.fsencode(path)), f"opening pinned object {path}")


def prog_get_fd_by_id(prog_id: int) -> int:
    return _check(lib().bpf_prog_get_fd_by_id(prog_id), f"opening BPF program id {prog_id}")


def map_get_fd_by_id(map_id: int) -> int:
    return _check(lib().bpf_map_get_fd_by_id(map_id), f"opening BPF map id {map_id}")


class BpfProgInfoStats(ctypes.Structure):
    """uapi struct bpf_prog_info up to verified_insns (Linux 5.16): what the verifier processed
    for the program. Pointers and counts of the arrays it could fill stay zero (none asked for)."""
    _fields_ = BpfProgInfo._fields_ + [
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32),
        ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64),
        ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64),
        ("recursion_misses", ctypes.c_uint64),
        ("verified_insns", ctypes.c_uint32),
        ("attach_btf_obj_id", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
        ("_pad2", ctypes.c_uint32),
    ]


def _info(fd: int, info, what: str):
    n = ctypes.c_uint32(ctypes.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, ctypes.cast(ctypes.byref(info), ctypes.c_void_p), ctypes.byref(n)),
           what)
    return info


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    name: str
    map_ids: tuple[int, ...]


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    name: str
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int


def prog_info(fd: int) -> ProgInfo:
    """Id, type, (kernel-truncated, 15 characters) name and map ids of a loaded program."""
    what = f"reading info of BPF program fd {fd}"
    first = _info(fd, BpfProgInfo(), what)
    ids = (ctypes.c_uint32 * max(first.nr_map_ids, 1))()
    info = BpfProgInfo(nr_map_ids=first.nr_map_ids, map_ids=ctypes.addressof(ids))
    _info(fd, info, what)
    n = min(info.nr_map_ids, first.nr_map_ids)
    return ProgInfo(id=info.id, type=info.type, name=info.name.decode(errors="replace"),
                    map_ids=tuple(ids[i] for i in range(n)))


def prog_tag(fd: int) -> str:
    """The kernel's tag of a loaded program (hex): its hash of the program's instructions with
    map references blanked, so two loads of the same build have the same tag."""
    info = _info(fd, BpfProgInfo(), f"reading info of BPF program fd {fd}")
    return bytes(info.tag).hex()


def prog_verified_insns(fd: int) -> int:
    """The instructions the verifier processed loading the program (0 before Linux 5.16); the
    kernel's limit is 1,000,000."""
    return _info(fd, BpfProgInfoStats(), f"reading info of BPF program fd {fd}").verified_insns


def map_info(fd: int) -> MapInfo:
    info = _info(fd, BpfMapInfo(), f"reading info of BPF map fd {fd}")
    return MapInfo(id=info.id, type=info.type, name=info.name.decode(errors="replace"),
                   key_size=info.key_size, value_size=info.value_size,
                   max_entries=info.max_entries, map_flags=info.map_flags)


def num_possible_cpus() -> int:
    """Number of possible CPUs: the length of every per-CPU value array."""
    return _check(lib().libbpf_num_possible_cpus(), "counting possible CPUs")


# ---- BPF_PROG_TEST_RUN ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TestRunResult:
    retval: int
    data: bytes
    ctx: object  # the ctx structure after the run (same type as the one passed), or None
    duration_ns: int


def prog_test_run(prog_fd: int, data: bytes, ctx=None, *, repeat: int = 1,
                  name: str = "program") -> TestRunResult:
    """Run a program once (or ``repeat`` times) on ``data`` with an optional ctx structure
    (SkBuff for tc, XdpMd for XDP); returns its return value, the output frame and ctx."""
    buf_in = ctypes.create_string_buffer(bytes(data), len(data))
    out_size = len(data) + 4096  # room for programs that grow the frame
    buf_out = ctypes.create_string_buffer(out_size)
    opts = BpfTestRunOpts(sz=ctypes.sizeof(BpfTestRunOpts), repeat=repeat)
    opts.data_in = ctypes.cast(buf_in, ctypes.c_void_p)
    opts.data_size_in = len(data)
    opts.data_out = ctypes.cast(buf_out, ctypes.c_void_p)
    opts.data_size_out = out_size
    ctx_out = None
    if ctx is not None:
        ctx_out = type(ctx)()
        opts.ctx_in = ctypes.cast(ctypes.byref(ctx), ctypes.c_void_p)
        opts.ctx_size_in = ctypes.sizeof(ctx)
        opts.ctx_out = ctypes.cast(ctypes.byref(ctx_out), ctypes.c_void_p)
        opts.ctx_size_out = ctypes.sizeof(ctx_out)
    _check(lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), f"test run of {name}")
    return TestRunResult(
        retval=opts.retval,
        data=buf_out.raw[:opts.data_size_out],
        ctx=ctx_out,
        duration_ns=opts.duration,
    )


class TestRun:
    """One program run again and again on frames of up to ``max_size`` bytes (BPF_PROG_TEST_RUN),
    its buffers and options made once: a replay runs every packet of a capture this way. ``ctx``
    (SkBuff or XdpMd) is passed in on every run (change its fields between runs);
    :attr:`ctx_out` holds what the program left in it. The output frame is not copied back."""

    def __init__(self, prog_fd: int, ctx, max_size: int, *, name: str = "program"):
        self.prog_fd, self.name, self.max_size = prog_fd, name, max_size
        self.buf = ctypes.create_string_buffer(max_size)
        self.ctx = ctx
        self.ctx_out = type(ctx)()
        opts = BpfTestRunOpts(sz=ctypes.sizeof(BpfTestRunOpts), repeat=1)
        opts.data_in = ctypes.addressof(self.buf)
        opts.ctx_in = ctypes.addressof(ctx)
        opts.ctx_size_in = ctypes.sizeof(ctx)
        opts.ctx_out = ctypes.addressof(self.ctx_out)
        opts.ctx_size_out = ctypes.sizeof(self.ctx_out)
        self.opts = opts
        self._ref = ctypes.byref(opts)
        self._call = lib().bpf_prog_test_run_opts

    def __call__(self, data: bytes) -> int:
        """The program's return value on ``data`` (at most max_size bytes)."""
        n = len(data)
        ctypes.memmove(self.buf, data, n)
        opts = self.opts
        opts.data_size_in = n
        opts.data_size_out = 0          # the kernel writes the output's size back; 0: none wanted
        ret = self._call(self.prog_fd, self._ref)
        if ret:
            _check(ret, f"test run of {self.name}")
        return self.opts.retval
