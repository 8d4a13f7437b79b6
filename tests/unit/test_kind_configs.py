"""kind-configs/ holds kind clusters a user creates with `kind create cluster --config`.
No container runtime runs where the tests run, so the files are checked against kind's
v1alpha4 configuration schema as kind's own source defines it (the fields of
sigs.k8s.io/kind/pkg/apis/config/v1alpha4/types.go and the checks of
pkg/internal/apis/config/validate.go, at kind commit fed2688 of 2026-08-21): every
field is one kind reads, every value one kind accepts, and the clusters' networks are
the distinct ones meshgate's multicluster setup needs, equal to the embedded demo's."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from localcluster.demo import CIDRS

CONFIGS = Path(__file__).resolve().parents[2] / "kind-configs"

# Field names by type, as the v1alpha4 structs' json tags spell them.
CLUSTER = {"kind", "apiVersion", "name", "nodes", "networking", "featureGates",
           "runtimeConfig", "kubeadmConfigPatches", "kubeadmConfigPatchesJSON6902",
           "containerdConfigPatches", "containerdConfigPatchesJSON6902"}
NODE = {"role", "image", "labels", "extraMounts", "extraPortMappings",
        "kubeadmConfigPatches", "kubeadmConfigPatchesJSON6902"}
NETWORKING = {"ipFamily", "apiServerPort", "apiServerAddress", "podSubnet", "serviceSubnet",
              "disableDefaultCNI", "kubeProxyMode", "dnsSearch"}
MOUNT = {"containerPath", "hostPath", "readOnly", "selinuxRelabel", "propagation"}
PORT_MAPPING = {"containerPort", "hostPort", "listenAddress", "protocol"}
ROLES = {"control-plane", "worker"}
IP_FAMILIES = {"ipv4", "ipv6", "dual"}
PROXY_MODES = {"iptables", "ipvs", "nftables", "none"}
VALID_NAME = re.compile(r"^[a-z0-9.-]+$")


def unknown(obj: dict[str, Any], fields: set[str]) -> set[str]:
    return set(obj) - fields


def load(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


@pytest.mark.parametrize("name", ["east", "west"])
def test_a_kind_config_uses_only_what_kind_reads(name: str) -> None:
    cfg = load(name)
    assert (cfg["kind"], cfg["apiVersion"]) == ("Cluster", "kind.x-k8s.io/v1alpha4")
    assert not unknown(cfg, CLUSTER)
    assert cfg["name"] == name and VALID_NAME.match(cfg["name"])
    net = cfg.get("networking") or {}
    assert not unknown(net, NETWORKING)
    assert net.get("ipFamily", "ipv4") in IP_FAMILIES
    assert net.get("kubeProxyMode", "iptables") in PROXY_MODES
    for node in cfg.get("nodes") or []:
        assert not unknown(node, NODE) and node.get("role", "control-plane") in ROLES
        for mount in node.get("extraMounts") or []:
            assert not unknown(mount, MOUNT)
        for mapping in node.get("extraPortMappings") or []:
            assert not unknown(mapping, PORT_MAPPING)
    assert sum(n.get("role") == "control-plane" for n in cfg.get("nodes") or []) >= 1


def test_the_clusters_networks_are_distinct_and_the_demos() -> None:
    nets = {name: (ipaddress.ip_network(load(name)["networking"]["podSubnet"]),
                   ipaddress.ip_network(load(name)["networking"]["serviceSubnet"]))
            for name in ("east", "west")}
    every = [n for pair in nets.values() for n in pair]
    for i, a in enumerate(every):
        for b in every[i + 1:]:
            assert not a.overlaps(b), f"{a} overlaps {b}"
    for name, (pods, services) in nets.items():
        assert (str(pods), str(services)) == CIDRS[name]
