"""``meshgate check [--pre] [--proxy]``: the checks for the cluster of a kubeconfig,
printed as ``linkerd check`` prints them; exit status 1 when one failed (warnings
do not fail), 2 for flags that do not go together."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from mesh.check import control, dataplane, kubeapi, pre, render
from mesh.check.results import Got, Result, Step, run, succeeded
from mesh.errors import ConfigError


def add_check_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = commands.add_parser(
        "check", help="check a cluster before (--pre) or after meshgate install",
        description="Check that meshgate can be installed on a cluster (--pre), or that its "
        "installation is healthy (and with --proxy, its meshed pods). Each failure names "
        "its cause and a fix; the exit status is 1 when a check failed.")
    check.add_argument("--pre", action="store_true",
                       help="check that `meshgate install` can succeed: Kubernetes version, "
                       "the APIs it serves, and that you may create every object")
    check.add_argument("--proxy", action="store_true",
                       help="also check every meshed pod's proxy: ready and of the control "
                       "plane's version")
    check.add_argument("-n", "--namespace",
                       help="with --proxy: only the pods of this namespace (default: all)")
    check.add_argument("-o", "--output", choices=["table", "json"], default="table",
                       help="table (default) or json, as linkerd check -o json")
    check.add_argument("--kubeconfig", type=Path,
                       help="the cluster's kubeconfig (default: $KUBECONFIG or "
                       "~/.kube/config)")
    check.add_argument("--context", help="the kubeconfig context (default: its current one)")
    check.add_argument("--as", dest="as_user", metavar="USER",
                       help="check as this user (impersonation, as kubectl --as)")
    check.add_argument("--as-group", metavar="GROUP",
                       help="with --as: a group to impersonate (as kubectl --as-group)")
    check.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    if args.pre and args.proxy:
        raise ConfigError("--pre and --proxy go apart: --pre checks a cluster before "
                          "install, --proxy the meshed pods after it")
    if args.namespace is not None and not args.proxy:
        raise ConfigError("--namespace narrows the checks of --proxy; give --proxy too")
    if args.as_group is not None and args.as_user is None:
        raise ConfigError("--as-group needs --as USER: a group is impersonated with a user")
    if args.output == "json":
        results = list(run_checks(args))
        sys.stdout.write(render.as_json(results))
        return 0 if succeeded(results) else 1
    table = render.Table()
    for result in run_checks(args):
        sys.stdout.write(table.add(result))
        sys.stdout.flush()
    sys.stdout.write(table.end())
    return 0 if succeeded(table.done) else 1


def run_checks(args: argparse.Namespace) -> Iterator[Result]:
    connected, conn = kubeapi.connect(args.kubeconfig, args.context, as_user=args.as_user,
                                      as_group=args.as_group)
    yield from connected
    if conn is None:
        return
    try:
        yield from run(_steps(conn, args))
    finally:
        conn.close()


def _steps(conn: kubeapi.Connection, args: argparse.Namespace) -> list[Step]:
    if args.pre:
        return [lambda: pre.checks(kubeapi.read_pre(conn, pre.rendered()))]
    expected = control.Expected.rendered()
    state: list[control.ControlState] = []

    def control_plane() -> Iterator[Result]:
        version = list(pre.version_checks(conn.version, kubeapi.served(conn),
                                          pre.required_apis(pre.rendered())))
        yield from version
        state.append(kubeapi.read_control(conn, expected))
        yield from control.checks(state[0], expected, now=datetime.now(UTC))

    def data_plane() -> Iterator[Result]:
        pods, namespace = kubeapi.read_pods(conn, args.namespace)
        deployed = control.deployment_version(
            state[0].deployments.get(control.CONTROL_DEPLOYMENT, Got())
        ) if state else None
        yield from dataplane.checks(pods, control_version=deployed or control.VERSION,
                                    namespace=args.namespace, namespace_got=namespace)

    return [control_plane, *([data_plane] if args.proxy else [])]

