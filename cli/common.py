"""What the subcommand modules share (kept out of main.py to avoid import cycles)."""

from __future__ import annotations

import click


class InputError(click.ClickException):
    """Bad input reported as one line with exit status 2 (a usage error, without the usage)."""

    exit_code = 2
