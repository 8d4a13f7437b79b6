"""The WAN that linked clusters on this machine share.

One network namespace (default ``mg-wan``) holds a bridge, ``mgwan0``, and
nothing else: it is the wire between clusters, not a host. Each cluster started
with ``cluster up --multicluster`` joins it with a veth pair whose node side,
``wan0``, carries the cluster's WAN address. The cluster's API server and its
gateway listen on that address; clusters reach each other only there.

Pod networks are not routed on the WAN. A pod reaches another cluster's
gateway through its node, which forwards to the WAN and masquerades the pod's
address to its own WAN address (the WAN has no route back to any pod CIDR).
Traffic from the WAN into pods is dropped unless it answers a connection a
pod opened, or the node's service proxy (localcluster.kubeproxy) DNATed it to a
LoadBalancer's or NodePort's endpoint. Both rules are one nftables table,
``ip meshgate``, in the node namespace, loaded atomically with ``nft -f``; the
service proxy writes its own table beside it.

VMs (localcluster.vms) join the same bridge with a veth whose VM side is
``eth0``; they get an address from the same range and no other route, so they
reach clusters only at the nodes' WAN addresses.

The WAN is recorded in ``$MESHGATE_RUN_DIR/wan/<name>/wan.json`` (under an
fcntl lock): its address range and the clusters and VMs attached, with their
addresses, so that no two members ever get the same one, and each member's
link shape (netem delay, jitter and loss, and whether it is partitioned; applied
by localcluster.wanlink, which also changes them). The namespace is created by
the first member that joins (cluster or VM) and removed when the last one leaves.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pyroute2.netlink.exceptions import NetlinkError as PyrouteNetlinkError

from localcluster import namespaces
from localcluster.rootless import run_dir
from mesh.errors import ConfigError, MeshError

log = logging.getLogger(__name__)

DEFAULT_WAN = "mg-wan"
DEFAULT_WAN_CIDR = IPv4Network("172.30.0.0/24")
BRIDGE = "mgwan0"
NODE_IFNAME = "wan0"
VM_IFNAME = "eth0"
NFT_TABLE = "meshgate"
LOCK_TIMEOUT = 30.0
_NAME = re.compile(r"[a-z0-9][-a-z0-9]{0,31}")


class WanError(namespaces.TopologyError):
    """The WAN cannot be joined, left or used as asked."""


class WanAddressInUseError(WanError):
    """The WAN address asked for belongs to another member (a cluster or a VM)."""


@dataclass(frozen=True)
class Attachment:
    """How one cluster's node sits on the WAN."""

    wan: str
    address: IPv4Interface
    node_ifname: str = NODE_IFNAME


class Netem(BaseModel):
    """The netem settings of a member's link, in each direction; all zero: no qdisc.
    localcluster.wanlink parses, validates and applies them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    delay_ms: float = Field(0.0, ge=0)
    jitter_ms: float = Field(0.0, ge=0)
    loss_pct: float = Field(0.0, ge=0, le=100)

    @property
    def empty(self) -> bool:
        return not (self.delay_ms or self.jitter_ms or self.loss_pct)


class _Member(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: IPv4Address
    node_netns: str
    """The member's network namespace: a cluster's node, or a VM."""
    peer: str
    """The WAN side of the veth pair, on the WAN's bridge."""
    netem: Netem = Field(default_factory=Netem)
    partitioned: bool = False
    """Cut off the WAN: its peer is down, so packets vanish as in a real partition."""


class _Wan(BaseModel):
    """Members are recorded before their link is made: a member here may lack its link,
    but no link of ours exists that is not recorded."""

    model_config = ConfigDict(extra="forbid")

    netns: str
    cidr: IPv4Network
    members: dict[str, _Member] = Field(default_factory=dict)
    """Clusters, by name."""
    vms: dict[str, _Member] = Field(default_factory=dict)
    """VMs, by name (a VM may have a cluster's name)."""

    def holders(self) -> dict[IPv4Address, str]:
        """Every address in use, and who holds it: "cluster 'east'", "VM 'db'"."""
        taken = {m.address: f"cluster {name!r}" for name, m in self.members.items()}
        taken.update({m.address: f"VM {name!r}" for name, m in self.vms.items()})
        return taken


# --- pure planning -----------------------------------------------------------------------


def peer_name(cidr: IPv4Network, address: IPv4Address) -> str:
    """The WAN-side veth of the node at `address`: unique per address, within IFNAMSIZ."""
    return f"wan{int(address) - int(cidr.network_address):x}"


def choose_address(cidr: IPv4Network, taken: dict[IPv4Address, str],
                   wanted: IPv4Address | None) -> IPv4Address:
    """`wanted` if it is free and in `cidr`, else the lowest free host address. `taken`
    maps each address in use to its holder, as the error names it ("cluster 'east'")."""
    if wanted is not None:
        if wanted not in cidr or wanted in (cidr.network_address, cidr.broadcast_address):
            raise ConfigError(f"WAN address {wanted} is not a host address of the WAN "
                              f"{cidr}; choose one inside it")
        if wanted in taken:
            raise WanAddressInUseError(f"WAN address {wanted} is in use by {taken[wanted]}; "
                                       "choose another address (--wan-address of a cluster, "
                                       "--address of a VM) or leave it out to get a free one")
        return wanted
    for address in cidr.hosts():
        if address not in taken:
            return address
    raise WanError(f"the WAN {cidr} has no free address ({len(taken)} clusters and VMs use "
                   "it); take a cluster down or delete a VM, or start the WAN again with a "
                   "larger --wan-cidr")


def check_ranges(wan: IPv4Network, *, pod_cidr: IPv4Network,
                 service_cidr: IPv4Network) -> None:
    """A WAN range that overlaps the cluster's own would shadow its pods or services."""
    for what, cidr in (("pod", pod_cidr), ("service", service_cidr)):
        if wan.overlaps(cidr):
            raise ConfigError(f"the WAN {wan} overlaps the {what} CIDR {cidr}; choose "
                              "ranges that do not overlap (--wan-cidr)")


def nft_ruleset(pod_cidr: IPv4Network) -> str:
    """The node's rules: masquerade pods to the WAN, keep the WAN out of pods.

    Declaring then deleting the table makes one `nft -f` transaction that replaces
    whatever an earlier `up` loaded, or creates it the first time."""
    return (f"table ip {NFT_TABLE} {{}}\n"
            f"delete table ip {NFT_TABLE}\n"
            f"table ip {NFT_TABLE} {{\n"
            "  chain postrouting {\n"
            "    type nat hook postrouting priority srcnat; policy accept;\n"
            f"    ip saddr {pod_cidr} oifname \"{NODE_IFNAME}\" masquerade\n"
            "  }\n"
            "  chain forward {\n"
            "    type filter hook forward priority filter; policy accept;\n"
            f"    iifname \"{NODE_IFNAME}\" ct state established,related accept\n"
            # A LoadBalancer's ingress: the node's service proxy DNATed it to a pod.
            f"    iifname \"{NODE_IFNAME}\" ct status dnat accept\n"
            f"    iifname \"{NODE_IFNAME}\" drop\n"
            "  }\n"
            "}\n")


# --- state -------------------------------------------------------------------------------


def check_name(wan: str) -> str:
    """`wan`, if it can name a network namespace and a directory and leave neither."""
    if not _NAME.fullmatch(wan):
        raise ConfigError(f"WAN name {wan!r} must be 1-32 lower-case letters, digits and '-'")
    return wan


def _root(wan: str) -> Path:
    return run_dir() / "wan" / check_name(wan)


def _state_path(wan: str) -> Path:
    return _root(wan) / "wan.json"


def _load(wan: str) -> _Wan | None:
    path = _state_path(wan)
    try:
        return _Wan.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValidationError as e:
        raise WanError(f"{path} is not a WAN record ({e.error_count()} errors); delete the "
                       f"namespace `ip netns delete {wan}`, then the file") from None


def _save(wan: str, state: _Wan) -> None:
    path = _state_path(wan)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(state.model_dump_json(indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@contextmanager
def _locked(wan: str) -> Iterator[None]:
    """Serialises every change to one WAN, across the clusters and VMs that share it."""
    with namespaces.locked(_root(wan) / "lock", timeout=LOCK_TIMEOUT):
        yield


@dataclass(frozen=True)
class MemberRef:
    """One member of a WAN as its link is changed: a cluster or a VM, and its link."""

    kind: str
    """"cluster" or "vm"."""
    name: str
    address: IPv4Address
    node_netns: str
    node_ifname: str
    peer: str
    netem: Netem
    partitioned: bool

    @property
    def holder(self) -> str:
        return f"{'VM' if self.kind == 'vm' else 'cluster'} {self.name!r}"


def _refs(state: _Wan) -> list[MemberRef]:
    return [MemberRef(kind=kind, name=name, address=m.address, node_netns=m.node_netns,
                      node_ifname=ifname, peer=m.peer, netem=m.netem,
                      partitioned=m.partitioned)
            for kind, group, ifname in (("cluster", state.members, NODE_IFNAME),
                                        ("vm", state.vms, VM_IFNAME))
            for name, m in sorted(group.items())]


def member_refs(wan: str = DEFAULT_WAN) -> list[MemberRef]:
    """Every member of `wan`, clusters then VMs, each by name; none if there is no WAN."""
    state = _load(wan)
    return [] if state is None else _refs(state)


@dataclass(frozen=True)
class WanEdit:
    """A WAN held under its lock: its namespace, its members, and `record(ref)`, which
    writes one member's netem and partition back to the WAN's record at once."""

    netns: str
    members: list[MemberRef]
    record: Callable[[MemberRef], None]


@contextmanager
def editing(wan: str) -> Iterator[WanEdit]:
    """The WAN `wan`, held under its lock for changes to its members' links. A WAN that
    is not there is a WanError."""
    missing = WanError(f"there is no WAN {wan!r} (no {_state_path(wan)}); start a cluster "
                       "with `cluster up --multicluster` or a VM on it first")
    if not _state_path(wan).exists():
        raise missing
    with _locked(wan):
        state = _load(wan)
        if state is None:
            raise missing

        def record(ref: MemberRef) -> None:
            group = state.vms if ref.kind == "vm" else state.members
            group[ref.name] = group[ref.name].model_copy(
                update={"netem": ref.netem, "partitioned": ref.partitioned})
            _save(wan, state)

        yield WanEdit(netns=state.netns, members=_refs(state), record=record)


# --- netlink, sysctl and nftables ----------------------------------------------------------


def _load_or_new(wan: str, cidr: IPv4Network | None) -> _Wan:
    """The WAN's record, or a new one over `cidr` for a WAN not made yet; under the lock."""
    state = _load(wan)
    if state is None:
        if namespaces.exists(wan):
            raise namespaces.taken(wan, f"the WAN recorded in {_root(wan)}")
        return _Wan(netns=wan, cidr=cidr or DEFAULT_WAN_CIDR)
    if cidr is not None and cidr != state.cidr:
        raise ConfigError(f"the WAN {wan!r} is {state.cidr}, not {cidr}; leave out "
                          "--wan-cidr or use another --wan")
    return state


def _build_wan(name: str) -> None:
    """The WAN's namespace, its loopback and its bridge, each made if missing."""
    if not namespaces.exists(name):
        namespaces.create(name, f"the WAN recorded in {_root(name)}")
    with namespaces.iproute(name, f"set up the WAN bridge in {name!r}") as ipr:
        ipr.link("set", index=namespaces.link_index(ipr, "lo"), state="up")
        if namespaces.link_index(ipr, BRIDGE) is None:
            ipr.link("add", ifname=BRIDGE, kind="bridge")
        ipr.link("set", index=namespaces.link_index(ipr, BRIDGE), state="up")


def _link_node(wan: _Wan, holder: str, member: _Member, ifname: str = NODE_IFNAME) -> None:
    """The veth pair between the member (`holder`: "cluster 'east'", "VM 'db'") and the
    WAN bridge, and the member's WAN address on its side, `ifname`."""
    address = IPv4Interface(f"{member.address}/{wan.cidr.prefixlen}")
    with namespaces.iproute(member.node_netns, f"link {holder} to the WAN") as node:
        if namespaces.link_index(node, ifname) is None:
            with namespaces.iproute(wan.netns, "look up the WAN side") as w:
                stale = namespaces.link_index(w, member.peer)
                if stale is not None:
                    w.link("del", index=stale)
            # Made in the node with its peer placed straight into the WAN, as pods
            # are: no end of the pair is ever in the host's namespace.
            target = os.open(namespaces.namespace_path(wan.netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                node.link("add", ifname=ifname, kind="veth",
                          peer={"ifname": member.peer, "net_ns_fd": target})
            finally:
                os.close(target)
        index = namespaces.link_index(node, ifname)
        present = {a.get_attr("IFA_ADDRESS") for a in node.get_addr(index=index)}
        if str(member.address) not in present:
            node.addr("add", index=index, address=str(address.ip),
                      prefixlen=address.network.prefixlen)
        node.link("set", index=index, state="up")
    with namespaces.iproute(wan.netns, f"attach {holder} to the WAN bridge") as w:
        # A partitioned member's link is made again partitioned: `up` after a crash
        # must not heal it, even for a moment.
        w.link("set", index=namespaces.link_index(w, member.peer),
               master=namespaces.link_index(w, BRIDGE),
               state="down" if member.partitioned else "up")


def _enable_forwarding(node_netns: str) -> None:
    """net.ipv4.ip_forward=1 in the node only: /proc/sys/net shows the network
    namespace of the thread that opens it, so a thread that entered the node writes it."""

    def write() -> None:
        with open("/proc/sys/net/ipv4/ip_forward", "w", encoding="ascii") as f:
            f.write("1\n")

    try:
        namespaces.run_in_namespace(node_netns, write)
    except namespaces.TopologyError:
        raise
    except Exception as e:
        raise WanError(f"cannot enable forwarding in {node_netns!r}: {e}") from e


def _load_rules(node_netns: str, pod_cidr: IPv4Network) -> None:
    nft = shutil.which("nft")
    nsenter = shutil.which("nsenter")
    if nft is None:
        raise WanError("--multicluster needs `nft` (Debian package nftables) to masquerade "
                       "pods to the WAN; install it (`make tools` does)")
    if nsenter is None:
        raise WanError("--multicluster needs `nsenter` (util-linux) on PATH; install it")
    proc = subprocess.run([nsenter, f"--net={namespaces.namespace_path(node_netns)}", "--", nft,
                           "-f", "-"], input=nft_ruleset(pod_cidr), capture_output=True,
                          text=True, timeout=30, check=False)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raise WanError(f"nft refused the rules for {node_netns!r}: "
                       f"{lines[0] if lines else f'exit status {proc.returncode}'}")


def _delete_peer(wan: _Wan, member: _Member) -> None:
    if not namespaces.exists(wan.netns):
        return
    with namespaces.iproute(wan.netns, f"delete {member.peer} from the WAN") as w:
        index = namespaces.link_index(w, member.peer)
        if index is None:
            return
        try:
            w.link("del", index=index)
        except PyrouteNetlinkError as e:
            # A veth goes with its pair: deleting the member's namespace (`cluster down`
            # removes the node's before leaving the WAN) takes the WAN side too, a moment
            # later, so the peer can vanish between the lookup and the delete.
            if e.code != errno.ENODEV:
                raise


# --- public operations -------------------------------------------------------------------


def attach(cluster: str, *, node_netns: str, pod_cidr: IPv4Network,
           service_cidr: IPv4Network, wan: str = DEFAULT_WAN,
           cidr: IPv4Network | None = None, address: IPv4Address | None = None) -> Attachment:
    """Join `cluster`'s node to the WAN `wan`, creating the WAN if it is absent. A
    cluster already attached keeps its address, and whatever of its link is gone is
    made again. On failure the cluster is left off the WAN."""
    namespaces.require_off_event_loop(f"attaching cluster {cluster!r} to the WAN")
    namespaces.require_privileges()
    with _locked(wan):
        state = _load_or_new(wan, cidr)
        check_ranges(state.cidr, pod_cidr=pod_cidr, service_cidr=service_cidr)
        _drop_stale(wan, state, keep=cluster)
        member = state.members.get(cluster)
        if member is not None and address is not None and member.address != address:
            raise ConfigError(f"cluster {cluster!r} is on the WAN at {member.address}, not "
                              f"{address}; take it down to change its address")
        if member is None:
            chosen = choose_address(state.cidr, state.holders(), address)
            member = _Member(address=chosen, node_netns=node_netns,
                             peer=peer_name(state.cidr, chosen))
            state.members[cluster] = member
        _save(wan, state)
        try:
            _build_wan(wan)
            _link_node(state, f"cluster {cluster!r}", member)
            _enable_forwarding(node_netns)
            _load_rules(node_netns, pod_cidr)
        except BaseException as e:
            try:
                _leave(wan, state, cluster)
            except MeshError as cleanup:
                e.add_note(f"taking cluster {cluster!r} off the WAN also failed: {cleanup}")
            raise
    log.info("wan attached cluster=%s wan=%s address=%s", cluster, wan, member.address)
    return Attachment(wan=wan, address=IPv4Interface(f"{member.address}/{state.cidr.prefixlen}"))


def _drop_stale(wan: str, state: _Wan, *, keep: str = "", keep_vm: str = "") -> None:
    """Forget members whose namespace is gone (a cluster removed without `down`, a VM
    whose namespace was deleted by hand, or a reboot), so their addresses are free again.
    A member joining always has its namespace already, so none that is still coming up
    is taken for stale."""
    for kind, group, kept in (("cluster", state.members, keep), ("vm", state.vms, keep_vm)):
        for name, member in list(group.items()):
            if name != kept and not namespaces.exists(member.node_netns):
                _delete_peer(state, member)
                del group[name]
                log.info("wan stale member dropped wan=%s %s=%s address=%s", wan, kind, name,
                         member.address)


def detach(cluster: str, *, wan: str = DEFAULT_WAN) -> None:
    """Take `cluster` off the WAN; the last cluster to leave removes the WAN. A cluster
    that is not on it counts as detached."""
    namespaces.require_off_event_loop(f"detaching cluster {cluster!r} from the WAN")
    if not _state_path(wan).exists():
        return
    with _locked(wan):
        state = _load(wan)
        if state is None or cluster not in state.members:
            return
        namespaces.require_privileges()
        _leave(wan, state, cluster)
    log.info("wan detached cluster=%s wan=%s", cluster, wan)


def _leave(wan: str, state: _Wan, name: str, *, vm: bool = False) -> None:
    group = state.vms if vm else state.members
    member = group.get(name)
    if member is not None:
        _delete_peer(state, member)
        del group[name]
    if state.members or state.vms:
        _save(wan, state)
        return
    namespaces.delete(wan)
    _state_path(wan).unlink(missing_ok=True)
    log.info("wan removed wan=%s", wan)


def members(wan: str = DEFAULT_WAN) -> dict[str, IPv4Address]:
    """The clusters on the WAN and their addresses."""
    state = _load(wan)
    return {} if state is None else {n: m.address for n, m in state.members.items()}


def vms(wan: str = DEFAULT_WAN) -> dict[str, IPv4Address]:
    """The VMs on the WAN and their addresses."""
    state = _load(wan)
    return {} if state is None else {n: m.address for n, m in state.vms.items()}


def join_vm(vm: str, *, netns: str, wan: str = DEFAULT_WAN, cidr: IPv4Network | None = None,
            address: IPv4Address | None = None) -> Attachment:
    """Link VM `vm`, whose network namespace `netns` exists, to the WAN `wan` (created
    as the first cluster would create it, if absent), at `address` or the lowest free
    one. The VM's side is ``eth0``, with no route beyond the WAN's range. A VM already on
    the WAN keeps its address. On failure the VM is left off the WAN."""
    namespaces.require_off_event_loop(f"attaching VM {vm!r} to the WAN")
    namespaces.require_privileges()
    with _locked(wan):
        state = _load_or_new(wan, cidr)
        _drop_stale(wan, state, keep_vm=vm)
        member = state.vms.get(vm)
        if member is not None and (member.node_netns != netns or
                                   (address is not None and member.address != address)):
            raise ConfigError(f"VM {vm!r} is on the WAN {wan!r} at {member.address} from "
                              f"{member.node_netns!r}; delete it first to change it")
        if member is None:
            chosen = choose_address(state.cidr, state.holders(), address)
            member = _Member(address=chosen, node_netns=netns,
                             peer=peer_name(state.cidr, chosen))
            state.vms[vm] = member
        _save(wan, state)
        try:
            _build_wan(wan)
            _link_node(state, f"VM {vm!r}", member, VM_IFNAME)
        except BaseException as e:
            try:
                _leave(wan, state, vm, vm=True)
            except MeshError as cleanup:
                e.add_note(f"taking VM {vm!r} off the WAN also failed: {cleanup}")
            raise
    log.info("wan attached vm=%s wan=%s address=%s", vm, wan, member.address)
    return Attachment(wan=wan, address=IPv4Interface(f"{member.address}/{state.cidr.prefixlen}"),
                      node_ifname=VM_IFNAME)


def leave_vm(vm: str, *, wan: str = DEFAULT_WAN) -> None:
    """Take VM `vm` off the WAN and free its address; the last member to leave removes
    the WAN. A VM that is not on it counts as gone."""
    namespaces.require_off_event_loop(f"detaching VM {vm!r} from the WAN")
    if not _state_path(wan).exists():
        return
    with _locked(wan):
        state = _load(wan)
        if state is None or vm not in state.vms:
            return
        namespaces.require_privileges()
        _leave(wan, state, vm, vm=True)
    log.info("wan detached vm=%s wan=%s", vm, wan)
