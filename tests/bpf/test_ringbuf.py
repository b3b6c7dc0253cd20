"""hybrid.kernel.ringbuf against the real kernel: a tiny tc program (compiled by bcc, its ring
buffer pinned in a private bpffs) writes records through BPF_PROG_TEST_RUN, and the consumer
reads them back from the pin alone.

The program's mode is the frame's mark: it writes the frame it was run on as one record
(bpf_ringbuf_output; MODE_SEQ puts its own sequence number in the first 8 bytes), or reserves a
16-byte record of the frame's first bytes and discards or submits it, or (MODE_SLOW) keeps a
reservation open for ~30 us before it commits it. A refused write returns 1 and counts itself
in an array, so a full ring is visible on both sides.

Pinning, for the datapath: bcc 0.26's BPF_RINGBUF_OUTPUT has no pinned form, and
BPF_TABLE_PINNED("ringbuf", ...) creates the pinned ring without the ringbuf_* methods (bcc does
not turn ``&map`` into the map's fd in a direct helper call either: the verifier sees a scalar).
RING_PINNED below is BPF_RINGBUF_OUTPUT's struct with the ``maps/<type>:<pin path>`` section
BPF_TABLE_PINNED uses; bcc reopens the pin when it exists (test_a_second_compile_...)."""

from __future__ import annotations

import ctypes
import os
import random
import select
import struct
import subprocess
import tempfile
import threading

import pytest

from hybrid.errors import HybridError, NotFoundError
from hybrid.kernel import bpfsys
from hybrid.kernel.ringbuf import RingBuffer, record_size

pytestmark = pytest.mark.bpf

RING_SIZE = 4096
MAX_RECORD = 2048
MODE_OUTPUT, MODE_DISCARD, MODE_SUBMIT, MODE_SEQ, MODE_SLOW = 0, 1, 2, 3, 4
SLOW_MAGIC = 0x5A5A_1234_F0F0_C3C3
SPIN = 20_000                   # iterations a slow record stays reserved (busy): ~30 us here
FIXED = 16                      # bytes of the reserved records

SOURCE = r"""
#include <uapi/linux/bpf.h>

#define RING_PINNED(_name, _size, _path)                                                \
struct _name##_table_t {                                                                \
	int key;                                                                        \
	u32 leaf;                                                                       \
	int (*ringbuf_output)(void *, u64, u64);                                        \
	void *(*ringbuf_reserve)(u64);                                                  \
	void (*ringbuf_discard)(void *, u64);                                           \
	void (*ringbuf_submit)(void *, u64);                                            \
	u32 max_entries;                                                                \
};                                                                                      \
__attribute__((section("maps/ringbuf:" _path)))                                         \
struct _name##_table_t _name = { .max_entries = (_size) }

struct record_buf { u64 seq; u8 bytes[MAX_RECORD - 8]; };
struct slow_record { u64 seq; u64 check; u64 spin; };

RING_PINNED(test_ring, RING_SIZE, PIN_DIR "/test_ring");
BPF_TABLE_PINNED("array", u32, u64, test_failed, 1, PIN_DIR "/test_failed");
BPF_PERCPU_ARRAY(test_scratch, struct record_buf, 1);
BPF_ARRAY(test_seq, u64, 1);

static __always_inline int refused(void)
{
	u32 zero = 0;
	u64 *failed = test_failed.lookup(&zero);
	if (failed)
		__sync_fetch_and_add(failed, 1);
	return 1;
}

int ring_write(struct __sk_buff *skb)
{
	u32 zero = 0, len = skb->len;
	if (skb->mark == MODE_SLOW) {   /* a reservation held open (busy) while the consumer looks */
		struct slow_record *rec = test_ring.ringbuf_reserve(sizeof(struct slow_record));
		if (!rec)
			return refused();
		u64 *seq = test_seq.lookup(&zero);
		u64 n = seq ? (*seq)++ : 0;
		volatile u64 acc = n;
		rec->seq = n;
		for (int i = 0; i < SPIN; i++)
			acc = acc * 31 + i;
		rec->spin = acc;
		rec->check = n ^ SLOW_MAGIC;
		test_ring.ringbuf_submit(rec, 0);
		return 0;
	}
	if (skb->mark == MODE_DISCARD || skb->mark == MODE_SUBMIT) {
		u8 *rec = test_ring.ringbuf_reserve(FIXED);
		if (!rec)
			return refused();
		if (bpf_skb_load_bytes(skb, 0, rec, FIXED) < 0)
			__builtin_memset(rec, 0xee, FIXED);
		if (skb->mark == MODE_DISCARD)
			test_ring.ringbuf_discard(rec, 0);
		else
			test_ring.ringbuf_submit(rec, 0);
		return 0;
	}
	struct record_buf *buf = test_scratch.lookup(&zero);
	if (!buf || len < FIXED || len > MAX_RECORD)
		return 2;
	if (bpf_skb_load_bytes(skb, 0, buf, len) < 0)
		return 2;
	if (skb->mark == MODE_SEQ) {    /* one producer at a time: a plain increment */
		u64 *seq = test_seq.lookup(&zero);
		if (seq)
			buf->seq = (*seq)++;
	}
	/* bcc 0.26 aborts (a clang assertion) on ringbuf_output(buf->bytes, ...): pass the struct */
	if (test_ring.ringbuf_output(buf, len, 0) < 0)
		return refused();
	return 0;
}
"""


def _cflags(pin_dir: str) -> list[str]:
    return [f'-DPIN_DIR="{pin_dir}"', f"-DRING_SIZE={RING_SIZE}", f"-DMAX_RECORD={MAX_RECORD}",
            f"-DFIXED={FIXED}", f"-DMODE_DISCARD={MODE_DISCARD}", f"-DMODE_SUBMIT={MODE_SUBMIT}",
            f"-DMODE_SEQ={MODE_SEQ}", f"-DMODE_SLOW={MODE_SLOW}", f"-DSLOW_MAGIC={SLOW_MAGIC}ULL",
            f"-DSPIN={SPIN}"]


class Program:
    """The compiled program: write() runs it on a frame; failed() reads its refusal count."""

    def __init__(self, pin_dir: str):
        from bcc import BPF
        self.bpf = BPF(text=SOURCE.encode(), cflags=_cflags(pin_dir))
        self.fd = self.bpf.load_func(b"ring_write", BPF.SCHED_CLS).fd
        self.failed_fd = bpfsys.obj_get(os.path.join(pin_dir, "test_failed"))

    def write(self, frame: bytes, mode: int = MODE_OUTPUT, repeat: int = 1) -> int:
        ctx = bpfsys.SkBuff(mark=mode, ifindex=1)
        return bpfsys.prog_test_run(self.fd, frame, ctx, repeat=repeat, name="ring_write").retval

    def failed(self) -> int:
        value = ctypes.c_uint64()
        assert bpfsys.map_lookup(self.failed_fd, bytes(4), value)
        return value.value

    def close(self) -> None:
        os.close(self.failed_fd)
        self.bpf.cleanup()


@pytest.fixture(scope="module")
def bpffs():
    """A private bpffs on a temp dir under /run, emptied and unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root: BPF_PROG_TEST_RUN (run sudo ./scripts/test.sh)")
    path = tempfile.mkdtemp(prefix="hybrid-test-ring-", dir="/run")
    subprocess.run(["mount", "-t", "bpf", "-o", "mode=0700", "bpf", path], check=True)
    try:
        yield path
    finally:
        for name in os.listdir(path):
            if name not in ("maps.debug", "progs.debug"):
                os.unlink(os.path.join(path, name))
        subprocess.run(["umount", path], check=True)
        os.rmdir(path)


@pytest.fixture(scope="module")
def prog(bpffs):
    p = Program(bpffs)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def ring(prog, bpffs):
    """The consumer, opened on the pin, with the ring emptied of earlier tests' records."""
    with RingBuffer.open(os.path.join(bpffs, "test_ring")) as rb:
        rb.drain(lambda rec: None)
        assert rb.pending() == 0
        yield rb


def _frame(rng: random.Random, length: int) -> bytes:
    return rng.randbytes(length)


def _collect(rb: RingBuffer, limit: int | None = None) -> list[bytes]:
    out: list[bytes] = []
    rb.drain(lambda rec: out.append(bytes(rec)), limit)
    return out


# ---- records -------------------------------------------------------------------------------------------
def test_records_come_back_in_order_with_exact_contents(prog, ring):
    rng = random.Random(1)
    frames = [_frame(rng, n) for n in (16, 17, 60, 99, 333)]
    for f in frames:
        assert prog.write(f) == 0
    assert ring.pending() == sum(record_size(len(f)) for f in frames)
    assert _collect(ring) == frames
    assert ring.pending() == 0 and _collect(ring) == []


def test_discarded_records_are_skipped(prog, ring):
    rng = random.Random(2)
    a, b, c, d = (_frame(rng, 40) for _ in range(4))
    assert prog.write(a) == 0
    assert prog.write(b, MODE_DISCARD) == 0
    assert prog.write(c, MODE_SUBMIT) == 0
    assert prog.write(d) == 0
    before = ring.discarded
    assert _collect(ring) == [a, c[:FIXED], d]
    assert ring.discarded == before + 1


def test_limit_and_a_failing_callback(prog, ring):
    rng = random.Random(3)
    frames = [_frame(rng, 20 + i) for i in range(6)]
    for f in frames:
        prog.write(f)
    assert _collect(ring, limit=2) == frames[:2]

    def fail_on_third(rec):
        seen.append(bytes(rec))
        if len(seen) == 2:
            raise ValueError("engine bug")
    seen: list[bytes] = []
    with pytest.raises(ValueError):
        ring.drain(fail_on_third)
    assert seen == frames[2:4]
    assert _collect(ring) == frames[4:]       # the record that raised is not delivered again


def test_wrap_around_over_several_laps(prog, ring):
    """Odd sizes, random bursts that fit, a drain between bursts: every byte of every record,
    including the ones that straddle the end of the data area (read through the second mapping)."""
    rng = random.Random(4)
    start = ring.consumer_pos
    wrapped = 0
    sent = 0
    for _ in range(1000):
        if ring.consumer_pos - start >= 6 * RING_SIZE:
            break
        burst, used = [], 0
        for _ in range(rng.randint(1, 12)):
            f = _frame(rng, rng.choice((rng.randint(16, 64), rng.randint(65, 700) | 1)))
            if used + record_size(len(f)) > RING_SIZE - 1:
                break
            burst.append(f)
            used += record_size(len(f))
        pos = ring.consumer_pos
        for f in burst:
            assert prog.write(f) == 0
            off = pos % RING_SIZE
            wrapped += off + record_size(len(f)) > RING_SIZE
            pos += record_size(len(f))
        assert _collect(ring) == burst
        assert ring.consumer_pos == pos
        sent += len(burst)
    assert ring.consumer_pos - start >= 6 * RING_SIZE
    assert wrapped >= 3, f"only {wrapped} of {sent} records wrapped"


def test_a_full_ring_refuses_and_the_program_counts_it(prog, ring):
    rng = random.Random(5)
    frames = [_frame(rng, 100) for _ in range(60)]
    fit = (RING_SIZE - 1) // record_size(100)         # the kernel keeps at most size - 1 bytes unread
    failed_before = prog.failed()
    results = [prog.write(f) for f in frames]
    assert results == [0] * fit + [1] * (len(frames) - fit)
    assert prog.failed() - failed_before == len(frames) - fit
    assert _collect(ring) == frames[:fit]
    assert prog.write(frames[0]) == 0                  # room again once read
    assert _collect(ring) == frames[:1]


def test_a_concurrent_producer(prog, ring):
    """The program runs 100,000 times in one BPF_PROG_TEST_RUN (the GIL is released) while this
    thread drains: records carry the program's sequence number, so a record read before its
    producer committed it (a busy header ignored, a stale lap) shows as a sequence out of
    order or a torn payload. Delivered + refused = written."""
    rng = random.Random(11)
    frame = _frame(rng, 121)
    repeat = 100_000
    failed_before = prog.failed()
    seqs: list[int] = []

    def check(rec):
        assert rec[8:] == frame[8:]
        seqs.append(int.from_bytes(rec[:8], "little"))
    done = threading.Event()
    producer = threading.Thread(target=lambda: (prog.write(frame, MODE_SEQ, repeat), done.set()))
    producer.start()
    while not done.is_set():
        ring.poll(check, timeout_s=0.01)
    producer.join()
    ring.drain(check)
    refused = prog.failed() - failed_before
    assert len(seqs) + refused == repeat
    assert all(b > a for a, b in zip(seqs, seqs[1:])), "records out of order"
    assert seqs[-1] - seqs[0] < repeat and len(seqs) > RING_SIZE // record_size(len(frame))


def _slow_round(prog: Program, ring: RingBuffer, cpus: list[int], repeat: int) -> int:
    """One MODE_SLOW run of ``repeat`` records, producer on cpus[0], reader (this thread) on
    cpus[1]; every record checked. Returns how often the reader met a busy head."""
    seqs: list[int] = []

    def check(rec):
        seq, chk, _ = struct.unpack("<QQQ", rec)
        assert chk == seq ^ SLOW_MAGIC, f"record {seq} read before its producer committed it"
        seqs.append(seq)

    def produce():
        os.sched_setaffinity(0, {cpus[0]})          # pid 0: this thread only
        reading.wait(10)
        prog.write(bytes(64), MODE_SLOW, repeat)
        done.set()
    failed_before = prog.failed()
    reading, done = threading.Event(), threading.Event()
    busy = 0
    os.sched_setaffinity(0, {cpus[1]})
    try:
        producer = threading.Thread(target=produce)
        producer.start()
        reading.set()
        while not done.is_set():
            waiting = ring.pending()
            if ring.drain(check) == 0 and waiting:
                busy += 1           # a record was reserved and none committed: the head was busy
        producer.join()
    finally:
        os.sched_setaffinity(0, cpus)
    ring.drain(check)
    assert len(seqs) + prog.failed() - failed_before == repeat
    assert all(b == a + 1 for a, b in zip(seqs, seqs[1:]))
    return busy


def test_a_record_still_reserved_stops_the_reader(prog, ring):
    """Each run holds its reservation open while it spins, then fills in ``check`` and submits:
    the reader, spinning on drain() meanwhile, keeps meeting a busy header at the head and must
    wait there; a record read early shows a stale or zero ``check``. Producer and reader are
    pinned to different CPUs: on one CPU the reader would run only between the producer's runs,
    when no reservation is open. Rounds repeat (at most 10) until the reader has met a busy
    head: on a loaded machine it may not have run while the producer did."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs: producer and reader must run at the same time")
    busy = rounds = 0
    while not busy and rounds < 10:
        rounds += 1
        busy += _slow_round(prog, ring, cpus, 2000)
    assert busy, f"in {rounds} rounds the reader never met a reservation in progress"


# ---- readiness -----------------------------------------------------------------------------------------
def _readable(rb: RingBuffer) -> bool:
    return bool(select.select([rb], [], [], 0)[0])


def test_fd_is_readable_while_records_wait(prog, ring):
    rng = random.Random(6)
    assert not _readable(ring)
    f = _frame(rng, 50)
    prog.write(f)
    assert _readable(ring)
    assert ring.poll(lambda rec: None, timeout_s=0) == 1
    assert not _readable(ring)
    for _ in range(3):
        prog.write(f)
    assert _collect(ring, limit=2) == [f, f]
    assert _readable(ring)                              # one left
    assert _collect(ring) == [f]
    assert not _readable(ring)
    assert ring.poll(lambda rec: None, timeout_s=0.01) == 0


def test_poll_wakes_for_a_record_written_while_it_waits(prog, ring):
    frame = _frame(random.Random(7), 64)
    got: list[bytes] = []
    waiter = threading.Thread(target=lambda: ring.poll(lambda rec: got.append(bytes(rec)), timeout_s=10))
    waiter.start()
    prog.write(frame)
    waiter.join(15)
    assert not waiter.is_alive() and got == [frame]


# ---- opening and closing -------------------------------------------------------------------------------
def test_open_by_fd_duplicates_it(prog, bpffs):
    fd = bpfsys.obj_get(os.path.join(bpffs, "test_ring"))
    try:
        frame = _frame(random.Random(8), 30)
        with RingBuffer.open(fd) as rb:
            assert rb.fileno() != fd and rb.size == RING_SIZE and rb.name == "test_ring"
            rb.drain(lambda rec: None)
            prog.write(frame)
            assert _collect(rb) == [frame]
        with pytest.raises(HybridError, match="is closed"):
            rb.drain(lambda rec: None)
        os.fstat(fd)                                    # the caller's fd is still open
    finally:
        os.close(fd)


def test_a_record_kept_past_close_stays_readable(prog, bpffs):
    frame = _frame(random.Random(9), 48)
    kept: list[memoryview] = []
    with RingBuffer.open(os.path.join(bpffs, "test_ring")) as rb:
        rb.drain(lambda rec: None)
        prog.write(frame)
        rb.drain(kept.append)
        with pytest.raises(TypeError):                  # read-only: the mapping is PROT_READ
            kept[0][0] = 0
    assert bytes(kept[0]) == frame                      # still mapped: no crash after close
    kept.clear()


def test_wrong_objects_get_one_line(prog, bpffs, tmp_path):
    prog_pin = os.path.join(bpffs, "test_prog")
    bpfsys.obj_pin(prog.fd, prog_pin)
    regular = tmp_path / "not-bpf"
    regular.write_text("x")
    cases = [
        (os.path.join(bpffs, "test_failed"), r"is a BPF map of type 2 \(test_failed\), not a ring buffer"),
        (prog_pin, "is a BPF program, not a ring buffer"),
        (os.path.join(bpffs, "missing"), "No such file"),
        (str(regular), f"{regular} is not on a bpffs"),
        (bpffs, f"{bpffs} is a directory"),
    ]
    try:
        for path, message in cases:
            with pytest.raises(HybridError, match=message) as err:
                RingBuffer.open(path)
            assert "\n" not in str(err.value), str(err.value)
        with pytest.raises(NotFoundError):
            RingBuffer.open(os.path.join(bpffs, "missing"))
        with open(regular) as f:
            with pytest.raises(HybridError, match=f"fd {f.fileno()} is not a BPF map, so not a ring buffer"):
                RingBuffer.open(f.fileno())
    finally:
        os.unlink(prog_pin)


def test_a_second_compile_reopens_the_pinned_ring(prog, ring, bpffs):
    """What a restart of the datapath does: the same source compiled again reuses the pin, and
    the running consumer reads what the new program writes."""
    ring_id = bpfsys.map_info(ring.fileno()).id
    second = Program(bpffs)
    try:
        assert bpfsys.map_info(second.bpf[b"test_ring"].get_fd()).id == ring_id
        frame = _frame(random.Random(10), 77)
        assert second.write(frame) == 0
        assert _collect(ring) == [frame]
    finally:
        second.close()
