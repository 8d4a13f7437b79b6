"""What a multicluster cluster offers VMs and other clusters on the WAN: its control
plane's URL and a kubeconfig naming the API server at the node's WAN address."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from localcluster.up import ClusterSpec, write_wan_kubeconfig


def _spec(state_dir: Path, wan_address: str | None) -> ClusterSpec:
    return ClusterSpec(name="east", state_dir=state_dir, pod_cidr="10.244.0.0/16",
                       service_cidr="10.96.0.0/16", cluster_domain="cluster.local",
                       trust_domain="cluster.local", node_netns="mg-east-node",
                       node_address="10.244.0.1", wan="mg-wan" if wan_address else None,
                       wan_address=wan_address)


def test_a_cluster_on_a_wan_names_its_wan_endpoints(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "172.30.0.2")
    assert spec.control_url == "https://10.244.0.1:8086"
    assert spec.control_url_wan == "https://172.30.0.2:8086"
    assert spec.kubeconfig_wan == tmp_path / "kubeconfig.wan"


def test_a_cluster_off_the_wan_has_no_wan_endpoints(tmp_path: Path) -> None:
    spec = _spec(tmp_path, None)
    assert spec.control_url_wan is None and spec.kubeconfig_wan is None


def test_the_wan_kubeconfig_differs_from_the_hosts_only_in_its_server(tmp_path: Path) -> None:
    host: dict[str, Any] = {"apiVersion": "v1", "kind": "Config", "current-context": "east",
            "clusters": [{"name": "east", "cluster": {"server": "https://127.0.0.1:40000",
                                                      "certificate-authority-data": "Q0E="}}],
            "users": [{"name": "admin", "user": {"token": "secret"}}],
            "contexts": [{"name": "east", "context": {"cluster": "east", "user": "admin"}}]}
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(host))
    path = write_wan_kubeconfig(_spec(tmp_path, "172.30.0.2"))
    written = yaml.safe_load(path.read_text())
    assert written["clusters"][0]["cluster"]["server"] == "https://172.30.0.2:6443"
    written["clusters"][0]["cluster"]["server"] = host["clusters"][0]["cluster"]["server"]
    assert written == host
    assert path.stat().st_mode & 0o777 == 0o600
