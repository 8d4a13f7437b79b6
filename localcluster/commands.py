"""`meshgate cluster up | run-pod | exec | down`: a whole cluster on this machine;
`meshgate cluster vm create | exec | delete | list`: a VM beside it, on the WAN;
`meshgate cluster wan set | partition | heal | show`: the WAN's distances and partitions."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mesh import cliargs


def add_cluster_commands(commands: Any) -> None:
    """Add up, run-pod, exec and down to the `cluster` command's sub-commands."""
    up = commands.add_parser("up", help="start a cluster in network namespaces, in the "
                             "background")
    up.add_argument("--name", required=True)
    up.add_argument("--state-dir", required=True, type=Path)
    up.add_argument("--pod-cidr", default="10.244.0.0/16")
    up.add_argument("--service-cidr", default="10.96.0.0/16")
    up.add_argument("--cluster-domain", default="cluster.local")
    up.add_argument("--identity-dir", type=Path,
                    help="a trust anchor from `meshgate identity init`; the cluster gets its "
                    "own issuer under it (clusters that share an anchor trust each other)")
    up.add_argument("--trust-domain", default="cluster.local",
                    help="without --identity-dir: the trust domain of the cluster's own anchor")
    up.add_argument("--multicluster", action="store_true",
                    help="join the shared WAN and run the gateway and a mirror controller "
                    "per Link")
    up.add_argument("--wan", default="mg-wan",
                    help="with --multicluster: the WAN's network namespace (default mg-wan); "
                    "clusters on the same WAN reach each other's gateways")
    up.add_argument("--wan-cidr", help="with --multicluster: the WAN's range, when this "
                    "cluster creates the WAN (default 172.30.0.0/24)")
    up.add_argument("--workload-heartbeat", default="10s", type=_heartbeat,
                    help="how often VM agents report ready; a VM that misses 3 reports "
                    "leaves its Services' endpoints (default 10s)")
    up.add_argument("--wan-address", help="with --multicluster: this node's WAN address "
                    "(default: the lowest free one)")
    up.add_argument("--wan-delay", metavar="D", help="with --multicluster: netem delay on "
                    "the node's WAN link, each way (30ms, 1s; a round trip to another "
                    "member adds twice D); default none")
    up.add_argument("--wan-jitter", metavar="J", help="with --wan-delay: vary the delay by "
                    "up to ±J (2ms)")
    up.add_argument("--wan-loss", metavar="P%", help="with --multicluster: netem loss on "
                    "the node's WAN link, each way (0.5%%)")
    up.set_defaults(func=_up)

    pod = commands.add_parser("run-pod", help="run a command as a meshed pod, in the "
                              "foreground")
    pod.add_argument("--cluster", required=True)
    pod.add_argument("--namespace", default="default")
    pod.add_argument("--name", required=True)
    pod.add_argument("--service-account", default="default")
    pod.add_argument("--label", action="append", default=[], type=cliargs.label,
                     metavar="KEY=VALUE")
    pod.add_argument("--port", action="append", default=[], type=int,
                     help="a port the command listens on (the pod is ready when it answers)")
    pod.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG ...]")
    pod.set_defaults(func=_run_pod)

    run = commands.add_parser("exec", help="run a command on a cluster's node (its network "
                              "namespace, KUBECONFIG set to reach the API server from there), "
                              "where the cluster's controllers run", )
    run.add_argument("--name", required=True)
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG ...]")
    run.set_defaults(func=_exec)

    down = commands.add_parser("down", help="stop a cluster and remove its network")
    down.add_argument("--name", required=True)
    down.set_defaults(func=_down)

    _add_vm_commands(commands)
    _add_wan_commands(commands)


def _add_vm_commands(commands: Any) -> None:
    vm = commands.add_parser("vm", help="VMs on this machine, on a cluster WAN (network and "
                             "mount namespaces of their own), for mesh expansion")
    vm_cmds = vm.add_subparsers(dest="vm_command", required=True)
    create = vm_cmds.add_parser("create", help="create a VM on the WAN (and the WAN, if it "
                                "does not exist yet)")
    create.add_argument("--name", required=True)
    create.add_argument("--wan", default="mg-wan", help="the WAN's network namespace "
                        "(default mg-wan), as in `cluster up --multicluster --wan`")
    create.add_argument("--address", help="the VM's WAN address (default: the lowest free one)")
    create.add_argument("--wan-cidr", help="the WAN's range, when this VM creates the WAN "
                        "(default 172.30.0.0/24)")
    create.set_defaults(func=_vm_create)

    run = vm_cmds.add_parser("exec", help="run a command inside a VM (from /, with this "
                             "environment); exits with its status")
    run.add_argument("--name", required=True)
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG ...]")
    run.set_defaults(func=_vm_exec)

    delete = vm_cmds.add_parser("delete", help="stop everything in a VM and remove it "
                                "(a VM that is not there counts as deleted)")
    delete.add_argument("--name", required=True)
    delete.set_defaults(func=_vm_delete)

    listing = vm_cmds.add_parser("list", help="the VMs on this machine")
    listing.set_defaults(func=_vm_list)


def _add_wan_commands(commands: Any) -> None:
    link = commands.add_parser("wan", help="the WAN's members: netem delay, jitter and loss "
                               "on each one's link, and partitions")
    link_cmds = link.add_subparsers(dest="wan_command", required=True)
    change = _wan_parser(link_cmds, "set", "change a member's netem, on both ends of its "
                         "link (flags left out keep their value; 0 clears one)", _wan_set)
    change.add_argument("--delay", metavar="D", help="each way (30ms, 1s; 0: none; 0 also "
                        "clears the jitter)")
    change.add_argument("--jitter", metavar="J", help="vary the delay by up to ±J (2ms)")
    change.add_argument("--loss", metavar="P%", help="each way (0.5%%; 0: none)")
    _wan_parser(link_cmds, "partition", "cut a member off the WAN: its link goes down; "
                "packets vanish, nothing is reset", _wan_partition)
    _wan_parser(link_cmds, "heal", "put a partitioned member back on the WAN, with its "
                "netem", _wan_heal)
    _wan_parser(link_cmds, "show", "each member: address, netem, partitioned", _wan_show,
                member=False)


def _wan_parser(commands: Any, verb: str, what: str, func: Any, *,
                member: bool = True) -> Any:
    cmd = commands.add_parser(verb, help=what)
    if member:
        cmd.add_argument("--name", required=True, help="a cluster or VM on the WAN "
                         "(cluster/NAME or vm/NAME when both have the name)")
    cmd.add_argument("--wan", default="mg-wan", help="the WAN's network namespace (default "
                     "mg-wan)")
    cmd.set_defaults(func=func)
    return cmd


def _heartbeat(value: str) -> str:
    cliargs.duration(value)  # checked here, passed on as written
    return value


def _up(args: argparse.Namespace) -> int:
    from localcluster import rootless
    from localcluster.up import UpRequest, up
    from mesh.errors import ConfigError

    if not rootless.privileged():
        if args.multicluster:
            # Each rootless cluster lives in a user namespace of its own, from which
            # another cluster's namespaces, and so a shared WAN, cannot be entered.
            raise ConfigError("--multicluster needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN): "
                              "the clusters share a WAN namespace; run as root")
        rootless.start_keeper(args.name)
        code = rootless.run_inside(args.name, rootless.meshgate_argv(args.argv))
        if code != 0:
            rootless.stop_keeper(args.name)
        return code

    spec = up(UpRequest(name=args.name, state_dir=args.state_dir, pod_cidr=args.pod_cidr,
                        service_cidr=args.service_cidr, cluster_domain=args.cluster_domain,
                        identity_dir=args.identity_dir, trust_domain=args.trust_domain,
                        multicluster=args.multicluster, wan=args.wan, wan_cidr=args.wan_cidr,
                        wan_address=args.wan_address, wan_delay=args.wan_delay,
                        wan_jitter=args.wan_jitter, wan_loss=args.wan_loss,
                        workload_heartbeat=args.workload_heartbeat))
    print(f"cluster {spec.name} is up: node {spec.node_address} in network namespace "
          f"{spec.node_netns}, trust domain {spec.trust_domain}")
    print(f"kubeconfig: {spec.kubeconfig}")
    print(f"  kubectl --kubeconfig {spec.kubeconfig} get pods -A")
    print(f"control plane: meshgate's manifests, as Deployments: kubectl --kubeconfig "
          f"{spec.kubeconfig} -n meshgate get deploy")
    if spec.wan_address is not None:
        print(f"WAN {spec.wan}: {spec.wan_address} (API server :6443, control plane :8086, "
              "gateway :4143, probe :4191)")
        print(f"kubeconfig for VMs and other clusters: {spec.kubeconfig_wan}")
        print(f"link another cluster to this one: meshgate multicluster link --kubeconfig "
              f"{spec.kubeconfig} --cluster-name {spec.name} --api-server "
              f"https://{spec.wan_address}:6443 "
              f"--trust-domain {spec.trust_domain} | kubectl --kubeconfig OTHER apply -f -")
    print(f"run a pod: meshgate cluster run-pod --cluster {spec.name} --name NAME -- COMMAND")
    return 0


def _run_pod(args: argparse.Namespace) -> int:
    from localcluster import rootless
    from localcluster.pods import PodRequest, run_pod

    if not rootless.privileged():
        return rootless.run_inside(args.cluster, rootless.meshgate_argv(args.argv))

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    return run_pod(PodRequest(cluster=args.cluster, namespace=args.namespace, name=args.name,
                              service_account=args.service_account, command=tuple(command),
                              labels=tuple(args.label), ports=tuple(args.port)))


def _exec(args: argparse.Namespace) -> int:
    from localcluster import rootless
    from localcluster.up import node_exec
    from mesh.errors import ConfigError

    if not rootless.privileged():
        return rootless.run_inside(args.name, rootless.meshgate_argv(args.argv))
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ConfigError("cluster exec: give the command to run after --")
    return node_exec(args.name, command)


def _down(args: argparse.Namespace) -> int:
    from localcluster import rootless
    from localcluster.up import down

    if not rootless.privileged():
        code = rootless.run_inside(args.name, rootless.meshgate_argv(args.argv))
        if code == 0:
            rootless.stop_keeper(args.name)
        return code

    down(args.name)
    print(f"cluster {args.name} is down")
    return 0


def _vm_create(args: argparse.Namespace) -> int:
    import ipaddress

    from localcluster import vms
    from mesh.errors import ConfigError

    try:
        address = ipaddress.IPv4Address(args.address) if args.address else None
        cidr = ipaddress.IPv4Network(args.wan_cidr) if args.wan_cidr else None
    except ValueError as e:
        raise ConfigError(f"--address/--wan-cidr: {e}") from e
    vm = vms.create(args.name, wan=args.wan, address=address, wan_cidr=cidr)
    print(f"VM {vm.name} is up: {vm.address} on WAN {vm.wan}, network namespace {vm.netns}, "
          f"state in {vm.state_dir}")
    print(f"run a command in it: meshgate cluster vm exec --name {vm.name} -- COMMAND")
    return 0


def _vm_exec(args: argparse.Namespace) -> int:
    import os
    import sys

    from localcluster import vms
    from mesh.errors import ConfigError

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ConfigError("cluster vm exec: give the command to run after --")
    argv = vms.exec_argv(args.name, command)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)  # the command's status, signals and streams are its own


def _vm_delete(args: argparse.Namespace) -> int:
    from localcluster import vms

    vms.delete(args.name)
    print(f"VM {args.name} is deleted")
    return 0


def _vm_list(args: argparse.Namespace) -> int:
    from localcluster import vms

    for vm in vms.list_vms():
        print(f"{vm.name}\t{vm.address.ip}\t{vm.wan}\t{vm.netns}")
    return 0


def _wan_set(args: argparse.Namespace) -> int:
    from localcluster import wanlink
    from mesh.errors import ConfigError

    delay = jitter = loss = None
    if args.delay is not None:
        delay = wanlink.parse_duration_ms(args.delay, flag="--delay")
    if args.jitter is not None:
        jitter = wanlink.parse_duration_ms(args.jitter, flag="--jitter")
    if args.loss is not None:
        loss = wanlink.parse_loss_pct(args.loss, flag="--loss")
    if delay is None and jitter is None and loss is None:
        raise ConfigError("cluster wan set: give --delay, --jitter or --loss (0 clears one)")
    _print_members([wanlink.set_link(args.wan, args.name, delay_ms=delay, jitter_ms=jitter,
                                     loss_pct=loss)])
    return 0


def _wan_partition(args: argparse.Namespace) -> int:
    from localcluster import wanlink

    _print_members([wanlink.partition(args.wan, args.name)])
    return 0


def _wan_heal(args: argparse.Namespace) -> int:
    from localcluster import wanlink

    _print_members([wanlink.heal(args.wan, args.name)])
    return 0


def _wan_show(args: argparse.Namespace) -> int:
    from localcluster import wanlink

    _print_members(wanlink.show(args.wan))
    return 0


def _print_members(members: list[Any]) -> None:
    from localcluster import wanlink

    for m in members:
        print(f"{m.kind}\t{m.name}\t{m.address}\t{wanlink.describe(m.netem)}\t"
              f"{'partitioned' if m.partitioned else 'connected'}")
