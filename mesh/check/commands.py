"""``meshgate check [--pre] [--proxy]``: the checks for the cluster of a kubeconfig,
printed as ``linkerd check`` prints them; exit status 1 when one failed (warnings
do not fail), 2 for flags that do not go together."""

from __future__ import annotations

import argparse
from pathlib import Path

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
    # Imported here: it loads the kubernetes client, which `meshgate proxy` must not.
    from mesh.check.main import check

    return check(args)
