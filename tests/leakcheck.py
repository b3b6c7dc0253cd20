"""What a test run may leave behind, and how to tell: a snapshot of every kind of object hybrid
or its tests create, and the difference between two snapshots. Used by the session-end check in
conftest.py and tested itself (tests/integration/test_leakcheck.py)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess

from hybrid import instance
from hybrid.kernel import bpffs, netfilter
from hybrid.lab import topology as lab


def _root_xdp_links() -> list[str]:
    proc = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True)
    if proc.returncode != 0:
        return []
    return sorted(f"{link['ifname']}:xdp" for link in json.loads(proc.stdout) if "xdp" in link)


def snapshot() -> dict[str, set[str]]:
    return {
        "network namespaces": lab.existing_netns(),
        "pinned BPF objects": set(bpffs.pins()),
        "iptables rules in the root namespace": set(netfilter.leftovers()),
        "XDP programs in the root namespace": set(_root_xdp_links()),
        "hybrid instances (state files)": set(instance.instances()),
        "lab records": set(lab.recorded_labs()),
    }


def leaked(before: dict[str, set[str]], after: dict[str, set[str]], ours=lambda kind, item: True) -> dict[str, list[str]]:
    """Objects present after but not before, filtered by ``ours(kind, item)`` (a run shares the
    machine with other runs; only what this run created is its leak)."""
    out = {}
    for kind, items in after.items():
        new = sorted(i for i in items - before.get(kind, set()) if ours(kind, i))
        if new:
            out[kind] = new
    return out


def session_tag() -> str:
    """Prefix of every namespace and lab this test session creates (lab names: <= 21 chars)."""
    return f"t{os.getpid() % 1000000:06d}"


_names = itertools.count()


def new_lab_name() -> str:
    """A lab name unique to this session (and so covered by the leak check)."""
    return f"{session_tag()}{next(_names)}"
