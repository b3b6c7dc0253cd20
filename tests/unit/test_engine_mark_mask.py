"""The engine and hybrid's own mark bits: a rules file whose mark touches them is refused at start
and at reload (the old rules stay), and a plugin's mark on them is not applied."""

import os

import pytest
from scapy.all import IP, UDP, Raw

from hybrid.engine.loop import Engine
from hybrid.engine.rules import RulesError

pytestmark = pytest.mark.unit
MASK = 0x100000
OURS = '[[rule]]\nname = "ours"\naction = "mark"\nmark = "0x100000/0x100000"\n'
LOW = '[[rule]]\nname = "low"\nproto = "udp"\naction = "mark"\nmark = "0x42/0xff"\n'
ERROR = ("mark '0x100000/0x100000': its mask 0x100000 overlaps hybrid's mark mask 0x100000, bits the engine owns "
         "(setting them would send the packet back to the queue for ever); use bits outside 0x100000")


class Queued:
    """NetfilterQueue's packet, as far as a mark verdict goes."""

    def __init__(self, payload: bytes, mark: int = MASK):
        self.payload, self.mark, self.indev = payload, mark, 1
        self.verdicts: list[str] = []
        self.new_mark = None

    def get_payload(self):
        return self.payload

    def get_mark(self):
        return self.mark

    def set_mark(self, m):
        self.new_mark = m

    def repeat(self):
        self.verdicts.append("repeat")


def udp() -> bytes:
    return bytes(IP(src="198.18.1.2", dst="198.18.2.2") / UDP(sport=5000, dport=10010) / Raw(b"x"))


def test_a_mark_on_hybrids_bits_is_refused_at_start(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(OURS)
    with pytest.raises(RulesError) as info:
        Engine(0, str(path), maps=None, mark_mask=MASK)
    assert str(info.value) == f"{path}:4: {ERROR}"
    Engine(0, str(path), maps=None, mark_mask=0x200000)       # another attachment's bits: fine


def test_reload_keeps_the_old_rules_when_a_mark_touches_hybrids_bits(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(LOW)
    e = Engine(0, str(path), maps=None, mark_mask=MASK)
    old = e.rules
    path.write_text(OURS)
    assert e.reload() is False
    assert e.rules is old
    assert e.stats.reload_errors == 1 and e.stats.last_reload_error == f"{path}:4: {ERROR}"
    p = Queued(udp())
    e._handle(p)
    assert p.verdicts == ["repeat"] and p.new_mark == 0x42       # the old rule, our bit cleared


def test_a_plugin_mark_on_hybrids_bits_is_not_applied(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    os.chmod(plugins, 0o755)
    (plugins / "m.py").write_text("from hybrid.plugin import Verdict\n"
                                  "def ours(p):\n    return Verdict('mark', mark=(0x100000, 0x100000))\n")
    os.chmod(plugins / "m.py", 0o644)
    path = tmp_path / "rules.toml"
    path.write_text('plugin_paths = ["plugins"]\n[[rule]]\nname = "plug"\nplugin = "m:ours"\n' + LOW)
    e = Engine(0, str(path), maps=None, mark_mask=MASK)
    p = Queued(udp())
    e._handle(p)
    assert p.verdicts == ["repeat"] and p.new_mark == 0x42       # the next rule decided, our bit cleared
    assert e.rules.plugin_errors == {"plug": 1} and e.stats.errors == 0
    assert e.rules.counters == {"plug": 0, "low": 1}
