"""Address and name planning of the namespace topology, without touching the kernel."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from localcluster.netns import (
    ClusterNetwork,
    PodCidrExhaustedError,
    bridge_mac,
    next_free_address,
    resolv_conf_text,
    veth_name,
    wrap_command,
)
from mesh.errors import ConfigError

STATE = Path("/nonexistent/state")


def test_addresses_skip_the_bridge_and_fill_gaps() -> None:
    cidr = IPv4Network("10.244.0.0/16")
    assert next_free_address(cidr, set()) == IPv4Address("10.244.0.2")
    taken = {IPv4Address("10.244.0.2"), IPv4Address("10.244.0.4")}
    assert next_free_address(cidr, taken) == IPv4Address("10.244.0.3")


def test_a_slash_30_holds_one_pod() -> None:
    cidr = IPv4Network("10.244.0.0/30")
    only = next_free_address(cidr, set())
    assert only == IPv4Address("10.244.0.2")
    with pytest.raises(PodCidrExhaustedError, match="choose a larger pod CIDR"):
        next_free_address(cidr, {only})


def test_veth_names_are_unique_per_address_and_fit_ifnamsiz() -> None:
    cidr = IPv4Network("10.0.0.0/8")
    assert veth_name(cidr, IPv4Address("10.0.0.2")) == "veth2"
    assert veth_name(cidr, IPv4Address("10.0.1.2")) == "veth102"
    assert len(veth_name(cidr, IPv4Address("10.255.255.254"))) <= 15


def test_bridge_mac_is_stable_unicast_and_locally_administered() -> None:
    mac = bridge_mac("east")
    assert mac == bridge_mac("east") != bridge_mac("west")
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01
    assert len(mac.split(":")) == 6


def test_names_and_addresses_derive_from_the_cluster() -> None:
    net = ClusterNetwork(name="east", state_dir=STATE, pod_cidr=IPv4Network("10.245.0.0/16"),
                         service_cidr=IPv4Network("10.97.0.0/16"))
    assert net.node_netns == "mg-east-node"
    assert net.pod_netns("web-1") == "mg-east-pod-web-1"
    assert net.gateway == IPv4Interface("10.245.0.1/16")
    assert net.nameserver == IPv4Address("10.245.0.1")
    text = resolv_conf_text(net)
    assert "nameserver 10.245.0.1\n" in text
    assert "search svc.cluster.local cluster.local\n" in text


@pytest.mark.parametrize(("kwargs", "complaint"), [
    ({"name": "East"}, "DNS label"),
    ({"name": "a" * 64}, "DNS label"),
    ({"netns_prefix": "a/b"}, "prefix"),
    ({"pod_cidr": IPv4Network("10.96.0.0/12")}, "overlaps"),
    ({"pod_cidr": IPv4Network("10.244.0.0/31")}, "prefix length"),
    ({"dns": IPv4Address("10.96.0.10")}, "inside the service CIDR"),
])
def test_invalid_networks_are_refused(kwargs: dict[str, object], complaint: str) -> None:
    spec: dict[str, object] = {"name": "east", "state_dir": STATE, **kwargs}
    with pytest.raises(ConfigError, match=complaint):
        ClusterNetwork(**spec)  # type: ignore[arg-type]


def test_pod_command_runs_the_command_last_with_the_pods_files() -> None:
    argv = wrap_command(Path("/var/run/netns/mg-east-pod-a"), Path("/s/a.resolv.conf"),
                        ["cat", "/etc/resolv.conf"], unshare="/u", nsenter="/n", sh="/sh",
                        mount="/m")
    assert argv[:5] == ["/u", "--mount", "--propagation", "private", "--"]
    assert "--net=/var/run/netns/mg-east-pod-a" in argv
    assert argv[-4:] == ["/m", "/s/a.resolv.conf", "cat", "/etc/resolv.conf"]
    with pytest.raises(ConfigError):
        wrap_command(Path("/x"), Path("/y"), [], unshare="/u", nsenter="/n", sh="/sh",
                     mount="/m")
