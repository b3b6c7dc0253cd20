"""Compiling and loading the datapath (bpf/hybrid.bpf.c) with bcc.

Only the process that attaches imports this module: it needs bcc, LLVM and kernel headers. The
verdict engine and status use hybrid.datapath.maps on pinned maps (or maps found through a program id)
and never compile anything.

Load-time knobs go to the compiler as -D flags (HYBRID_FLOW_TABLE_SIZE, HYBRID_PREFIX_TABLE_SIZE,
HYBRID_BAN_TABLE_SIZE, HYBRID_PIN_DIR); the source is never edited. With a pin directory every
map is created pinned there, or reopened when a pin already exists, so flows, verdicts, bans,
config and counters survive a restart.

Note: closing a Datapath closes bcc's fds; it does not detach anything (bcc's cleanup never
removes XDP programs or tc filters, and this module never asks it to). Detaching is the attach
layer's job.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from collections.abc import Sequence
from pathlib import Path

from hybrid import resources
from hybrid.datapath.maps import Maps
from hybrid.errors import ConfigError, HybridError, KernelFeatureError, NotFoundError
from hybrid.kernel import abi

log = logging.getLogger(__name__)

SOURCE_NAME = "hybrid.bpf.c"
REPLAY_CLOCK_FLAG = "-DHYBRID_REPLAY_CLOCK"
REPLAY_CLOCK_MAP = "hybrid_clock"     # bpf/hybrid.bpf.c, "The clock"
_MAX_ENTRIES = 1 << 24


def bpf_dir() -> Path:
    """Directory holding hybrid.bpf.c and its headers: $HYBRID_BPF_DIR, else where hybrid ships
    them (hybrid.resources: the installed package's data, or the checkout's bpf/)."""
    env = os.environ.get("HYBRID_BPF_DIR")
    candidates = [Path(env)] if env else []
    candidates += [Path(p) for p in resources.candidates("bpf")]
    for path in candidates:
        if (path / SOURCE_NAME).is_file():
            return path
    where = ", ".join(str(p) for p in candidates)
    raise NotFoundError(f"{SOURCE_NAME} not found (looked in {where}): set HYBRID_BPF_DIR to the bpf/ directory")


def cflags(pin_dir: str | None, *, flow_table_size: int = abi.FLOW_TABLE_SIZE,
           prefix_table_size: int = abi.PREFIX_TABLE_SIZE, ban_table_size: int = abi.BAN_TABLE_SIZE,
           extra_cflags: Sequence[str] = (), include_dir: Path | None = None) -> list[str]:
    """The compiler flags for one build (validated)."""
    for what, value in (("flow table size", flow_table_size), ("prefix table size", prefix_table_size),
                        ("ban table size", ban_table_size)):
        if not isinstance(value, int) or not 1 <= value <= _MAX_ENTRIES:
            raise ConfigError(f"{what} must be an integer between 1 and {_MAX_ENTRIES}, not {value!r}")
    flags = [
        f"-I{include_dir or bpf_dir()}",
        f"-DHYBRID_FLOW_TABLE_SIZE={flow_table_size}",
        f"-DHYBRID_PREFIX_TABLE_SIZE={prefix_table_size}",
        f"-DHYBRID_BAN_TABLE_SIZE={ban_table_size}",
    ]
    if pin_dir is not None:
        if not os.path.isabs(pin_dir) or any(c in pin_dir for c in '"\\\n'):
            raise ConfigError(f"pin directory must be an absolute path without quotes or backslashes: {pin_dir!r}")
        flags.append(f'-DHYBRID_PIN_DIR="{pin_dir.rstrip("/")}"')
    flags.extend(extra_cflags)
    return flags


def _kernel_hint() -> str:
    build = f"/lib/modules/{platform.release()}/build"
    return f"check that kernel headers exist at {build} (run scripts/setup.sh)"


class Datapath:
    """A compiled and loaded datapath: the bcc module, both program fds and the maps.

    ``bpf`` is the bcc.BPF object (kept alive: closing it closes the program and map fds).
    """

    def __init__(self, bpf, xdp_fd: int, tc_fd: int, pin_dir: str | None, names: bool = False,
                 replay_clock: bool = False):
        self.bpf = bpf
        self.names = names              # built with the name cache (its maps and parser programs)
        self.replay_clock = replay_clock  # built to read hybrid_clock, not CLOCK_MONOTONIC
        self.xdp_fd = xdp_fd
        self.tc_fd = tc_fd
        self.pin_dir = pin_dir

    def map_fds(self) -> dict[str, int]:
        """map name -> fd (owned by bcc; valid until close())."""
        if self.bpf is None:
            raise HybridError("datapath is closed")
        fds = {name: self.bpf.get_table(name.encode()).get_fd() for name in abi.MAP_NAMES}
        if self.names:
            fds.update({name: self.bpf.get_table(name.encode()).get_fd() for name in abi.NAME_CACHE_MAPS})
        return fds

    def clock_fd(self) -> int:
        """The fd of the replay clock (``hybrid_clock``: one __u64 of ns the programs read as the
        time; owned by bcc, valid until close()). Only a replay build has one."""
        if self.bpf is None:
            raise HybridError("datapath is closed")
        if not self.replay_clock:
            raise HybridError("this datapath reads the kernel's clock: compile it with replay_clock=True")
        return self.bpf.get_table(REPLAY_CLOCK_MAP.encode()).get_fd()

    def maps(self) -> Maps:
        """A Maps on duplicated fds: it stays usable after this Datapath is closed."""
        maps = Maps.from_fds(self.map_fds())
        maps.pin_dir = self.pin_dir
        return maps

    def close(self) -> None:
        """Release bcc's fds. Attached programs stay attached (the kernel holds them)."""
        if self.bpf is not None:
            bpf, self.bpf = self.bpf, None
            try:
                bpf.cleanup()
            except Exception as exc:  # bcc raises bare Exception; closing must not fail
                log.debug("bcc cleanup: %s", exc)

    def __enter__(self) -> Datapath:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def compile_datapath(pin_dir: str | None, *, flow_table_size: int = abi.FLOW_TABLE_SIZE,
                     prefix_table_size: int = abi.PREFIX_TABLE_SIZE, ban_table_size: int = abi.BAN_TABLE_SIZE,
                     extra_cflags: Sequence[str] = (), names: bool = False,
                     replay_clock: bool = False) -> Datapath:
    """Compile bpf/hybrid.bpf.c with bcc and load both programs (not attached anywhere).

    ``pin_dir``: a directory on a bpffs where every map is pinned (or reopened), or None for
    private maps that die with the returned Datapath. ``names``: compile in the name parsers
    and the name-verdict cache (-DHYBRID_NAMES) and load the parser programs into the program
    array tc tail-calls (bpf/namecache.h); they cost verifier time at every load.
    ``replay_clock``: the programs read the time from the ``hybrid_clock`` array, which the
    caller sets (:meth:`Datapath.clock_fd`), instead of CLOCK_MONOTONIC (-DHYBRID_REPLAY_CLOCK,
    for hybrid.replay; a live build never has it). The compile cache keys on it like on every flag.
    """
    src_dir = bpf_dir()
    flags = cflags(pin_dir, flow_table_size=flow_table_size, prefix_table_size=prefix_table_size,
                   ban_table_size=ban_table_size, extra_cflags=extra_cflags, include_dir=src_dir)
    if names:
        flags.append("-DHYBRID_NAMES")
    if replay_clock:
        flags.append(REPLAY_CLOCK_FLAG)
    if pin_dir is not None and not os.path.isdir(pin_dir):
        raise NotFoundError(f"pin directory {pin_dir} does not exist (it must be on a mounted bpffs)")
    try:
        from bcc import BPF
    except ImportError as exc:
        raise KernelFeatureError(
            f"cannot import bcc ({exc}): install python3-bpfcc (run scripts/setup.sh) and use a venv "
            "with --system-site-packages") from exc

    src = str(src_dir / SOURCE_NAME)
    log.debug("compiling %s with %s", src, " ".join(flags))
    try:
        bpf = _build(BPF, src, flags)
    except Exception as exc:  # bcc raises bare Exception for compile and map-creation errors
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise KernelFeatureError(f"compiling {src} with bcc failed ({detail}): {_kernel_hint()}") from exc
    try:
        xdp = _load(bpf, abi.PROG_XDP, BPF.XDP, "XDP program", "XDP")
        tc = _load(bpf, abi.PROG_TC, BPF.SCHED_CLS, "tc program", "cls_bpf")
        if names:
            progs = bpf[abi.MAP_NAME_PROGS.encode()]
            for idx, name in abi.NAME_PROG_FUNCS.items():
                fn = _load(bpf, name, BPF.SCHED_CLS, "name parser program", "cls_bpf")
                progs[ctypes.c_int(idx)] = ctypes.c_int(fn.fd)
    except BaseException:
        bpf.cleanup()
        raise
    return Datapath(bpf, xdp.fd, tc.fd, pin_dir, names, replay_clock)


def _build(BPF, src: str, flags: list[str]):
    """bcc's compile of ``src`` with ``flags``; with a compile cache named by $HYBRID_BPF_CACHE,
    the same build loaded from it when it holds one (hybrid.datapath.objcache)."""
    from hybrid.datapath import objcache

    def compile_with_bcc():
        return BPF(src_file=src.encode(), cflags=flags)

    cache = objcache.from_env()
    return compile_with_bcc() if cache is None else cache.build(compile_with_bcc, src, flags)


def _load(bpf, name: str, prog_type: int, what: str, feature: str):
    """One program of the compiled object, loaded (verified); a one-line error naming it."""
    try:
        return bpf.load_func(name.encode(), prog_type)
    except Exception as exc:  # bcc raises bare Exception when the verifier or the kernel refuses
        raise KernelFeatureError(f"loading {what} {name} failed ({_last_line(exc)}): the verifier rejected it "
                                 f"or {feature} is unsupported; run hybridctl doctor") from exc


def _last_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__
