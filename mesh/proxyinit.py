"""``meshgate proxy init``: what the injected ``meshgate-init`` container does.

It makes the cluster's service CIDRs local in the pod's own network namespace with
an AnyIP route (mesh.redirect.ensure_local_route), so that the proxy's redirected
listeners receive every connection to a Service address, with no iptables; ports
skipped with ``--skip-outbound-ports`` (annotation ``config.meshgate.io/
skip-outbound-ports``) leave by the main routing table instead. That
needs CAP_NET_ADMIN in the pod's namespace and nothing else; without it the command
says so in one line and exits 1, as the container's status then shows. Running it
again changes nothing.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import TYPE_CHECKING

from mesh.errors import NetlinkError
from mesh.portlist import port_ranges

if TYPE_CHECKING:  # pyroute2 is loaded by the command only, not by every `meshgate`
    from mesh.redirect import Network

NO_CAPABILITY = ("the meshgate-init container needs the NET_ADMIN capability "
                 "(securityContext.capabilities.add: [NET_ADMIN]); a policy may have "
                 "removed it")


def add_proxy_init_command(proxy_cmds: argparse._SubParsersAction[argparse.ArgumentParser]
                           ) -> None:
    init = proxy_cmds.add_parser(
        "init", help="make the service CIDRs local in this network namespace (the "
        "meshgate-init container)",
        description="Add an AnyIP route for each service CIDR to this network namespace's "
        "local table, so the proxy receives connections to Service addresses. Needs "
        "NET_ADMIN; idempotent.")
    init.add_argument("--service-cidr", action="append", required=True,
                      metavar="CIDR[,CIDR]", help="the cluster's service CIDR(s)")
    init.add_argument("--skip-outbound-ports", default="", metavar="PORT[,LOW-HIGH]",
                      help="TCP ports of the service CIDRs whose connections go out by the "
                      "main routing table instead of to the proxy")
    init.set_defaults(func=_init)


def parse_cidrs(values: list[str]) -> list[Network]:
    out: list[Network] = []
    for value in values:
        for part in (p.strip() for p in value.split(",")):
            if not part:
                continue
            try:
                out.append(ipaddress.ip_network(part))
            except ValueError as e:
                raise NetlinkError(f"--service-cidr {part!r} is not a CIDR such as "
                                   f"10.96.0.0/16: {e}") from None
    return out


def parse_ports(value: str) -> list[tuple[int, int]]:
    """``6379,8000-8099`` -> [(6379, 6379), (8000, 8099)]."""
    try:
        return port_ranges(value)
    except ValueError as e:
        raise NetlinkError(f"--skip-outbound-ports: {e}") from None


def _init(args: argparse.Namespace) -> int:
    from mesh.redirect import ensure_local_route, ensure_port_bypass

    try:
        cidrs = parse_cidrs(args.service_cidr)
        skipped = parse_ports(args.skip_outbound_ports)
        for cidr in cidrs:
            ensure_local_route(cidr)
            print(f"meshgate-init: {cidr} is local (AnyIP route on lo)", flush=True)
            if skipped:
                ensure_port_bypass(cidr, skipped)
                print(f"meshgate-init: TCP ports {args.skip_outbound_ports} of {cidr} go "
                      "past the proxy", flush=True)
    except NetlinkError as e:
        message = str(e)
        if "Operation not permitted" in message or "CAP_NET_ADMIN" in message:
            message = f"{message.split(' (needs CAP_NET_ADMIN')[0]}: {NO_CAPABILITY}"
        print(f"meshgate proxy init: {message}", file=sys.stderr)
        return 1
    return 0
