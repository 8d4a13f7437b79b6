"""The WAN's planning, without namespaces: addresses, names, ranges and the node's
nftables rules."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from localcluster.wan import (
    WanAddressInUseError,
    WanError,
    check_ranges,
    choose_address,
    members,
    nft_ruleset,
    peer_name,
)
from mesh.errors import ConfigError

WAN = IPv4Network("172.30.0.0/29")


def test_the_lowest_free_address_is_chosen() -> None:
    assert choose_address(WAN, {}, None) == IPv4Address("172.30.0.1")
    taken = {IPv4Address("172.30.0.1"): "east", IPv4Address("172.30.0.3"): "west"}
    assert choose_address(WAN, taken, None) == IPv4Address("172.30.0.2")


def test_an_address_asked_for_is_used_when_free() -> None:
    assert choose_address(WAN, {}, IPv4Address("172.30.0.5")) == IPv4Address("172.30.0.5")


@pytest.mark.parametrize("holder", ["cluster 'east'", "VM 'db'"])
def test_an_address_in_use_names_the_member_that_has_it(holder: str) -> None:
    with pytest.raises(WanAddressInUseError, match=f"in use by {holder}; choose another"):
        choose_address(WAN, {IPv4Address("172.30.0.1"): holder}, IPv4Address("172.30.0.1"))


@pytest.mark.parametrize("address", ["172.30.0.0", "172.30.0.7", "10.0.0.1"])
def test_an_address_outside_the_hosts_of_the_wan_is_refused(address: str) -> None:
    with pytest.raises(ConfigError, match="not a host address"):
        choose_address(WAN, {}, IPv4Address(address))


def test_a_full_wan_says_so() -> None:
    taken = {a: f"c{i}" for i, a in enumerate(WAN.hosts())}
    with pytest.raises(WanError, match="no free address"):
        choose_address(WAN, taken, None)


def test_peer_names_are_unique_per_address_and_fit_an_interface_name() -> None:
    big = IPv4Network("172.16.0.0/12")
    names = {peer_name(big, a) for a in (big.network_address + 1, big.broadcast_address - 1)}
    assert len(names) == 2 and all(len(n) <= 15 for n in names)


def test_a_wan_that_overlaps_the_cluster_is_refused() -> None:
    with pytest.raises(ConfigError, match="overlaps the pod CIDR"):
        check_ranges(IPv4Network("10.244.1.0/24"), pod_cidr=IPv4Network("10.244.0.0/16"),
                     service_cidr=IPv4Network("10.96.0.0/16"))
    check_ranges(WAN, pod_cidr=IPv4Network("10.244.0.0/16"),
                 service_cidr=IPv4Network("10.96.0.0/16"))


def test_the_rules_masquerade_pods_and_keep_the_wan_out() -> None:
    rules = nft_ruleset(IPv4Network("10.244.0.0/16"))
    assert 'ip saddr 10.244.0.0/16 oifname "wan0" masquerade' in rules
    assert 'iifname "wan0" ct state established,related accept' in rules
    assert rules.index("delete table ip meshgate") < rules.index("chain postrouting")
    # What the node's service proxy DNATed (a LoadBalancer's ingress on the WAN
    # address) may come in; anything else new from the WAN is dropped.
    assert rules.index('iifname "wan0" ct status dnat accept') < rules.index(
        'iifname "wan0" drop')


@pytest.mark.parametrize("name", ["../etc", "Mg-Wan", "", "a" * 33])
def test_a_wan_name_that_is_not_a_plain_label_is_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="WAN name"):
        members(name)
