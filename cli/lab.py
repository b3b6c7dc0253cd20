"""hybridctl lab: the three-namespace testbed (client -- gateway -- server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import click

from hybrid.errors import HybridError
from hybrid.lab import topology as labmod

NAME_OPT = click.option("--name", default="hlab", show_default=True, metavar="NAME",
                        help="Lab name: prefix of its namespaces NAME-client, NAME-gw, NAME-server.")


@click.group()
def lab() -> None:
    """A client -- gateway -- server testbed in network namespaces.

    Addresses come from the benchmarking ranges 198.18.0.0/15 and 2001:2::/48; the gateway
    forwards between client and server; no namespace has a default route, so no traffic leaves
    the lab.

    \b
    Example:
      hybridctl lab up
      hybridctl lab exec client -- ping -c1 198.18.2.2
      hybridctl lab exec gw -- hybridctl attach to-client to-server
      hybridctl lab down
    """


@lab.command()
@NAME_OPT
@click.option("--kind", type=click.Choice(labmod.KINDS), default="router", show_default=True,
              help="router: the gateway routes between two subnets; bridge: the gateway bridges its two "
                   "ports (br0), client and server share one subnet, nothing is routed.")
@click.option("--json", "as_json", is_flag=True, help="Print the layout as JSON.")
def up(name: str, kind: str, as_json: bool) -> None:
    """Create the lab's namespaces, veth pairs, addresses and routes (or bridge)."""
    info = labmod.Lab(name, kind).up()
    if as_json:
        click.echo(json.dumps(_layout(info), indent=1))
        return
    for h in (info.client, info.gw_client, info.gw_server, info.server):
        where = h.ipv4 or f"port of {info.bridge}"
        click.echo(f"{h.netns:<22} {h.ifname:<10} {where:<12} {h.ipv6}")
    click.echo(f"lab {name} ({kind}) is up; check it with: hybridctl lab status --name {name}")


@lab.command()
@NAME_OPT
@click.option("--all", "all_", is_flag=True, help="Remove every lab this machine has a record of.")
def down(name: str, all_: bool) -> None:
    """Remove the lab (its namespaces, and everything inside them). Idempotent."""
    names = labmod.recorded_labs() if all_ else [name]
    for n in names:
        removed = labmod.Lab(n).down()
        click.echo(f"lab {n}: removed {', '.join(removed)}" if removed else f"lab {n}: nothing to remove")


@lab.command()
@NAME_OPT
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Ping the server from the client through the gateway (IPv4 and IPv6).")
def status(name: str, as_json: bool, check: bool) -> None:
    """Show whether the lab exists and whether traffic crosses the gateway."""
    lb = labmod.Lab(name)
    st = lb.status()
    if check and st["up"]:
        st["client_to_server_ipv4"] = lb.ping("client", lb.info.server.ipv4)
        st["client_to_server_ipv6"] = lb.ping("client", lb.info.server.ipv6)
    if as_json:
        click.echo(json.dumps(st, indent=1))
    else:
        click.echo(f"lab {name}: {'up' if st['up'] else 'down'}")
        for ns, present in st["namespaces"].items():
            click.echo(f"  {ns:<22} {'present' if present else 'missing'}")
        for fam in ("ipv4", "ipv6"):
            key = f"client_to_server_{fam}"
            if key in st:
                click.echo(f"  client -> server over {fam}: {'ok' if st[key] else 'FAILED'}")
    if st["up"] and check and not (st.get("client_to_server_ipv4") and st.get("client_to_server_ipv6")):
        raise HybridError(f"lab {name} is up but the client cannot reach the server: "
                          f"check 'hybridctl lab exec gw -- iptables -L -v' and 'ip route' in each namespace")


@lab.command(name="exec", context_settings={"ignore_unknown_options": True})
@NAME_OPT
@click.argument("role", type=click.Choice(labmod.ROLES))
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(name: str, role: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside the lab's ROLE namespace (client, gw or server)."""
    lb = labmod.Lab(name)
    ns = lb.netns(role)
    if ns not in labmod.existing_netns():
        raise HybridError(f"lab {name} is not up: run 'hybridctl lab up --name {name}'")
    env = dict(os.environ)
    # So that "hybridctl" inside the namespace is this installation (the venv's bin directory).
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(["ip", "netns", "exec", ns, *command], env=env)
    raise SystemExit(proc.returncode)


def _layout(info: labmod.LabInfo) -> dict:
    from dataclasses import asdict
    return asdict(info)
