"""``hybridctl doctor``: the prerequisite checks of :mod:`hybrid.doctor`, one line each."""

from __future__ import annotations

import os
import signal
import sys

import click

from hybrid.observe import doctor as lib

LABELS = {lib.OK: ("ok", "green"), lib.WARN: ("warn", "yellow"), lib.FAIL: ("FAIL", "red")}
NAME_WIDTH = max(len(name) for name, _req, _fn in lib.CHECKS)


def format_check(check: lib.Check, color: bool = False) -> str:
    """One report line: ``<status> <name> <detail>[ -> fix: <fix>]``. Optional checks that fail
    say so, because they do not change the exit code."""
    label, fg = LABELS.get(check.status, (check.status, None))
    status = f"{label:<5}"
    if color and fg:
        status = click.style(status, fg=fg, bold=check.status == lib.FAIL)
    line = f"{status} {check.name:<{NAME_WIDTH}}  {check.detail}"
    if check.status != lib.OK and not check.required:
        line += " (optional)"
    if check.status != lib.OK and check.fix:
        line += f" -> fix: {check.fix}"
    return line


def summary(checks: list[lib.Check]) -> str:
    failed = [c.name for c in checks if c.blocking]
    warned = sum(c.status != lib.OK and not c.blocking for c in checks)
    if failed:
        return f"doctor: {len(failed)} required check(s) failed: {', '.join(failed)}"
    return f"doctor: all required checks passed ({warned} warning(s))"


def _terminate_handler(main_pid: int):
    def terminate(signum, _frame):
        # SystemExit unwinds through the checks' finally blocks, so the throwaway namespace goes
        # too. A forked child (pyroute2 forks to open a socket in a namespace and stops it with
        # SIGTERM) inherits this handler: it must vanish at once, never unwind the copied stack.
        if os.getpid() != main_pid:
            os._exit(128 + signum)
        sys.exit(128 + signum)
    return terminate


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON document.")
def doctor(as_json: bool) -> None:
    """Check every prerequisite and say how to fix what is missing.

    Runs as root. Compiles and loads a tiny program with bcc, attaches it (XDP native and
    generic, tc clsact) to a veth inside a throwaway network namespace that is deleted
    afterwards, tries the NFQUEUE and mark rules there, and looks for the bpffs and the tools.
    Nothing outside that namespace is changed.

    Exit status 0 when every required check passes (warnings don't count), 1 otherwise.

    \b
    Examples:
      sudo .venv/bin/hybridctl doctor
      sudo .venv/bin/hybridctl doctor --json | jq '.checks[] | select(.status != "ok")'
    """
    old = signal.signal(signal.SIGTERM, _terminate_handler(os.getpid()))
    try:
        color = not as_json and sys.stdout.isatty()
        on_result = None if as_json else (lambda c: click.echo(format_check(c, color=color)))
        checks = lib.run_checks(on_result=on_result)
    finally:
        signal.signal(signal.SIGTERM, old)
    if as_json:
        click.echo(lib.report_json(checks))
    else:
        click.echo(summary(checks))
    if not lib.all_passed(checks):
        sys.exit(1)
