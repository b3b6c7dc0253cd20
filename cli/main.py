"""hybridctl: entry point. Subcommands live in sibling modules and register at the bottom.

Errors are turned into output in exactly one place, :class:`HybridGroup`: bad input
(:class:`~hybrid.errors.ConfigError`) exits 2, every other library error exits 1, each as one
line; never a traceback.
"""

from __future__ import annotations

import logging
import sys

import click

from hybrid import __version__
from hybrid.errors import ConfigError, HybridError

from .common import InputError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "HYBRIDCTL",
                    "max_content_width": 100}


class HybridGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            raise InputError(str(exc)) from None
        except HybridError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


def _usage_error_one_line(self: click.UsageError, file=None) -> None:
    """Bad usage (an unknown option, a value of the wrong type, a missing argument) is one line
    that says what to fix and where the help is, instead of click's usage block."""
    hint = f" (see '{self.ctx.command_path} --help')" if self.ctx is not None else ""
    click.echo(f"Error: {self.format_message()}{hint}", err=True, file=file)


click.UsageError.show = _usage_error_one_line   # every UsageError click raises, in every subcommand


@click.group(cls=HybridGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="hybridctl")
@click.option("-v", "--verbose", count=True, help="Log what is done (-vv: every command run).")
def main(verbose: int) -> None:
    """hybrid: XDP/tc classification in front of a Python NFQUEUE verdict engine.

    BPF programs classify every packet in the kernel and mark only those that need a userspace
    decision (new connections, the first payload packets of each flow, watched ports and
    prefixes, odd TCP flags); iptables queues the marked ones to the engine; everything else
    never leaves the kernel.

    \b
    Start here:
      hybridctl doctor            check this machine
      hybridctl demo              lab + hybrid + traffic, then clean up
      hybridctl attach eth0 eth1  attach to a gateway's interfaces
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


from .bench import bench  # noqa: E402
from .datapath import attach, detach, status  # noqa: E402
from .demo import demo  # noqa: E402
from .doctor import doctor  # noqa: E402
from .engine import engine  # noqa: E402
from .lab import lab  # noqa: E402
from .rules import rules  # noqa: E402

for _cmd in (doctor, lab, attach, detach, status, demo, bench, engine, rules):
    main.add_command(_cmd)

from .config import config  # noqa: E402

main.add_command(config)
from .run import run  # noqa: E402

main.add_command(run)
from .flows import block, bypass, flows, unblock  # noqa: E402

for _cmd in (flows, block, bypass, unblock):
    main.add_command(_cmd)
from .top import top  # noqa: E402

main.add_command(top)
from .namecache import name_cache  # noqa: E402

main.add_command(name_cache)
from .service import install_service  # noqa: E402

main.add_command(install_service)
from .replay import replay  # noqa: E402

main.add_command(replay)


if __name__ == "__main__":
    main()
