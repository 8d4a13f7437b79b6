"""Running ``meshgate check``: connect, read what the checks look at, and print each
result as ``linkerd check`` does (or the JSON document at the end)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

from mesh.check import control, dataplane, kubeapi, pre, render
from mesh.check.names import CONTROL_DEPLOYMENT
from mesh.check.results import Got, Result, Step, run, succeeded
from mesh.image import VERSION


def check(args: argparse.Namespace) -> int:
    """Exit status 1 when a check failed, else 0."""
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
        yield from pre.version_checks(conn.version, kubeapi.served(conn),
                                      pre.required_apis(pre.rendered()))
        state.append(kubeapi.read_control(conn, expected))
        yield from control.checks(state[0], expected, now=datetime.now(UTC))

    def data_plane() -> Iterator[Result]:
        pods, namespace = kubeapi.read_pods(conn, args.namespace)
        deployed = control.deployment_version(
            state[0].deployments.get(CONTROL_DEPLOYMENT, Got())) if state else None
        yield from dataplane.checks(pods, control_version=deployed or VERSION,
                                    namespace=args.namespace, namespace_got=namespace)

    return [control_plane, *([data_plane] if args.proxy else [])]
