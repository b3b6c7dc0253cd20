"""A cache of compiled datapaths: what bcc built from one source with one set of flags, loaded
again without compiling. bcc's compile of bpf/hybrid.bpf.c takes 5-10 s of CPU (clang and LLVM);
loading the same build from the cache takes a fraction of a second, and the kernel's verifier
still checks every program at every load.

Opt-in: ``HYBRID_BPF_CACHE`` names a directory owned by the caller and writable by no one else;
unset (the default), loader.compile_datapath compiles with bcc every time, as before. The test
suite sets it for its session (tests/conftest.py): most tests attach a datapath built with flags
an earlier test already compiled.

An entry holds what bcc produced: every program's instructions as bcc emitted them (maps referred
to by the fd numbers they had in the compiling process), every map's type, name, sizes and
flags, the license and kernel version. Loading creates the maps, or opens their pins exactly as
bcc's BPF_TABLE_PINNED does (an existing pin is reused as it is, a missing one is created and
pinned), rewrites the fd numbers and loads the programs with bcc's own calls (bcc_create_map,
bcc_prog_load). Same instructions on maps of the same kinds: the kernel computes the same program
tag (tests/bpf/test_objcache.py checks it). Not kept: BTF, the type description bpftool uses to
pretty-print map contents. The kernel needs none for these programs and maps, and a build is
only kept once every program of it has passed the verifier without BTF (a map value with a
spin lock or a timer, say, would need it): what the cache holds always loads.

The key covers everything the build depends on: every file in the source's directory, the flags
(the pin directory's path is not part of the build: it only names where maps are pinned), bcc's
library, the kernel release and the kernel headers bcc compiles against. An entry that cannot be
read, or a build that uses anything the cache does not know how to relocate, falls back to
compiling, silently: the cache only ever saves time.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as _errno
import hashlib
import json
import logging
import os
import platform
import stat
import struct
import tempfile

from hybrid.errors import HybridError
from hybrid.kernel import abi, bpfsys

log = logging.getLogger(__name__)

ENV = "HYBRID_BPF_CACHE"
FORMAT = 1
PIN_FLAG = "-DHYBRID_PIN_DIR="
_LIBBCC = "libbcc.so.0"
_LIBBPF = "libbpf.so.1"
_PROG_XDP, _PROG_SCHED_CLS = 6, 3        # enum bpf_prog_type: what the loader loads each program as
_LD_IMM64 = 0x18                 # BPF_LD | BPF_DW | BPF_IMM: two instruction slots
_PSEUDO_MAP_FD = 1               # src_reg of an ld_imm64 that loads a map by fd
_INSN = struct.Struct("<BBhi")   # code, dst_reg:4 | src_reg:4, off, imm


def from_env() -> Cache | None:
    """The cache ``HYBRID_BPF_CACHE`` names, or None (unset, missing, or not safe to load
    programs from: a directory someone else could write to)."""
    path = os.environ.get(ENV)
    if not path:
        return None
    problem = _unsafe(path)
    if problem:
        # Quietly: commands print nothing they did not print before (hybridctl -v shows it).
        log.debug("not using the BPF compile cache %s: %s", path, problem)
        return None
    return Cache(path)


def _unsafe(path: str) -> str | None:
    try:
        st = os.lstat(path)
    except OSError as exc:
        return os.strerror(exc.errno or _errno.ENOENT)
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    return _foreign(st)


def _foreign(st: os.stat_result) -> str | None:
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by this process's"
    if st.st_mode & 0o022:
        return "writable by group or others"
    return None


def pin_dir_of(flags: list[str]) -> str | None:
    """The pin directory a build's flags name (loader.cflags writes it quoted), or None."""
    for f in flags:
        if f.startswith(PIN_FLAG):
            return f[len(PIN_FLAG):].strip('"')
    return None


def _files_digest(h, directory: str) -> None:
    """Every regular file under ``directory``: relative path and content."""
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            path = os.path.join(root, name)
            if os.path.isfile(path):
                h.update(os.path.relpath(path, directory).encode() + b"\0")
                with open(path, "rb") as f:
                    h.update(hashlib.sha256(f.read()).digest())


def _where(path: str) -> str:
    """A path's real location and modification time (what bcc reads from it may change)."""
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
        return f"{real}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return f"{path}:missing"


def _loaded_libbcc() -> str:
    """The file of the libbcc this process has loaded (bcc's module loads it on import)."""
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split(maxsplit=5)[-1].strip()
            if "/libbcc.so" in path:
                return path
    return _LIBBCC


def key(src: str, flags: list[str]) -> str:
    """The cache key of compiling ``src`` with ``flags``."""
    import bcc
    h = hashlib.sha256()
    release = platform.release()
    parts = [f"format {FORMAT}", f"bcc {getattr(bcc, '__version__', '?')}",
             f"libbcc {_where(_loaded_libbcc())}",
             f"kernel {release}",
             f"headers {_where(f'/lib/modules/{release}/build')} {_where(f'/lib/modules/{release}/source')}",
             *(f"env {k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("BCC_"))]
    src_dir = os.path.dirname(os.path.abspath(src))
    parts.append(f"source {os.path.basename(src)}")
    for f in flags:
        if f.startswith(PIN_FLAG):
            parts.append(f"{PIN_FLAG}<pin dir>")
        elif f.startswith("-I") and os.path.isdir(f[2:]):
            parts.append("-I<dir>")
            _files_digest(h, f[2:])
        else:
            parts.append(f)
    _files_digest(h, src_dir)
    h.update("\n".join(parts).encode())
    return h.hexdigest()


class _Libbcc:
    """bcc's C calls the cache uses, declared on a handle of its own (bcc's Python module keeps
    its own declarations)."""

    def __init__(self):
        lib = ctypes.CDLL(_LIBBCC, use_errno=True)
        for name, argtypes, restype in (
                ("bpf_num_tables", [ctypes.c_void_p], ctypes.c_size_t),
                ("bpf_table_name", [ctypes.c_void_p, ctypes.c_ulonglong], ctypes.c_char_p),
                ("bpf_table_fd_id", [ctypes.c_void_p, ctypes.c_ulonglong], ctypes.c_int),
                ("bpf_num_functions", [ctypes.c_void_p], ctypes.c_size_t),
                ("bpf_function_name", [ctypes.c_void_p, ctypes.c_ulonglong], ctypes.c_char_p),
                ("bpf_function_start", [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p),
                ("bpf_function_size", [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_size_t),
                ("bpf_module_license", [ctypes.c_void_p], ctypes.c_char_p),
                ("bpf_module_kern_version", [ctypes.c_void_p], ctypes.c_uint),
                ("bcc_create_map", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                    ctypes.c_int], ctypes.c_int),
                ("bcc_prog_load", [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p,
                                   ctypes.c_uint, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint], ctypes.c_int)):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, restype
        self.lib = lib


_libbcc: _Libbcc | None = None


def _lib():
    global _libbcc
    if _libbcc is None:
        _libbcc = _Libbcc()
    return _libbcc.lib


def _map_fds(code: bytes) -> set[int] | None:
    """The fd numbers ``code``'s ld_imm64 instructions load maps by, or None when it refers to
    anything else the cache cannot relocate (map values, BTF ids, functions)."""
    fds = set()
    i = 0
    while i + _INSN.size <= len(code):
        op, regs, _, imm = _INSN.unpack_from(code, i)
        if op == _LD_IMM64:
            src_reg = regs >> 4
            if src_reg == _PSEUDO_MAP_FD:
                fds.add(imm)
            elif src_reg:
                return None
            i += _INSN.size
        elif op == 0x85 and regs >> 4:      # a call to a BPF function or a kernel function
            return None
        i += _INSN.size
    return fds


def _relocated(code: bytes, fds: dict[int, int]) -> bytes:
    """``code`` with each map fd number of the compiling process replaced by this one's."""
    out = bytearray(code)
    i = 0
    while i + _INSN.size <= len(out):
        op, regs, off, imm = _INSN.unpack_from(out, i)
        if op == _LD_IMM64:
            if regs >> 4 == _PSEUDO_MAP_FD:
                _INSN.pack_into(out, i, op, regs, off, fds[imm])
            i += _INSN.size
        i += _INSN.size
    return bytes(out)


class Cache:
    def __init__(self, path: str):
        self.path = path

    def entry_path(self, k: str) -> str:
        return os.path.join(self.path, f"{k}.json")

    def build(self, compile_with_bcc, src: str, flags: list[str]):
        """A bcc.BPF for ``src`` and ``flags`` (``compile_with_bcc()``), or, when the cache holds
        that build, a :class:`CachedBuild` that does what compile_datapath asks of a bcc.BPF."""
        pin_dir = pin_dir_of(flags)
        try:
            k = key(src, flags)
        except OSError as exc:
            log.debug("BPF compile cache: no key (%s): compiling", exc)
            return compile_with_bcc()
        entry = self._read(k)
        if entry is not None:
            try:
                return CachedBuild(entry, pin_dir)
            except (HybridError, OSError, KeyError, ValueError, TypeError) as exc:
                log.debug("BPF compile cache: entry %s not loaded (%s): compiling", k, exc)
        bpf = compile_with_bcc()
        try:
            self._write(k, describe(bpf, pin_dir))
        except (_NotCacheable, HybridError) as exc:
            log.debug("BPF compile cache: build not kept (%s)", exc)
        except OSError as exc:
            log.debug("BPF compile cache: entry %s not written (%s)", k, exc)
        return bpf

    def _read(self, k: str) -> dict | None:
        try:
            fd = os.open(self.entry_path(k), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            problem = _foreign(os.fstat(f.fileno()))
            if problem:
                log.debug("BPF compile cache: ignoring entry %s: %s", self.entry_path(k), problem)
                return None
            try:
                entry = json.loads(f.read())
            except ValueError:
                return None
        return entry if isinstance(entry, dict) and entry.get("format") == FORMAT else None

    def _write(self, k: str, entry: dict) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".entry-", dir=self.path)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(entry, f)
            os.replace(tmp, self.entry_path(k))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


class _NotCacheable(Exception):
    pass


def _pinned_id(path: str) -> int | None:
    """The id of the map pinned at ``path``, None when there is none."""
    try:
        fd = bpfsys.obj_get(path)
    except HybridError:
        return None
    try:
        return bpfsys.map_info(fd).id
    except HybridError:
        return None
    finally:
        os.close(fd)


def describe(bpf, pin_dir: str | None) -> dict:
    """The cache entry of a freshly compiled bcc.BPF (maps created, no program loaded yet)."""
    lib, mod = _lib(), bpf.module
    maps = []
    for i in range(lib.bpf_num_tables(mod)):
        table = lib.bpf_table_name(mod, i).decode()
        fd = lib.bpf_table_fd_id(mod, i)
        if fd < 0:
            raise _NotCacheable(f"table {table} has no map")
        info = bpfsys.map_info(fd)
        if pin_dir is not None and _pinned_id(os.path.join(pin_dir, table)) != info.id:
            raise _NotCacheable(f"map {table} is not pinned in {pin_dir}")
        maps.append({"table": table, "fd": fd, "name": info.name, "type": info.type, "key_size": info.key_size,
                     "value_size": info.value_size, "max_entries": info.max_entries, "flags": info.map_flags})
    known = {m["fd"] for m in maps}
    functions = {}
    for i in range(lib.bpf_num_functions(mod)):
        name = lib.bpf_function_name(mod, i)
        code = ctypes.string_at(lib.bpf_function_start(mod, name), lib.bpf_function_size(mod, name))
        used = _map_fds(code)
        if used is None or not used <= known:
            raise _NotCacheable(f"function {name.decode()} refers to what the cache cannot relocate")
        functions[name.decode()] = code.hex()
    license_ = lib.bpf_module_license(mod) or b""
    for name, code in functions.items():
        _check_loads_without_btf(name, bytes.fromhex(code), license_)
    return {"format": FORMAT, "license": license_.decode(), "kern_version": lib.bpf_module_kern_version(mod),
            "maps": maps, "functions": functions}


def _check_loads_without_btf(name: str, code: bytes, license_: bytes) -> None:
    """Have the kernel verify ``code`` (its maps: bcc's, still open in this process) as the
    loader will load it from the cache: without BTF. libbpf's call, which prints nothing when
    the verifier says no (bcc's prints the verifier's log)."""
    global _libbpf
    if _libbpf is None:
        lib = ctypes.CDLL(_LIBBPF, use_errno=True)
        fn = lib.bpf_prog_load          # (type, name, license, insns, insn_cnt, opts)
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t,
                       ctypes.c_void_p]
        fn.restype = ctypes.c_int
        _libbpf = fn
    buf = ctypes.create_string_buffer(code, len(code))
    prog_type = _PROG_XDP if name == abi.PROG_XDP else _PROG_SCHED_CLS
    fd = _libbpf(prog_type, name.encode()[:15], license_, buf, len(code) // _INSN.size, None)
    if fd < 0:
        raise _NotCacheable(f"function {name} does not load without BTF ({os.strerror(-fd)})")
    os.close(fd)


_libbpf = None


class _Table:
    def __init__(self, fd: int):
        self.fd = fd

    def get_fd(self) -> int:
        return self.fd

    def __setitem__(self, k, v) -> None:
        bpfsys.map_update(self.fd, k, v, name="prog array")


class _Function:
    def __init__(self, name: bytes, fd: int):
        self.name, self.fd = name, fd


class CachedBuild:
    """A build loaded from the cache, with the part of bcc.BPF's interface compile_datapath and
    Datapath use: get_table(name).get_fd(), [name] = prog array, load_func, cleanup."""

    def __init__(self, entry: dict, pin_dir: str | None):
        self._entry = entry
        self._tables: dict[str, int] = {}
        self._fds: dict[int, int] = {}
        self.funcs: dict[bytes, _Function] = {}
        lib = _lib()
        try:
            for m in entry["maps"]:
                fd = -1
                pinned = os.path.join(pin_dir, m["table"]) if pin_dir is not None else None
                if pinned is not None and os.path.exists(pinned):
                    fd = bpfsys.obj_get(pinned)             # reused as it is, as bcc does
                if fd < 0:
                    fd = lib.bcc_create_map(m["type"], m["name"].encode(), m["key_size"], m["value_size"],
                                            m["max_entries"], m["flags"])
                    if fd < 0:
                        err = ctypes.get_errno() or _errno.EINVAL
                        raise HybridError(f"creating map {m['table']}: {os.strerror(err)}", err)
                    self._tables[m["table"]] = fd       # closed by cleanup() if pinning fails
                    if pinned is not None:
                        bpfsys.obj_pin(fd, pinned)
                self._tables[m["table"]] = fd
                self._fds[m["fd"]] = fd
        except BaseException:
            self.cleanup()
            raise

    def get_table(self, name: bytes) -> _Table:
        return _Table(self._tables[name.decode()])

    __getitem__ = get_table

    def load_func(self, name: bytes, prog_type: int) -> _Function:
        if name in self.funcs:
            return self.funcs[name]
        code = _relocated(bytes.fromhex(self._entry["functions"][name.decode()]), self._fds)
        buf = ctypes.create_string_buffer(code, len(code))
        fd = _lib().bcc_prog_load(prog_type, name, buf, len(code), self._entry["license"].encode(),
                                  self._entry["kern_version"], 0, None, 0)
        if fd < 0:
            # as bcc.BPF.load_func says it (loader._load wraps it in one line)
            raise Exception(f"Failed to load BPF program {name!r}: {os.strerror(ctypes.get_errno())}")
        fn = self.funcs[name] = _Function(name, fd)
        return fn

    def cleanup(self) -> None:
        for fd in [fn.fd for fn in self.funcs.values()] + list(set(self._tables.values())):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.funcs = {}
        self._tables, self._fds = {}, {}
