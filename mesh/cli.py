"""The ``meshgate`` command: one entry point with a sub-command per capability.

Errors a person can fix (bad flags, unusable state directories, ports in use)
end the command with exit status 2 and one line saying what to change; they
never end in a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from localcluster.commands import add_cluster_commands
from mesh.check.commands import add_check_command
from mesh.errors import ConfigError, MeshError
from mesh.identity.commands import add_identity_commands
from mesh.injectcmd import add_inject_commands
from mesh.install import add_install_commands
from mesh.proxyinit import add_proxy_init_command
from mirror.commands import add_failover_commands, add_multicluster_commands
from vm_agent.commands import add_vm_commands

if TYPE_CHECKING:
    from mesh.control.run import ControlSettings


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = value, "0"
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: the port must be a number") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r}: the port must be 0-65535")
    return host, number


def _netns_listen(value: str) -> tuple[str, str, int]:
    netns, sep, address = value.partition("=")
    if not sep or not netns:
        raise argparse.ArgumentTypeError(f"{value!r} is not NETNS=HOST:PORT")
    host, port = _listen(address)
    return netns, host, port


def _duration(value: str) -> float:
    """An argparse type for a positive duration: 10s, 500ms, 2m, or plain seconds."""
    text = value.strip()
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if text.endswith(suffix):
            number, unit = text.removesuffix(suffix), scale
            break
    else:
        number, unit = text, 1.0
    try:
        seconds = float(number) * unit
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a duration such as 10s or "
                                         "500ms") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be longer than zero")
    return seconds


def _positive(number: type[int] | type[float]) -> Callable[[str], float]:
    """An argparse type for numbers above zero (whole numbers when ``number`` is int)."""

    def parse(value: str) -> float:
        try:
            n = number(value)
        except ValueError:
            what = "a whole number" if number is int else "a number"
            raise argparse.ArgumentTypeError(f"{value!r} is not {what}") from None
        if n <= 0:
            raise argparse.ArgumentTypeError(f"{value!r} must be greater than zero")
        return n

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshgate", description=(
        "Join Kubernetes clusters and VMs into one mutual-TLS service mesh."))
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True)

    cluster = commands.add_parser("cluster", help="the embedded Kubernetes-compatible cluster")
    cluster_cmds = cluster.add_subparsers(dest="cluster_command", required=True)
    serve = cluster_cmds.add_parser("serve", help="run an embedded cluster's API server in the "
                                    "foreground")
    serve.add_argument("--name", required=True, help="cluster name (kubeconfig context)")
    serve.add_argument("--state-dir", required=True, type=Path,
                       help="directory for the SQLite store, keys and kubeconfig")
    serve.add_argument("--listen", type=_listen, default=("127.0.0.1", 0),
                       help="HOST:PORT to serve on (default 127.0.0.1 and a free port)")
    serve.add_argument("--service-cidr", default="10.96.0.0/16",
                       help="range Service ClusterIPs are allocated from")
    serve.add_argument("--watch-history", type=_positive(int), default=10_000,
                       help="events kept for watches to resume from (older: 410 Gone)")
    serve.add_argument("--bookmark-interval", type=_positive(float), default=60.0,
                       help="seconds between watch bookmarks")
    serve.add_argument("--also-listen", type=_netns_listen, action="append", default=[],
                       metavar="NETNS=HOST:PORT",
                       help="also listen in that network namespace (repeatable)")
    serve.add_argument("--advertise-address", metavar="HOST",
                       help="the address other machines reach the API server at, published "
                       "in kube-public/cluster-info (default: the first --also-listen host)")
    serve.add_argument("--kubelet", action="store_true",
                       help="also run the node's kubelet, which runs Pods bound to it (needs "
                       "the network `cluster up` builds in the state directory)")
    serve.set_defaults(func=_cluster_serve)
    add_cluster_commands(cluster_cmds)
    add_identity_commands(commands)
    add_vm_commands(commands)
    add_multicluster_commands(commands)
    add_failover_commands(commands)
    add_install_commands(commands)
    add_check_command(commands)
    add_inject_commands(commands)

    proxy = commands.add_parser("proxy", help="the data-plane proxy")
    proxy_cmds = proxy.add_subparsers(dest="proxy_command", required=True)
    run = proxy_cmds.add_parser("run", help="run a proxy in the foreground")
    run.add_argument("--config", type=Path, help="YAML or JSON proxy config (default: the "
                     "MESHGATE_PROXY_* environment `meshgate inject` sets)")
    run.add_argument("--workers", type=_positive(int), default=1,
                     help="processes sharing the listeners (SO_REUSEPORT)")
    run.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop",
                     help="event loop: uvloop (measured about half the CPU per request) "
                     "or the standard library's")
    run.set_defaults(func=_proxy_run)
    add_proxy_init_command(proxy_cmds)

    control = commands.add_parser("control", help="the per-cluster control plane")
    control_cmds = control.add_subparsers(dest="control_command", required=True)
    crun = control_cmds.add_parser("run", help="serve identity and destination in the "
                                   "foreground")
    crun.add_argument("--kubeconfig", required=True, type=Path)
    crun.add_argument("--identity-dir", required=True, type=Path,
                      help="the issuer directory (`meshgate identity init --out`)")
    crun.add_argument("--trust-domain", required=True)
    crun.add_argument("--listen", type=_listen, action="append",
                      help="HOST:PORT of an mTLS listener; repeat it to listen on several "
                      "addresses, all serving the same (default 0.0.0.0:8086)")
    crun.add_argument("--cluster-domain", default="cluster.local",
                      help="the DNS domain of Service names (<svc>.<ns>.svc.<domain>)")
    crun.add_argument("--cluster-name", help="this cluster's name, for logs")
    crun.add_argument("--control-namespace", default="meshgate")
    crun.add_argument("--heartbeat", type=_positive(float), default=10.0,
                      help="seconds of silence after which a destination watch gets a "
                      "heartbeat")
    crun.add_argument("--workload-heartbeat", type=_duration, default=10.0,
                      help="how often ExternalWorkloads heartbeat their Ready condition, "
                      "as 10s, 500ms or seconds (default 10s)")
    crun.add_argument("--workload-missed-heartbeats", type=_positive(int), default=3,
                      help="heartbeats an ExternalWorkload may miss before its endpoints "
                      "are not ready (default 3)")
    crun.add_argument("--injector-listen", type=_listen,
                      help="HOST:PORT where to serve the proxy injector webhook (HTTPS, "
                      "/inject), e.g. 0.0.0.0:8443")
    crun.add_argument("--service-cidr", action="append", default=[], metavar="CIDR[,CIDR]",
                      help="the service CIDRs the injector makes local in pods (default: "
                      "the cluster's ServiceCIDRs or meshgate-config)")
    crun.set_defaults(func=_control_run)

    gateway = commands.add_parser("gateway", help="the multicluster gateway")
    gateway_cmds = gateway.add_subparsers(dest="gateway_command", required=True)
    grun = gateway_cmds.add_parser("run", help="run a gateway in the foreground")
    grun.add_argument("--config", required=True, type=Path, help="YAML or JSON gateway config")
    grun.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop",
                      help="event loop, as for `meshgate proxy run`")
    grun.set_defaults(func=_gateway_run)

    mirror = commands.add_parser("mirror", help="the service-mirror controller")
    mirror_cmds = mirror.add_subparsers(dest="mirror_command", required=True)
    mrun = mirror_cmds.add_parser("run", help="mirror the Services a Link selects in its "
                                  "linked cluster, in the foreground")
    mrun.add_argument("--kubeconfig", required=True, type=Path,
                      help="kubeconfig of the local (importing) cluster")
    mrun.add_argument("--link", required=True, help="the name of the Link to serve")
    mrun.add_argument("--namespace", default="meshgate",
                      help="namespace of the Link, its credentials Secret and its Lease")
    mrun.add_argument("--metrics-listen", type=_listen, default=("127.0.0.1", 9999),
                      help="HOST:PORT for /metrics and /ready (default 127.0.0.1:9999)")
    mrun.add_argument("--resync", type=_positive(float), default=60.0,
                      help="seconds between full resyncs and orphan collections")
    mrun.add_argument("--lease-duration", type=_positive(float), default=15.0,
                      help="seconds without renewal after which a standby takes over")
    mrun.add_argument("--lease-renew", type=_positive(float), default=5.0,
                      help="seconds between Lease renewals (and a standby's looks)")
    mrun.add_argument("--identity", help="this instance's name in the Lease "
                      "(default hostname_pid)")
    mrun.set_defaults(func=_mirror_run)
    return parser


def _proxy_run(args: argparse.Namespace) -> int:
    from mesh.config import ProxyConfig, load_model
    from mesh.proxy.main import run

    if args.config is None:
        from mesh.proxy.envconfig import proxy_config, write_trust_bundle

        config, anchors = proxy_config(os.environ)
        write_trust_bundle(config, anchors)
    else:
        config = load_model(args.config, ProxyConfig, what="proxy config")
    run(config, workers=int(args.workers), loop=args.loop)
    return 0


def _control_run(args: argparse.Namespace) -> int:
    from mesh.control.run import run

    run(control_settings(args))
    return 0


def control_settings(args: argparse.Namespace) -> ControlSettings:
    """The settings ``control run`` was given (every --listen, or 0.0.0.0:8086)."""
    from mesh.control.run import ControlSettings

    return ControlSettings(kubeconfig=args.kubeconfig, identity_dir=args.identity_dir,
                           trust_domain=args.trust_domain,
                           listen=tuple(args.listen or [("0.0.0.0", 8086)]),
                           cluster_domain=args.cluster_domain, cluster_name=args.cluster_name,
                           control_ns=args.control_namespace, heartbeat=args.heartbeat,
                           workload_heartbeat=args.workload_heartbeat,
                           workload_missed_heartbeats=int(args.workload_missed_heartbeats),
                           injector_listen=args.injector_listen,
                           service_cidrs=tuple(c.strip() for v in args.service_cidr
                                               for c in v.split(",") if c.strip()))


def _gateway_run(args: argparse.Namespace) -> int:
    from gateway.main import run
    from mesh.config import GatewayConfig, load_model

    run(load_model(args.config, GatewayConfig, what="gateway config"), loop=args.loop)
    return 0


def _mirror_run(args: argparse.Namespace) -> int:
    from mirror.run import MirrorSettings, run

    if args.lease_renew >= args.lease_duration:
        raise ConfigError(f"--lease-renew ({args.lease_renew:g}s) must be shorter than "
                          f"--lease-duration ({args.lease_duration:g}s)")
    run(MirrorSettings(kubeconfig=args.kubeconfig, link=args.link, namespace=args.namespace,
                       metrics_listen=args.metrics_listen, resync=args.resync,
                       lease_duration=args.lease_duration, lease_renew=args.lease_renew,
                       identity=args.identity))
    return 0


def _cluster_serve(args: argparse.Namespace) -> int:
    from localcluster.server import ClusterConfig, ClusterServer

    host, port = args.listen
    config = ClusterConfig(name=args.name, state_dir=args.state_dir, host=host, port=port,
                           service_cidr=args.service_cidr, watch_history=args.watch_history,
                           bookmark_interval=args.bookmark_interval,
                           also_listen=tuple(args.also_listen), kubelet=args.kubelet,
                           advertise=args.advertise_address)

    async def run() -> None:
        server = ClusterServer(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await server.start()
        except BaseException:
            await server.stop()
            raise
        print(f"cluster {config.name} serving at {server.url}", flush=True)
        print(f"kubeconfig: {server.kubeconfig}", flush=True)
        try:
            await stop.wait()
        finally:
            await server.stop()

    asyncio.run(run())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        return int(args.func(args))
    except MeshError as e:
        print(f"meshgate: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
