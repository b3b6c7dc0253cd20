"""Reading a BPF ring buffer (BPF_MAP_TYPE_RINGBUF) through its memory mapping, with nothing but
the map's fd: no bcc, no BPF object, no libbpf ring_buffer (both want the object that created
the map; the verdict engine only has the pin).

The layout follows the kernel ABI: include/uapi/linux/bpf.h (``BPF_RINGBUF_BUSY_BIT``,
``BPF_RINGBUF_DISCARD_BIT``, ``BPF_RINGBUF_HDR_SZ``) and kernel/bpf/ringbuf.c (``struct
bpf_ringbuf``, ``ringbuf_map_mmap_kern``, ``__bpf_ringbuf_reserve``, ``ringbuf_map_poll_kern``;
Documentation/bpf/ringbuf.rst tells the same story in prose)::

    map offset 0           one page, read-write: consumer_pos (u64), the only page user space may write
    map offset page_size   one page, read-only:  producer_pos (u64)
    then                   the data area, max_entries bytes, mapped twice in a row, so a record
                           that wraps past the end reads as one contiguous run

Positions count bytes since the map was created and never wrap (u64); a position's place in the
data area is ``pos & (max_entries - 1)`` (max_entries is a power of two). A record is an 8-byte
header, ``u32 len`` (``BUSY_BIT`` while the producer still writes it, ``DISCARD_BIT`` when it was
discarded) and a ``u32`` page offset only the kernel uses, then ``len`` payload bytes, the whole
rounded up to 8. The producer moves producer_pos when it *reserves*, so the consumer walks
``[consumer_pos, producer_pos)``, stops at the first busy record (records are consumed in
order) and skips discarded ones. The kernel refuses a reservation that would put more than
``max_entries - 1`` bytes between consumer_pos and the new producer_pos: that is a full ring,
and the BPF helper returns an error the program must count.

Memory ordering. The kernel publishes producer_pos and each header's len with store-release and
reads consumer_pos with load-acquire; the consumer must pair them. Python has no atomics, but
each access here is one aligned 8- or 4-byte load or store (a memoryview item is copied with a
constant-size memcpy, which compiles to one mov), and on x86-64 (total store order) every plain
load is an acquire and every plain store a release. Weakly ordered CPUs (arm64) would need
barriers Python cannot issue, so :meth:`RingBuffer.open` refuses them.

Readiness. The map fd polls readable (select, poll, epoll) whenever producer_pos differs from
consumer_pos: the kernel compares the two at every poll, and wakes sleepers when a record is
committed at the consumer's position (unless the producer passed ``BPF_RB_NO_WAKEUP``; the
datapath passes 0). A busy record at the head keeps the fd readable with nothing to read yet,
for the few instructions until its producer commits it.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import platform
import select
from collections.abc import Callable

from hybrid.errors import HybridError, KernelFeatureError, PrivilegeError
from hybrid.kernel import bpffs, bpfsys

log = logging.getLogger(__name__)

BPF_MAP_TYPE_RINGBUF = 27           # uapi enum bpf_map_type
BPF_F_RB_OVERWRITE = 1 << 19        # uapi map flag (Linux 6.19+): producers overwrite unread records
BPF_RINGBUF_BUSY_BIT = 1 << 31
BPF_RINGBUF_DISCARD_BIT = 1 << 30
BPF_RINGBUF_HDR_SZ = 8
_LEN_MASK = BPF_RINGBUF_DISCARD_BIT - 1

_TSO_MACHINES = frozenset({"x86_64", "amd64"})


def record_size(length: int) -> int:
    """Bytes a record with a ``length``-byte payload takes in the ring (header included)."""
    return (length + BPF_RINGBUF_HDR_SZ + 7) & ~7


class RingBuffer:
    """One consumer of one ring buffer map. Use :meth:`open`; close it (or use ``with``).

    There must be one consumer per ring: two would both read every record and race on
    consumer_pos.
    """

    def __init__(self, fd: int, info: bpfsys.MapInfo, what: str):
        self._fd = -1
        self.name = info.name
        self.size = info.max_entries          # bytes in the data area
        self.discarded = 0                     # discarded records skipped by this consumer
        self._what = what
        self._mask = self.size - 1
        page = mmap.PAGESIZE
        try:
            self._cons_map = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            try:
                self._prod_map = mmap.mmap(fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ,
                                           offset=page)
            except BaseException:
                self._cons_map.close()
                raise
        except OSError as exc:
            raise HybridError(f"mapping ring buffer {what}: {os.strerror(exc.errno or 0)}",
                              exc.errno) from exc
        self._cons = memoryview(self._cons_map).cast("Q")      # [0]: consumer_pos, ours to write
        prod = memoryview(self._prod_map)                       # read-only: so is every record
        self._prod = prod[:8].cast("Q")                         # [0]: producer_pos
        self._data = prod[page:]                                # 2 * size bytes: the data, twice
        self._words = self._data.cast("I")                      # headers' len, by offset / 4
        self._views = (self._cons, self._prod, self._words, self._data, prod)
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)
        self._fd = fd

    @classmethod
    def open(cls, source: str | os.PathLike | int) -> RingBuffer:
        """The ring buffer pinned at a bpffs path, or behind a map fd (duplicated: the caller
        keeps its own). One-line :class:`HybridError` when it cannot be opened or is not a
        ring buffer."""
        machine = platform.machine().lower()
        if machine not in _TSO_MACHINES:
            raise KernelFeatureError(f"the ring buffer reader needs x86-64's store ordering; this machine "
                                     f"is {machine or 'unknown'}: ring buffers are unsupported here")
        if isinstance(source, int):
            what = f"fd {source}"
            try:
                fd = os.dup(source)
            except OSError as exc:
                raise HybridError(f"ring buffer {what}: {os.strerror(exc.errno or 0)}", exc.errno) from exc
        else:
            what = os.fspath(source)
            try:
                fd = bpfsys.obj_get(what)
            except PrivilegeError:      # EACCES also means "not a BPF object": say which
                if os.path.isdir(what):
                    raise HybridError(f"{what} is a directory: name the ring buffer's pin in it") from None
                if not _on_bpffs(what):
                    raise HybridError(f"{what} is not on a bpffs: a ring buffer is opened by its "
                                      "pin") from None
                raise
        try:
            return cls(fd, _ringbuf_info(fd, what), what)
        except BaseException:
            os.close(fd)
            raise

    # ---- reading ----------------------------------------------------------------------------------
    def drain(self, callback: Callable[[memoryview], object], limit: int | None = None) -> int:
        """Call ``callback(record)`` for each committed record, oldest first, up to ``limit``
        records; return how many. ``record`` is a read-only memoryview into the ring, valid only
        until the callback returns (the producer reuses the space): ``bytes(record)`` keeps it.

        consumer_pos is written back after each pass over what producer_pos showed, and when
        the call ends. A record whose callback raised counts as consumed: it is not delivered
        twice, and a record that always fails cannot wedge the ring."""
        if self._fd < 0:
            raise HybridError(f"ring buffer {self._what} is closed")
        cons_v, prod_v, words, data, mask = self._cons, self._prod, self._words, self._data, self._mask
        left = -1 if limit is None else limit
        n = 0
        cons = cons_v[0]
        try:
            while left:
                prod = prod_v[0]                       # load-acquire (x86-64: any load)
                if cons == prod:
                    break
                while cons < prod:
                    off = cons & mask
                    word = words[off >> 2]             # load-acquire of the header's len
                    if word & BPF_RINGBUF_BUSY_BIT:
                        return n                       # not committed yet: later records wait
                    length = word & _LEN_MASK
                    end = cons + ((length + BPF_RINGBUF_HDR_SZ + 7) & ~7)
                    if end > prod:                     # never from the kernel: refuse to guess
                        raise HybridError(f"ring buffer {self._what} is corrupt: the record at "
                                          f"{cons} ends past the producer position {prod}")
                    cons = end
                    if word & BPF_RINGBUF_DISCARD_BIT:
                        self.discarded += 1
                        continue
                    n += 1
                    callback(data[off + BPF_RINGBUF_HDR_SZ:off + BPF_RINGBUF_HDR_SZ + length])
                    left -= 1
                    if not left:
                        return n
                cons_v[0] = cons                       # store-release (x86-64: any store)
        finally:
            cons_v[0] = cons
        return n

    def poll(self, callback: Callable[[memoryview], object], timeout_s: float | None = None,
             limit: int | None = None) -> int:
        """Drain what is there; when nothing was, wait up to ``timeout_s`` seconds (None: until
        a record comes) and drain again. Returns the records delivered. An engine with its own
        select loop registers :meth:`fileno` there and calls :meth:`drain` instead."""
        n = self.drain(callback, limit)
        if n or timeout_s == 0:
            return n
        ms = None if timeout_s is None else max(0, math.ceil(timeout_s * 1000))
        if not self._poller.poll(ms):
            return 0
        return self.drain(callback, limit)

    def pending(self) -> int:
        """Bytes between consumer_pos and producer_pos (records not read yet, headers and
        reservations still being written included)."""
        if self._fd < 0:
            raise HybridError(f"ring buffer {self._what} is closed")
        return self._prod[0] - self._cons[0]

    @property
    def consumer_pos(self) -> int:
        """Bytes consumed since the map was created (headers and discarded records included)."""
        if self._fd < 0:
            raise HybridError(f"ring buffer {self._what} is closed")
        return self._cons[0]

    def fileno(self) -> int:
        """The map fd: readable for select/poll/epoll while records wait."""
        if self._fd < 0:
            raise HybridError(f"ring buffer {self._what} is closed")
        return self._fd

    # ---- lifetime ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap and close the fd (idempotent). A record a callback kept beyond its call keeps
        its mapping alive (and readable) until it is released."""
        if self._fd < 0:
            return
        for view in self._views:
            view.release()
        for m in (self._cons_map, self._prod_map):
            try:
                m.close()
            except BufferError:  # a record view still exists: the mapping goes with it
                log.debug("ring buffer %s: a record is still referenced; unmapped when released", self._what)
        fd, self._fd = self._fd, -1
        os.close(fd)

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RingBuffer {self._what} {self.size} bytes{' closed' if self._fd < 0 else ''}>"


def _on_bpffs(path: str) -> bool:
    """Whether ``path`` may lie under a mounted bpffs (bpf_obj_get answers EACCES for any other
    file, which would read as a missing privilege). Paths through /proc (another mount
    namespace's root, see hybrid.kernel.bpffs) are given the benefit of the doubt."""
    real = os.path.realpath(path)
    if real.startswith("/proc/"):
        return True
    return any(real == m or real.startswith(m.rstrip("/") + "/") for m in bpffs.mounted_bpffs())


def _ringbuf_info(fd: int, what: str) -> bpfsys.MapInfo:
    """The map's info, once the fd is known to be a ring buffer map (else a one-line error)."""
    try:
        kind = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        kind = ""
    if kind == "anon_inode:bpf-prog":
        raise HybridError(f"{what} is a BPF program, not a ring buffer: check the path")
    if kind != "anon_inode:bpf-map":
        raise HybridError(f"{what} is not a BPF map, so not a ring buffer: check the path")
    info = bpfsys.map_info(fd)
    if info.type != BPF_MAP_TYPE_RINGBUF:
        raise HybridError(f"{what} is a BPF map of type {info.type} ({info.name}), not a ring buffer "
                          f"(type {BPF_MAP_TYPE_RINGBUF}): check the path")
    if info.map_flags & BPF_F_RB_OVERWRITE:
        raise HybridError(f"{what} is a ring buffer in overwrite mode (records can vanish under the "
                          "reader): create it without BPF_F_RB_OVERWRITE")
    if info.max_entries < 8 or info.max_entries & (info.max_entries - 1):
        raise HybridError(f"{what}: ring buffer size {info.max_entries} is not a power of two")
    return info
