"""What a rules plugin imports: the one name of hybrid's plugin interface, kept at this path
whatever else moves. A plugin is ``MODULE:FUNCTION`` in a rules file's ``plugin`` key, loaded
from the directories the file names in ``plugin_paths``; the function takes the decoded packet
(hybrid.engine.packet.Packet) and returns a :class:`Verdict` or None. See examples/plugins/."""

from __future__ import annotations

from typing import NamedTuple


class Verdict(NamedTuple):
    """What a plugin returns when its rule matches (return None when it does not).

    Fields left None take the rule's own value (its ``action``, ``flow``, ``ttl``, ...), so a
    plugin can say as little as ``Verdict("drop")``. ``mark`` is ``(value, mask)`` or an int (mask
    0xffffffff); ``rewrite`` is a Decision-style tuple."""

    action: str | None = None
    flow: str | None = None
    ttl: int | None = None
    mark: tuple[int, int] | int | None = None
    rewrite: tuple | None = None
    reject_with: str | None = None
    log: bool | None = None
