"""The API server address a Link names: where the importing cluster's mirror
controller reaches the exporting cluster's API.

As `linkerd multicluster link`, it is the kubeconfig's server unless
``--api-server`` says otherwise. A kubeconfig that names a loopback address (kind's
port forward, the embedded cluster's host listener) is no use to another cluster, so
then the exporting cluster's ``kube-public/cluster-info`` is read, the kubeconfig
kubeadm (and the embedded cluster) publish there with the address other machines
reach; when that names loopback too (both clusters on one machine), the kubeconfig's
address stays, with a warning. No I/O here: the caller reads the ConfigMap.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import yaml


@dataclass(frozen=True)
class ApiServer:
    url: str
    source: str
    """Where the address came from, for the message that says so."""
    warning: str = ""
    """Set when the address is loopback: only a mirror controller on the same machine
    would reach it."""


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_server(kubeconfig_server: str,
               cluster_info: Mapping[str, str] | None) -> ApiServer:
    """``kubeconfig_server`` unless it is loopback; then cluster-info's (``cluster_info``
    is that ConfigMap's data, None when the cluster has none or hides it)."""
    if not is_loopback(kubeconfig_server):
        return ApiServer(kubeconfig_server, "the kubeconfig")
    published = _published(cluster_info)
    if published and not is_loopback(published):
        return ApiServer(published, "kube-public/cluster-info")
    return ApiServer(kubeconfig_server, "the kubeconfig", warning=(
        f"the Link names {kubeconfig_server}, a loopback address: only a mirror controller "
        "on this machine reaches it, and kube-public/cluster-info "
        f"{'names ' + published if published else 'gives no other'}; for another "
        "machine's cluster give the address its pods reach with --api-server "
        "https://HOST:PORT"))


def _published(cluster_info: Mapping[str, str] | None) -> str:
    if not cluster_info or not cluster_info.get("kubeconfig"):
        return ""
    try:
        config = yaml.safe_load(cluster_info["kubeconfig"])
        return str(config["clusters"][0]["cluster"]["server"])
    except (yaml.YAMLError, KeyError, IndexError, TypeError):
        return ""
