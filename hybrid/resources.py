"""Files hybrid ships beside its code: the BPF sources (bpf/), the systemd unit (deploy/), the
example configuration and rules (examples/). An installed hybrid carries them as package data
(hybrid/bpf/, hybrid/deploy/, hybrid/examples/: pyproject.toml maps the checkout's top-level
folders there); an editable install or a source tree has them at the top of the checkout, beside
the package. This module is the one place that knows both."""

from __future__ import annotations

import os

PACKAGE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(PACKAGE)


def candidates(*parts: str) -> list[str]:
    """Where ``parts`` (e.g. "deploy", "hybrid.service") may be, in the order they are tried."""
    return [os.path.join(base, *parts) for base in (PACKAGE, CHECKOUT)]


def shipped(*parts: str) -> str:
    """The path of a shipped file or folder: the first candidate that exists, else where an
    installed hybrid would have it (so that an error names a useful path)."""
    found = candidates(*parts)
    return next((p for p in found if os.path.exists(p)), found[0])
