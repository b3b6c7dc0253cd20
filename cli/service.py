"""hybridctl install-service: the systemd unit, the example configuration and rules."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess

import click

from hybrid.engine import runner
from hybrid.errors import HybridError
from hybrid.resources import shipped
from hybrid.service.config import DEFAULT_PATH

from .common import InputError

UNIT_SOURCE = shipped("deploy", "hybrid.service")
EXAMPLE_CONFIG = shipped("examples", "hybrid.toml")
EXAMPLE_RULES = shipped("examples", "rules")
UNIT_PATH = "/etc/systemd/system/hybrid.service"
TEMPLATE_EXE = "/usr/local/bin/hybridctl"


def hybridctl_path() -> str:
    """The hybridctl the unit should start: this installation's console script (the venv's)."""
    argv = runner.hybridctl_argv()
    if len(argv) == 1:
        return argv[0]
    found = shutil.which("hybridctl")
    if found is None:
        raise HybridError("cannot find the hybridctl executable: install hybrid (scripts/setup.sh) first")
    return os.path.abspath(found)


def render_unit(exe: str) -> str:
    with open(UNIT_SOURCE) as f:
        text = f.read()
    if f"ExecStart={TEMPLATE_EXE} " not in text:
        raise HybridError(f"{UNIT_SOURCE}: no 'ExecStart={TEMPLATE_EXE} ...' line to fill in")
    return text.replace(f"ExecStart={TEMPLATE_EXE} ", f"ExecStart={exe} ")


def _under(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def _install_file(src: str | None, text: str | None, dest: str, force: bool, mode: int) -> str:
    """Write one file; returns what was done. Configuration is never overwritten without force."""
    if os.path.exists(dest):
        if src:
            same = filecmp.cmp(src, dest, shallow=False)
        else:
            with open(dest) as f:
                same = f.read() == text
        if same:
            return "unchanged"
        if not force:
            return "kept (exists and differs; --force replaces it)"
    os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
    tmp = dest + ".hybrid-new"
    if src:
        shutil.copyfile(src, tmp)
    else:
        with open(tmp, "w") as f:
            f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, dest)
    return "written"


@click.command("install-service", short_help="Install the systemd unit and an example configuration.")
@click.option("--root", default="/", show_default=True, type=click.Path(file_okay=False),
              help="Install below this directory instead of / (for packaging and tests).")
@click.option("--force", is_flag=True, help="Replace an existing configuration and rules files too.")
def install_service(root: str, force: bool) -> None:
    """Install the systemd unit (/etc/systemd/system/hybrid.service), the example configuration
    (/etc/hybrid/hybrid.toml) and the example rules (/etc/hybrid/rules/).

    The unit starts this installation's hybridctl. The unit file is always brought up to date;
    an existing configuration or rules file is never replaced without --force. Nothing is
    enabled or started: edit the configuration first (at least the interfaces).

    \b
    Then:
      hybridctl config check
      systemctl enable --now hybrid
      journalctl -u hybrid -o cat -f
    """
    root = os.path.abspath(root)
    if root == "/" and os.geteuid() != 0:
        raise InputError("install-service writes to /etc: run it as root (or give --root DIR)")
    for src in (UNIT_SOURCE, EXAMPLE_CONFIG, EXAMPLE_RULES):
        if not os.path.exists(src):
            raise HybridError(f"{src} is missing: this hybrid installation is incomplete; reinstall it")
    exe = hybridctl_path()
    conf_dir = os.path.dirname(DEFAULT_PATH)
    done = [(UNIT_PATH, _install_file(None, render_unit(exe), _under(root, UNIT_PATH), True, 0o644)),
            (DEFAULT_PATH, _install_file(EXAMPLE_CONFIG, None, _under(root, DEFAULT_PATH), force, 0o600))]
    for name in sorted(os.listdir(EXAMPLE_RULES)):
        if name.endswith(".toml"):
            dest = os.path.join(conf_dir, "rules", name)
            done.append((dest, _install_file(os.path.join(EXAMPLE_RULES, name), None, _under(root, dest), force,
                                             0o600)))
    os.chmod(_under(root, conf_dir), 0o700)
    for path, what in done:
        click.echo(f"{_under(root, path)}: {what}")
    if exe.startswith(("/home/", "/root/")):
        click.echo(f"warning: the unit starts {exe}, but ProtectHome=yes hides /home and /root from the "
                   "service: install hybrid elsewhere (e.g. /opt/hybrid)", err=True)
    if root == "/" and os.path.isdir("/run/systemd/system"):
        proc = subprocess.run(["systemctl", "daemon-reload"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise HybridError(f"systemctl daemon-reload failed: {proc.stderr.strip()}")
        click.echo("systemd reloaded")
    click.echo(f"next: edit {DEFAULT_PATH} (interfaces), hybridctl config check, systemctl enable --now hybrid")
