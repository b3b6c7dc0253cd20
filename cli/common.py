"""Helpers shared by the subcommand modules (kept out of main.py to avoid import cycles)."""

from __future__ import annotations

import click


class InputError(click.ClickException):
    """Bad input reported as one line with exit status 2 (a usage error, without the usage)."""

    exit_code = 2


def parse_int(value: str, what: str) -> int:
    """An integer in decimal or 0x-hex, or a one-line InputError."""
    try:
        return int(value, 0)
    except ValueError:
        raise InputError(f"{what} {value!r}: expected a number like 1048576 or 0x100000") from None


def parse_queues(value: str | None) -> tuple[int, int] | None:
    """``N`` or ``FIRST-LAST`` as a (first, last) pair, or a one-line InputError; None stays None."""
    if value is None:
        return None
    first, _, last = value.partition("-")
    try:
        a, b = int(first), int(last or first)
    except ValueError:
        raise InputError(f"--queues {value!r}: use N or FIRST-LAST, e.g. 0 or 0-1") from None
    if not 0 <= a <= b <= 65535:
        raise InputError(f"--queues {value!r}: need 0 <= FIRST <= LAST <= 65535")
    return a, b
