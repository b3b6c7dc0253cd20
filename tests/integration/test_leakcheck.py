"""The session-end leak check must be able to fail: prove it sees each kind of leftover."""

import leakcheck
import pytest
from leakcheck import new_lab_name

from hybrid.kernel import netfilter as nf
from hybrid.lab import topology as labmod

pytestmark = pytest.mark.integration


def test_detects_a_leaked_namespace_and_lab_record():
    before = leakcheck.snapshot()
    lb = labmod.Lab(new_lab_name())
    lb.up()
    try:
        leaks = leakcheck.leaked(before, leakcheck.snapshot())
        assert set(leaks["network namespaces"]) == set(lb.namespaces)
        assert leaks["lab records"] == [lb.name]
    finally:
        lb.down()
    assert leakcheck.leaked(before, leakcheck.snapshot()) == {}


def test_detects_rules_left_in_a_namespace_the_test_owns(lab):
    gw = lab.netns("gw")
    nf.install(nf.QueueRule(0x1, 0x1, families=("ipv4",)), netns=gw)
    try:
        assert any("HYBRID" in line for line in nf.leftovers(gw))
    finally:
        nf.remove(netns=gw)
    assert nf.leftovers(gw) == []
