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
