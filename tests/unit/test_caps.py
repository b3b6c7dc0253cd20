"""hybrid.kernel.caps: capability names and masks as /proc/PID/status shows them, and giving
capabilities up (in a child process: the test's own process keeps its capabilities)."""

from __future__ import annotations

import os
import re
import threading

import pytest

from hybrid.errors import HybridError
from hybrid.kernel import caps

pytestmark = pytest.mark.unit

STATUS = """Name:\thybridctl
Umask:\t0077
State:\tS (sleeping)
Uid:\t0\t0\t0\t0
CapInh:\t0000000000000000
CapPrm:\t0000008000003000
CapEff:\t0000008000003000
CapBnd:\t000000c000003000
CapAmb:\t0000000000000000
NoNewPrivs:\t1
Seccomp:\t2
"""


def test_the_names_are_the_kernel_headers():
    header = "/usr/include/linux/capability.h"
    if not os.path.exists(header):
        pytest.skip(f"{header} is not installed (linux-libc-dev)")
    with open(header) as f:
        defined = {int(n): name for name, n in re.findall(r"^#define (CAP_[A-Z_]+)\s+(\d+)\s*$", f.read(), re.MULTILINE)}
    assert caps.NAMES == tuple(defined[i] for i in range(len(defined)))


def test_a_status_mask_into_names_and_back():
    assert caps.names(0x8000003000) == ["CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_BPF"]
    assert caps.names(0) == []
    assert caps.names(0x1FFFFFFFFFF) == list(caps.NAMES)
    assert caps.names(1 << 45 | 1) == ["CAP_CHOWN", "CAP_45"]            # newer than the table
    assert caps.mask(["CAP_NET_ADMIN", "net_raw", "Cap_Bpf"]) == 0x8000003000
    assert caps.mask(caps.ENGINE) == 0x8000003000
    with pytest.raises(ValueError, match="unknown capability 'CAP_NET_MAGIC'"):
        caps.mask(["CAP_NET_MAGIC"])


def test_parse_a_status():
    s = caps.Sets.parse(STATUS)
    assert (s.inheritable, s.permitted, s.effective, s.ambient) == (0, 0x8000003000, 0x8000003000, 0)
    assert caps.names(s.bounding) == ["CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_PERFMON", "CAP_BPF"]
    assert s.no_new_privs is True
    assert caps.Sets.parse(STATUS.replace("NoNewPrivs:\t1\n", "")).no_new_privs is False
    with pytest.raises(ValueError, match="no CapBnd, CapEff"):
        caps.Sets.parse("CapInh:\t0\nCapPrm:\t0\n")


def _in_child(fn) -> tuple[int, str]:
    """Run ``fn`` in a forked child; its exit status and what it wrote to the pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                  # pragma: no cover - the child
        os.close(r)
        code = 0
        try:
            os.write(w, str(fn()).encode())
        except BaseException as exc:              # noqa: BLE001 - reported to the parent
            os.write(w, f"{type(exc).__name__}: {exc}".encode())
            code = 1
        os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), out


def test_limit_to_keeps_only_what_is_asked_and_held():
    before = caps.Sets.of()

    def child():
        after = caps.limit_to(caps.ENGINE | {"CAP_CHECKPOINT_RESTORE"})
        return after == caps.Sets.of() and after

    rc, out = _in_child(child)
    assert rc == 0, out
    wanted = caps.mask(caps.ENGINE | {"CAP_CHECKPOINT_RESTORE"})
    held = before.permitted & wanted
    assert f"inheritable=0, permitted={held}, effective={held}," in out
    assert "ambient=0, no_new_privs=True" in out
    # The bounding set goes down too where CAP_SETPCAP allows it (root), else it stays.
    bounding = before.bounding & wanted if before.effective >> caps.CAP_SETPCAP & 1 else before.bounding
    assert f"bounding={bounding}," in out
    assert caps.Sets.of() == before                 # this process kept everything


def test_limit_to_refuses_with_a_second_thread():
    def child():
        stop = threading.Event()
        t = threading.Thread(target=stop.wait)
        t.start()
        try:
            caps.limit_to(caps.ENGINE)
        except HybridError as exc:
            return f"refused: {exc}; effective {caps.Sets.of().effective:#x}"
        finally:
            stop.set()
            t.join()
        return "not refused"

    rc, out = _in_child(child)
    assert rc == 0 and out == ("refused: cannot give up capabilities with 2 threads running: capset(2) changes "
                               f"the calling thread only (do it before starting threads); effective "
                               f"{caps.Sets.of().effective:#x}"), out
