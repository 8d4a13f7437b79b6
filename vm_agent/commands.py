"""The ``meshgate vm`` commands: `token` on the operator's machine; `join`, `run`,
`status` and `leave` on the VM."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Any

from mesh import cliargs
from vm_agent import DEFAULT_STATE_DIR


def _address(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not ADDR:PORT, such as 172.30.0.2:4143")
    return value


def _port(value: str) -> tuple[str, int]:
    name, sep, number = value.partition(":")
    if not sep or not name or not number.isdigit() or not 1 <= int(number) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not NAME:PORT, such as http:8080")
    return name, int(number)


def add_vm_commands(commands: Any) -> None:
    vm = commands.add_parser("vm", help="VM mesh expansion")
    sub = vm.add_subparsers(dest="vm_command", required=True)

    tok = sub.add_parser("token", help="prepare one VM's ExternalWorkload and credential and "
                         "mint its single-use join token")
    tok.add_argument("--kubeconfig", required=True, type=Path)
    tok.add_argument("--namespace", required=True)
    tok.add_argument("--workload", required=True, help="the ExternalWorkload's name")
    tok.add_argument("--service-account", required=True, help="the identity the VM runs as")
    tok.add_argument("--ttl", type=cliargs.duration, default=dt.timedelta(hours=1))
    tok.add_argument("--label", type=cliargs.label, action="append", default=[],
                     help="KEY=VALUE on the ExternalWorkload, for Service selectors "
                     "(repeatable)")
    tok.add_argument("--port", type=_port, action="append", default=[],
                     help="NAME:PORT the VM's application serves (repeatable)")
    tok.add_argument("--control-plane", required=True,
                     help="https://HOST:PORT of the control plane as the VM reaches it")
    tok.add_argument("--gateway", type=_address,
                     help="ADDR:PORT of this cluster's gateway as the VM reaches it")
    tok.add_argument("--api-server", help="https://HOST:PORT of the API server as the VM "
                     "reaches it (default: the kubeconfig's)")
    tok.add_argument("--trust-domain", help="default: the control plane's published one")
    tok.add_argument("--trust-anchor-out", type=Path,
                     help="write the cluster's trust bundle here, for the VM")
    tok.add_argument("--control-namespace", default="meshgate")
    tok.set_defaults(func=_token)

    join = sub.add_parser("join", help="enroll this VM and run its agent")
    join.add_argument("--token", required=True)
    join.add_argument("--control-plane", required=True, help="https://HOST:PORT")
    join.add_argument("--trust-anchor", required=True, type=Path)
    join.add_argument("--gateway", type=_address,
                      help="ADDR:PORT of the home cluster's gateway (reaching its pods)")
    join.add_argument("--gateway-identity", help="default: meshgate-gateway of the control "
                      "namespace")
    join.add_argument("--address", help="the VM's address callers dial (default: the one "
                      "on the route to the control plane)")
    join.add_argument("--cluster-domain", default="cluster.local")
    join.add_argument("--dns-address", default="127.0.0.153",
                      help="loopback address the mesh DNS answers on")
    join.add_argument("--timeout", type=cliargs.seconds, default=120.0,
                      help="how long to retry an unreachable control plane")
    _common(join)
    join.add_argument("--foreground", action="store_true",
                      help="run the agent in this terminal instead of as a systemd unit")
    join.set_defaults(func=_lifecycle("join"))

    run = sub.add_parser("run", help="run the agent of a VM that joined (the systemd unit)")
    _common(run)
    run.set_defaults(func=_lifecycle("run"))

    st = sub.add_parser("status", help="identity, registration, routes, DNS and proxy health")
    st.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    st.set_defaults(func=_status)

    leave = sub.add_parser("leave", help="undo everything join did")
    leave.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    leave.set_defaults(func=_lifecycle("leave"))


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    parser.add_argument("--heartbeat", type=cliargs.seconds, default=10.0,
                        help="how often the agent reports the VM ready")


def _lifecycle(name: str) -> Any:
    def call(args: argparse.Namespace) -> int:
        from vm_agent import lifecycle

        return int(getattr(lifecycle, name)(args))
    return call


def _status(args: argparse.Namespace) -> int:
    from vm_agent.status import status

    return status(args)


def _token(args: argparse.Namespace) -> int:
    from vm_agent import token

    return token.run(args)
