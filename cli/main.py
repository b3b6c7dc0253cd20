"""hybridctl: entry point. Subcommands live in sibling modules and register here."""

from __future__ import annotations

import click

from hybrid import __version__

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "HYBRIDCTL"}


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="hybridctl")
def main() -> None:
    """hybrid: XDP/tc classification in front of a Python NFQUEUE verdict engine."""
