"""Which API server address `multicluster link` writes into the Link's kubeconfig:
the kubeconfig's, unless it is loopback, then kube-public/cluster-info's (as kubeadm
and the embedded cluster publish it), else a refusal saying what to give."""

from __future__ import annotations

import pytest
import yaml

from mirror.apiaddress import api_server, is_loopback


def _info(server: str) -> dict[str, str]:
    return {"kubeconfig": yaml.safe_dump({"apiVersion": "v1", "kind": "Config", "clusters": [
        {"name": "", "cluster": {"server": server, "certificate-authority-data": "AA=="}}]})}


@pytest.mark.parametrize(("url", "loopback"), [
    ("https://127.0.0.1:6443", True), ("https://localhost:6443", True),
    ("https://[::1]:6443", True), ("https://172.30.0.2:6443", False),
    ("https://west-control-plane:6443", False), ("https://10.0.0.1", False)])
def test_loopback_is_told_apart(url: str, loopback: bool) -> None:
    assert is_loopback(url) is loopback


def test_a_reachable_kubeconfig_server_is_used_as_linkerd_does() -> None:
    got = api_server("https://203.0.113.7:6443", _info("https://172.30.0.2:6443"))
    assert (got.url, got.source) == ("https://203.0.113.7:6443", "the kubeconfig")


def test_a_loopback_kubeconfig_falls_back_to_cluster_info() -> None:
    got = api_server("https://127.0.0.1:41234", _info("https://172.30.0.2:6443"))
    assert (got.url, got.source) == ("https://172.30.0.2:6443", "kube-public/cluster-info")


@pytest.mark.parametrize(("info", "said"), [
    (None, "kube-public/cluster-info gives no other"),
    ({"kubeconfig": "{not yaml"}, "gives no other"),
    ({"kubeconfig": "clusters: []"}, "gives no other"),
    (_info("https://127.0.0.1:6443"), "names https://127.0.0.1:6443"),
])
def test_with_no_reachable_address_the_loopback_one_stays_with_a_warning(
        info: dict[str, str] | None, said: str) -> None:
    got = api_server("https://127.0.0.1:41234", info)
    assert (got.url, got.source) == ("https://127.0.0.1:41234", "the kubeconfig")
    assert "only a mirror controller on this machine reaches it" in got.warning
    assert said in got.warning
    assert "--api-server https://HOST:PORT" in got.warning
