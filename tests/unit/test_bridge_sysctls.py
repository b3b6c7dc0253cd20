"""Bridge mode's sysctls, on a stand-in for /proc/sys: each old value is written to the state file
before the value changes (a kill -9 right after the write still restores it), a failed attach puts
them back, and detach restores only what still holds hybrid's value."""

import contextlib

import pytest

from hybrid.datapath import attach as att
from hybrid.errors import HybridError, KernelFeatureError

pytestmark = pytest.mark.unit
CALL4, CALL6, VLAN = att.NF_CALL["ipv4"], att.NF_CALL["ipv6"], att.VLAN_TAGGED


class Proc:
    """/proc/sys as a dict; every write and state save in one ordered journal."""

    def __init__(self, monkeypatch, values, journal):
        self.values, self.journal = dict(values), journal
        monkeypatch.setattr(att.sysutil, "read_sysctl", self.values.get)
        monkeypatch.setattr(att.sysutil, "write_sysctl", self.write)
        monkeypatch.setattr(att.os.path, "isdir", lambda p: p == att.BRIDGE_SYSCTLS or False)

    def write(self, name, value):
        self.journal.append(("write", name, value))
        self.values[name] = value


class State(att.State):
    def save(self):
        self.journal.append(("save", {k: list(v) for k, v in self.sysctls.items()}))


def state(journal) -> State:
    s = State("t", "/x")
    s.journal = journal
    return s


def test_old_values_are_saved_before_any_write_and_undone_on_failure(monkeypatch):
    journal: list = []
    proc = Proc(monkeypatch, {CALL4: "0", CALL6: "1", VLAN: "0"}, journal)
    st = state(journal)
    with contextlib.ExitStack() as undo:
        assert att._set_sysctls(undo, st, att.bridge_sysctls(("ipv4", "ipv6"))) == dict.fromkeys([CALL4, CALL6, VLAN], "1")
        assert proc.values == dict.fromkeys([CALL4, CALL6, VLAN], "1")
        for name in (CALL4, VLAN):
            write = journal.index(("write", name, "1"))
            assert any(e[0] == "save" and name in e[1] for e in journal[:write]), journal
        assert ("write", CALL6, "1") not in journal             # already 1: nothing written
        # the transaction fails later: the ExitStack unwinds
    assert proc.values == {CALL4: "0", CALL6: "1", VLAN: "0"} and st.sysctls == {}


def test_a_reattach_keeps_the_first_old_values_and_puts_back_what_is_no_longer_wanted(monkeypatch):
    journal: list = []
    proc = Proc(monkeypatch, {CALL4: "0", CALL6: "0", VLAN: "0"}, journal)
    st = state(journal)
    with contextlib.ExitStack() as undo:
        att._set_sysctls(undo, st, att.bridge_sysctls(("ipv4", "ipv6")))
        undo.pop_all()
    with contextlib.ExitStack() as undo:
        att._set_sysctls(undo, st, att.bridge_sysctls(("ipv4",)))     # ipv6 no longer queued
        undo.pop_all()
    assert st.sysctls == {CALL4: ["0", "1"], VLAN: ["0", "1"]} and proc.values[CALL6] == "0"
    assert att.restore_sysctls(st) == [f"{CALL4} restored to 0", f"{VLAN} restored to 0"]
    assert proc.values == dict.fromkeys([CALL4, CALL6, VLAN], "0")


def test_detach_leaves_a_value_someone_else_changed(monkeypatch):
    journal: list = []
    proc = Proc(monkeypatch, {CALL4: "1", VLAN: "1"}, journal)   # as attach left them
    st = state(journal)
    st.sysctls = {CALL4: ["1", "1"], VLAN: ["0", "1"]}
    proc.values[CALL4] = "0"                                     # an operator, while attached
    lines = att.restore_sysctls(st)
    assert lines[0] == f"{CALL4} left at 0: changed by someone else since attach (was 1, hybrid set 1)"
    assert lines[1] == f"{VLAN} restored to 0"
    assert proc.values == {CALL4: "0", VLAN: "0"}


def test_without_br_netfilter_nothing_is_written(monkeypatch):
    journal: list = []
    Proc(monkeypatch, {}, journal)
    monkeypatch.setattr(att.os.path, "isdir", lambda p: False)
    with pytest.raises(KernelFeatureError, match="bridge mode needs br_netfilter"), contextlib.ExitStack() as undo:
        att._set_sysctls(undo, state(journal), [CALL4])
    assert journal == []


def test_a_restore_that_fails_is_a_line_not_an_exception(monkeypatch):
    journal: list = []
    proc = Proc(monkeypatch, {CALL4: "1"}, journal)

    def refuse(name, value):
        raise HybridError(f"setting {name} to {value}: Permission denied")
    monkeypatch.setattr(att.sysutil, "write_sysctl", refuse)
    st = state(journal)
    st.sysctls = {CALL4: ["0", "1"]}
    assert att.restore_sysctls(st) == [f"{CALL4} not restored to 0: setting {CALL4} to 0: Permission denied"]
    assert proc.values[CALL4] == "1"
