"""The network-namespace topology of one embedded cluster.

This module owns, for one cluster:

- the node namespace `<prefix><cluster>-node`, holding lo and the bridge
  `mgbr0`, whose address is the first host of the pod CIDR;
- one namespace per pod, `<prefix><cluster>-pod-<pod>`, linked to the bridge by
  a veth pair (node side `veth<offset of the pod IP, hex>`, a bridge port in
  hairpin mode; pod side `eth0`),
  with an address from the pod CIDR, a default route via the bridge, and, for a
  pod with a proxy of its own, the service CIDR made local (`mesh.redirect`);
  the node forwards between pods (its service proxy DNATs through it);
- the state directory `<state_dir>/network/`: a JSON record of everything
  created (written before it is created, atomically, under an fcntl lock), so
  that any process can add pods or tear the topology down, even after a crash;
  and each pod's resolv.conf.

Nothing is created in, or linked to, the host's own network namespace: veth
pairs are created inside the node namespace with their peer placed directly in
the pod namespace. `pod_command` runs a command inside a pod with the pod's
resolv.conf. The namespace and netlink primitives underneath (and
`socket_in_namespace`) are in localcluster.namespaces.

`up`, `add_pod`, `remove_pod` and `teardown` block (netlink, a file lock); from
asyncio code call them through `asyncio.to_thread`. `pod_command` is quick and
fine on the event loop.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from localcluster.namespaces import (
    NamespaceTakenError,
    TopologyError,
    create,
    delete,
    exists,
    iproute,
    link_index,
    namespace_path,
    require_off_event_loop,
    require_privileges,
    run_in_namespace,
    taken,
)
from mesh import redirect
from mesh.errors import ConfigError, MeshError

log = logging.getLogger(__name__)

BRIDGE = "mgbr0"
POD_IFNAME = "eth0"
DEFAULT_POD_CIDR = IPv4Network("10.244.0.0/16")
DEFAULT_SERVICE_CIDR = IPv4Network("10.96.0.0/16")
LOCK_TIMEOUT = 30.0
"""Seconds to wait for another process that is changing the same topology."""
_LOCK_POLL = 0.01

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_PREFIX = re.compile(r"[a-z0-9][-a-z0-9]{0,15}")


class PodCidrExhaustedError(TopologyError):
    """Every address of the pod CIDR is in use."""


@dataclass(frozen=True)
class ClusterNetwork:
    """What one cluster's topology should look like, and where its state lives."""

    name: str
    state_dir: Path
    pod_cidr: IPv4Network = DEFAULT_POD_CIDR
    service_cidr: IPv4Network = DEFAULT_SERVICE_CIDR
    dns: IPv4Address | None = None
    """The cluster DNS address pods' resolv.conf names; None: the node's bridge address."""
    cluster_domain: str = "cluster.local"
    netns_prefix: str = "mg-"
    """Start of every namespace name, so that installations and test runs stay apart."""

    def __post_init__(self) -> None:
        if not _LABEL.fullmatch(self.name):
            raise ConfigError(f"cluster name {self.name!r} must be a DNS label "
                              "(lower-case letters, digits and '-', at most 63)")
        if not _PREFIX.fullmatch(self.netns_prefix):
            raise ConfigError(f"namespace prefix {self.netns_prefix!r} must be 1-16 "
                              "lower-case letters, digits and '-'")
        if not 8 <= self.pod_cidr.prefixlen <= 30:
            raise ConfigError(f"pod CIDR {self.pod_cidr} must have a prefix length from "
                              "/8 to /30")
        if self.pod_cidr.overlaps(self.service_cidr):
            raise ConfigError(f"pod CIDR {self.pod_cidr} overlaps service CIDR "
                              f"{self.service_cidr}; choose ranges that do not overlap")
        if self.nameserver in self.service_cidr:
            # Pods make the whole service CIDR local (the proxy's redirected
            # listeners), so a query to an address in it would never leave the pod.
            raise ConfigError(f"DNS address {self.nameserver} is inside the service CIDR "
                              f"{self.service_cidr}, which pods treat as local; use the node's "
                              f"address {self.gateway.ip}")

    @property
    def node_netns(self) -> str:
        return f"{self.netns_prefix}{self.name}-node"

    def pod_netns(self, pod: str) -> str:
        return f"{self.netns_prefix}{self.name}-pod-{pod}"

    @property
    def gateway(self) -> IPv4Interface:
        """The bridge's address: the first host of the pod CIDR, the pods' default route."""
        return IPv4Interface(f"{self.pod_cidr.network_address + 1}/{self.pod_cidr.prefixlen}")

    @property
    def nameserver(self) -> IPv4Address:
        return self.dns if self.dns is not None else self.gateway.ip

    @classmethod
    def load(cls, state_dir: Path) -> ClusterNetwork:
        """The network recorded in `state_dir` by `up()`, for another process to use."""
        state = _load(_Paths(state_dir))
        if state is None:
            raise TopologyError(f"no cluster network is recorded in {state_dir}; run up() first")
        return state.spec.network(state_dir)


@dataclass(frozen=True)
class Node:
    """The node namespace: reaches every pod through the bridge; not linked to the host."""

    netns: str
    bridge: str
    address: IPv4Interface


@dataclass(frozen=True)
class Pod:
    name: str
    ip: IPv4Address
    netns: str
    resolv_conf: Path


# --- pure planning -----------------------------------------------------------------------


def next_free_address(cidr: IPv4Network, taken: set[IPv4Address]) -> IPv4Address:
    """The lowest address of `cidr` that is neither the bridge's, broadcast, nor taken."""
    gateway = cidr.network_address + 1
    for address in cidr.hosts():
        if address != gateway and address not in taken:
            return address
    raise PodCidrExhaustedError(f"pod CIDR {cidr} has no free address ({len(taken)} pods use "
                                "it); remove a pod or choose a larger pod CIDR")


def veth_name(cidr: IPv4Network, ip: IPv4Address) -> str:
    """The node-side veth of the pod at `ip`: unique per address, within IFNAMSIZ."""
    return f"veth{int(ip) - int(cidr.network_address):x}"


def bridge_mac(cluster: str) -> str:
    """A fixed, locally administered MAC for the bridge, so that it does not change
    (and stale the pods' ARP entry for the gateway) as ports come and go."""
    digest = hashlib.sha256(cluster.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def resolv_conf_text(net: ClusterNetwork) -> str:
    domain = net.cluster_domain
    return (f"# written by meshgate for cluster {net.name}\n"
            f"nameserver {net.nameserver}\n"
            f"search svc.{domain} {domain}\n"
            "options ndots:5\n")


_POD_SHELL = (
    'm=$1; r=$2; shift 2; '
    '"$m" --bind "$r" /etc/resolv.conf || '
    '{ echo "$0: cannot bind $r over /etc/resolv.conf" >&2; exit 125; }; '
    '"$m" -t sysfs sysfs /sys || '
    '{ echo "$0: cannot mount a sysfs of the pod on /sys" >&2; exit 125; }; '
    'exec "$@"'
)


def wrap_command(netns_path: Path, resolv_conf: Path, argv: Sequence[str], *,
                 unshare: str, nsenter: str, sh: str, mount: str) -> list[str]:
    """argv that runs `argv` in the network namespace at `netns_path`, in a private mount
    namespace where /etc/resolv.conf is `resolv_conf` and /sys shows that namespace."""
    if not argv:
        raise ConfigError("no command given to run in the pod")
    return [unshare, "--mount", "--propagation", "private", "--",
            nsenter, f"--net={netns_path}", "--",
            sh, "-c", _POD_SHELL, "meshgate-pod", mount, str(resolv_conf), *argv]


# --- state -------------------------------------------------------------------------------


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cluster: str
    netns_prefix: str
    pod_cidr: IPv4Network
    service_cidr: IPv4Network
    nameserver: IPv4Address
    cluster_domain: str

    @classmethod
    def of(cls, net: ClusterNetwork) -> _Spec:
        return cls(cluster=net.name, netns_prefix=net.netns_prefix, pod_cidr=net.pod_cidr,
                   service_cidr=net.service_cidr, nameserver=net.nameserver,
                   cluster_domain=net.cluster_domain)

    def network(self, state_dir: Path) -> ClusterNetwork:
        return ClusterNetwork(name=self.cluster, state_dir=state_dir, pod_cidr=self.pod_cidr,
                              service_cidr=self.service_cidr, dns=self.nameserver,
                              cluster_domain=self.cluster_domain,
                              netns_prefix=self.netns_prefix)


class _PodRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ip: IPv4Address
    netns: str
    veth: str


class _State(BaseModel):
    """Names are recorded before the object is created: a name here may not exist yet,
    but nothing of ours exists that is not named here."""

    model_config = ConfigDict(extra="forbid")

    spec: _Spec
    node_netns: str | None = None
    pods: dict[str, _PodRecord] = Field(default_factory=dict)


@dataclass(frozen=True)
class _Paths:
    state_dir: Path

    @property
    def root(self) -> Path:
        return self.state_dir / "network"

    @property
    def state(self) -> Path:
        return self.root / "topology.json"

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    @property
    def pods(self) -> Path:
        return self.root / "pods"

    def resolv(self, pod: str) -> Path:
        return self.pods / f"{pod}.resolv.conf"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _load(paths: _Paths) -> _State | None:
    try:
        text = paths.state.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return _State.model_validate_json(text)
    except ValidationError as e:
        raise TopologyError(f"{paths.state} is not a topology record ({e.error_count()} "
                            "errors); remove the namespaces it names by hand, then the "
                            "file") from None


def _save(paths: _Paths, state: _State) -> None:
    _write_atomic(paths.state, state.model_dump_json(indent=2) + "\n")


def _flock_within(fd: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / _LOCK_POLL) + 1):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(_LOCK_POLL)
    return False


@contextmanager
def _locked(paths: _Paths) -> Iterator[None]:
    """Serialises every change to one topology, across threads and processes."""
    paths.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if not _flock_within(fd, LOCK_TIMEOUT):
            raise TopologyError(f"another process has held {paths.lock} for "
                                f"{LOCK_TIMEOUT:.0f} s; wait for it to finish or stop it")
        yield
    finally:
        os.close(fd)


# --- namespaces and links ----------------------------------------------------------------


def _build_node(net: ClusterNetwork) -> None:
    gateway = net.gateway
    with iproute(net.node_netns, f"set up the bridge of cluster {net.name!r}") as ipr:
        ipr.link("set", index=link_index(ipr, "lo"), state="up")
        if link_index(ipr, BRIDGE) is None:
            ipr.link("add", ifname=BRIDGE, kind="bridge", address=bridge_mac(net.name))
        bridge = link_index(ipr, BRIDGE)
        present = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=bridge)}
        if str(gateway.ip) not in present:
            ipr.addr("add", index=bridge, address=str(gateway.ip),
                     prefixlen=net.pod_cidr.prefixlen)
        ipr.link("set", index=bridge, state="up")
    # Service traffic is DNATed on the node, then routed back onto the bridge.
    run_in_namespace(net.node_netns, _enable_forwarding)


def _enable_forwarding() -> None:
    # /proc/sys/net shows the network namespace of the thread that opens it.
    with open("/proc/sys/net/ipv4/ip_forward", "w", encoding="ascii") as f:
        f.write("1\n")


def _build_pod(net: ClusterNetwork, pod: str, record: _PodRecord, *,
               services_local: bool) -> None:
    with iproute(net.node_netns, f"link pod {pod!r} to the bridge") as node:
        stale = link_index(node, record.veth)
        if stale is not None:
            node.link("del", index=stale)
        # Created here with the peer placed straight into the pod: no end of the
        # pair ever exists in the host's namespace, even for a moment.
        # By descriptor, not name: pyroute2 looks names up in /var/run/netns only.
        target = os.open(namespace_path(record.netns), os.O_RDONLY | os.O_CLOEXEC)
        try:
            node.link("add", ifname=record.veth, kind="veth",
                      peer={"ifname": POD_IFNAME, "net_ns_fd": target})
        finally:
            os.close(target)
        node.link("set", index=link_index(node, record.veth),
                  master=link_index(node, BRIDGE), state="up")
        # Hairpin, as kube's kubelet sets it (hairpin-veth) and the CNI bridge plugin's
        # hairpinMode: a pod's connection to its own Service is DNATed back to it, and
        # where bridged traffic passes netfilter (br_netfilter) the frame leaves by
        # the port it came in on.
        node.brport("set", index=link_index(node, record.veth), mode=1)
    with iproute(record.netns, f"configure the network of pod {pod!r}") as ipr:
        ipr.link("set", index=link_index(ipr, "lo"), state="up")
        eth0 = link_index(ipr, POD_IFNAME)
        ipr.addr("add", index=eth0, address=str(record.ip), prefixlen=net.pod_cidr.prefixlen)
        ipr.link("set", index=eth0, state="up")
        ipr.route("replace", dst="0.0.0.0/0", gateway=str(net.gateway.ip))
    if services_local:
        redirect.ensure_local_route(net.service_cidr, netns=record.netns)


def _veth_present(node_netns: str | None, veth: str) -> bool:
    if node_netns is None or not exists(node_netns):
        return False
    with iproute(node_netns, f"look up {veth}") as ipr:
        return link_index(ipr, veth) is not None


def _remove_pod_parts(node_netns: str | None, pod: str, record: _PodRecord,
                      resolv: Path) -> None:
    """Removes whatever exists of one pod; raises one error naming every part left."""
    failures: list[str] = []
    if node_netns is not None and exists(node_netns):
        try:
            with iproute(node_netns, f"delete {record.veth} of pod {pod!r}") as ipr:
                index = link_index(ipr, record.veth)
                if index is not None:
                    ipr.link("del", index=index)
        except MeshError as e:
            failures.append(str(e))
    try:
        delete(record.netns)
    except MeshError as e:
        failures.append(str(e))
    resolv.unlink(missing_ok=True)
    if failures:
        raise TopologyError("; ".join(failures))


def _teardown(paths: _Paths, state: _State) -> None:
    failures: list[str] = []
    for pod, record in list(state.pods.items()):
        try:
            _remove_pod_parts(state.node_netns, pod, record, paths.resolv(pod))
            del state.pods[pod]
        except MeshError as e:
            failures.append(str(e))
    if state.node_netns is not None:
        try:
            delete(state.node_netns)
            state.node_netns = None
        except MeshError as e:
            failures.append(str(e))
    if failures:
        _save(paths, state)
        raise TopologyError(f"cluster {state.spec.cluster!r} was only partly torn down, run "
                            f"teardown again: {'; '.join(failures)}")
    paths.state.unlink(missing_ok=True)
    if paths.pods.is_dir() and not any(paths.pods.iterdir()):
        paths.pods.rmdir()
    log.info("network torn down cluster=%s", state.spec.cluster)


# --- public operations -------------------------------------------------------------------


def up(net: ClusterNetwork) -> Node:
    """Build (or converge) the node namespace and its bridge; drop pods whose namespace is
    gone and relink pods whose link is gone. On failure everything is torn down."""
    require_off_event_loop(f"bringing up the network of cluster {net.name!r}")
    require_privileges()
    paths = _Paths(net.state_dir)
    owner = f"cluster {net.name!r} (state in {paths.root})"
    with _locked(paths):
        state = _load(paths)
        if state is None:
            state = _State(spec=_Spec.of(net))
        elif state.spec != _Spec.of(net):
            raise _mismatch(paths, state)
        if state.node_netns is None and exists(net.node_netns):
            raise taken(net.node_netns, owner)
        try:
            if state.node_netns is None:
                state.node_netns = net.node_netns
                _save(paths, state)
            if not exists(net.node_netns):
                try:
                    create(net.node_netns, owner)
                except NamespaceTakenError:
                    state.node_netns = None
                    raise
            _build_node(net)
            _converge_pods(net, paths, state)
        except BaseException as e:
            _teardown_after(paths, state, e)
            raise
    log.info("node up cluster=%s netns=%s bridge=%s address=%s", net.name, net.node_netns,
             BRIDGE, net.gateway)
    return Node(netns=net.node_netns, bridge=BRIDGE, address=net.gateway)


def _converge_pods(net: ClusterNetwork, paths: _Paths, state: _State) -> None:
    for pod, record in list(state.pods.items()):
        if not exists(record.netns):
            _remove_pod_parts(state.node_netns, pod, record, paths.resolv(pod))
            del state.pods[pod]
            _save(paths, state)
            log.info("stale pod dropped cluster=%s pod=%s", net.name, pod)
        elif not _veth_present(state.node_netns, record.veth):
            # The pod's loopback, and a local service route on it, outlived the link.
            _build_pod(net, pod, record, services_local=False)
            log.info("pod relinked cluster=%s pod=%s ip=%s", net.name, pod, record.ip)


def _teardown_after(paths: _Paths, state: _State, cause: BaseException) -> None:
    try:
        _teardown(paths, state)
    except MeshError as e:
        cause.add_note(f"cleaning up after the failure also failed: {e}")


def add_pod(net: ClusterNetwork, pod: str, *, services_local: bool = True) -> Pod:
    """Create pod `pod`: its namespace, link, address, routes and resolv.conf. Adding a
    pod that is fully there returns it; on failure nothing of the pod is left.

    `services_local`: the service CIDR is made local in the pod, for a proxy in it to
    take; without, the pod reaches Services through the node's
    service proxy (localcluster.serviceproxy), as the kubelet's pods do."""
    if not _LABEL.fullmatch(pod):
        raise ConfigError(f"pod name {pod!r} must be a DNS label (lower-case letters, "
                          "digits and '-', at most 63)")
    require_off_event_loop(f"adding pod {pod!r}")
    require_privileges()
    paths = _Paths(net.state_dir)
    owner = f"cluster {net.name!r} (state in {paths.root})"
    with _locked(paths):
        state = _require_state(net, paths)
        record = state.pods.get(pod)
        if record is not None and exists(record.netns) and _veth_present(
                state.node_netns, record.veth):
            return _pod(paths, pod, record)
        remnant = record is not None
        if record is None:
            name = net.pod_netns(pod)
            if exists(name):
                raise taken(name, owner)
            ip = next_free_address(net.pod_cidr, {r.ip for r in state.pods.values()})
            record = _PodRecord(ip=ip, netns=name, veth=veth_name(net.pod_cidr, ip))
            state.pods[pod] = record
            _save(paths, state)
        try:
            if remnant:  # half of the pod survived a crash: rebuild it from nothing
                _remove_pod_parts(state.node_netns, pod, record, paths.resolv(pod))
            _write_atomic(paths.resolv(pod), resolv_conf_text(net))
            create(record.netns, owner)
            _build_pod(net, pod, record, services_local=services_local)
        except NamespaceTakenError:
            del state.pods[pod]
            _save(paths, state)
            raise
        except BaseException as e:
            try:
                _remove_pod_parts(state.node_netns, pod, record, paths.resolv(pod))
                del state.pods[pod]
                _save(paths, state)
            except MeshError as cleanup:
                e.add_note(f"cleaning up pod {pod!r} also failed: {cleanup}")
            raise
    log.info("pod added cluster=%s pod=%s ip=%s netns=%s", net.name, pod, record.ip,
             record.netns)
    return _pod(paths, pod, record)


def remove_pod(net: ClusterNetwork, pod: str) -> None:
    """Delete the pod's namespace and node-side veth and free its address; a pod that is
    not there counts as removed."""
    require_off_event_loop(f"removing pod {pod!r}")
    paths = _Paths(net.state_dir)
    if not paths.state.exists():
        return
    with _locked(paths):
        state = _load(paths)
        if state is None or pod not in state.pods:
            return
        require_privileges()
        _remove_pod_parts(state.node_netns, pod, state.pods[pod], paths.resolv(pod))
        del state.pods[pod]
        _save(paths, state)
    log.info("pod removed cluster=%s pod=%s", net.name, pod)


def list_pods(net: ClusterNetwork) -> list[Pod]:
    """The pods recorded for the cluster, by name."""
    paths = _Paths(net.state_dir)
    state = _load(paths)
    if state is None:
        return []
    return [_pod(paths, name, state.pods[name]) for name in sorted(state.pods)]


def teardown(state_dir: Path) -> None:
    """Remove every namespace, link and bridge recorded in `state_dir`, whoever created
    them; tolerates parts that are already gone. Nothing recorded: nothing to do."""
    require_off_event_loop("tearing down a cluster network")
    paths = _Paths(state_dir)
    if not paths.state.exists():
        return
    with _locked(paths):
        state = _load(paths)
        if state is None:
            return
        require_privileges()
        _teardown(paths, state)


def pod_command(net: ClusterNetwork, pod: str, argv: Sequence[str]) -> list[str]:
    """argv that runs `argv` inside the pod: its network namespace, and a private mount
    namespace where /etc/resolv.conf is the pod's (the host's file is never touched)."""
    paths = _Paths(net.state_dir)
    state = _load(paths)
    record = state.pods.get(pod) if state is not None else None
    if record is None or not exists(record.netns):
        raise TopologyError(f"cluster {net.name!r} has no pod {pod!r}; add it with add_pod()")
    tools: dict[str, str] = {}
    for tool in ("unshare", "nsenter", "sh", "mount"):
        found = shutil.which(tool)
        if found is None:
            raise TopologyError(f"running a command in a pod needs `{tool}` (util-linux) "
                                "on PATH; install it")
        tools[tool] = found
    return wrap_command(namespace_path(record.netns), paths.resolv(pod), argv,
                        unshare=tools["unshare"], nsenter=tools["nsenter"], sh=tools["sh"],
                        mount=tools["mount"])


def _require_state(net: ClusterNetwork, paths: _Paths) -> _State:
    state = _load(paths)
    if state is None or state.node_netns is None:
        raise TopologyError(f"the network of cluster {net.name!r} is not up (nothing in "
                            f"{paths.root}); call up() first")
    if state.spec != _Spec.of(net):
        raise _mismatch(paths, state)
    return state


def _mismatch(paths: _Paths, state: _State) -> ConfigError:
    spec = state.spec
    return ConfigError(f"{paths.state} records another network for cluster {spec.cluster!r} "
                       f"(pods {spec.pod_cidr}, services {spec.service_cidr}, namespaces "
                       f"{spec.netns_prefix}*); tear it down first, or use "
                       "ClusterNetwork.load() to get the recorded one")


def _pod(paths: _Paths, name: str, record: _PodRecord) -> Pod:
    return Pod(name=name, ip=record.ip, netns=record.netns, resolv_conf=paths.resolv(name))


# --- sockets in other namespaces ---------------------------------------------------------

