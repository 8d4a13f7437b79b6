"""`cluster up`: meshgate installed into the embedded cluster with the objects
`meshgate install` renders, as on a real cluster, and run by the node's kubelet.

In Linkerd's order: the CustomResourceDefinitions (``meshgate install --crds``)
first, until each is Established; then the rest (``meshgate install
--identity-dir DIR``, DIR the cluster's own identity directory); then every
Deployment until it is Available. Objects are written with server-side apply
(field manager ``meshgate-install``), so `up` again converges them and changes
nothing that is already so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from mesh import install, manifests
from mesh.errors import MeshError
from mesh.identity.ca import IssuerDir
from mesh.identity.names import DEFAULT_CONTROL_NS

log = logging.getLogger(__name__)

FIELD_MANAGER = "meshgate-install"
NODE_FIELD_MANAGER = "meshgate-cluster-up"
"""Who writes what the embedded cluster adds to the manifests (the control plane
Service's externalIPs)."""
CONTROL_SERVICE = "meshgate-control"
JOIN_TOKENS_BINDING = {
    "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
    "metadata": {"name": "meshgate-control-join-tokens",
                 "labels": {"app.kubernetes.io/part-of": "meshgate"}},
    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                "name": "meshgate-control-join-tokens"},
    "subjects": [{"kind": "ServiceAccount", "name": "meshgate-control",
                  "namespace": DEFAULT_CONTROL_NS}]}
"""The manifests leave the join-token role unbound (an operator binds it in each VM
namespace, deploy/rbac-control.yaml); the embedded cluster binds it everywhere, so
that `vm join` works in any namespace, as a development cluster should."""
ESTABLISH_TIMEOUT = 30.0
AVAILABLE_TIMEOUT = 180.0
POLL = 0.2


class InstallError(MeshError):
    """meshgate's manifests could not be applied, or did not come up in time."""


def install_manifests(kubeconfig: Path, identity_dir: Path, *,
                      control_addresses: Sequence[str] = (),
                      control_args: Sequence[str] = (),
                      available_timeout: float = AVAILABLE_TIMEOUT,
                      clock: Callable[[], float] = time.monotonic,
                      sleep: Callable[[float], None] = time.sleep) -> list[str]:
    """Apply the CRDs, then the rest, and wait for the Deployments; their names.

    `control_addresses` become the control plane Service's ``externalIPs``: the
    node's addresses, where VMs on the WAN reach the control plane (injected pods'
    proxies, `cluster run-pod`'s among them, use its headless Service).
    `control_args` go after the
    control plane container's own (``--cluster-name``, ``--workload-heartbeat``: what
    `cluster up` was asked for)."""
    from kubernetes.dynamic import DynamicClient

    from mesh.kube import api_client

    crds = manifests.build(manifests.CRDS)
    docs = install.render(IssuerDir(identity_dir))
    add_control_args(docs, control_args)
    with api_client(kubeconfig) as api:
        first = DynamicClient(api)
        _apply(first, crds)
        wait_until_none(lambda: _unestablished(first, crds), ESTABLISH_TIMEOUT,
                        "CustomResourceDefinitions to be Established", clock=clock,
                        sleep=sleep)
        # A fresh client: discovery must see the kinds the CRDs just added.
        client = DynamicClient(api)
        _apply(client, docs)
        _apply(client, [JOIN_TOKENS_BINDING], manager=NODE_FIELD_MANAGER)
        if control_addresses:
            _apply(client, [{"apiVersion": "v1", "kind": "Service", "metadata": {
                "name": CONTROL_SERVICE, "namespace": DEFAULT_CONTROL_NS},
                "spec": {"externalIPs": list(control_addresses)}}],
                   manager=NODE_FIELD_MANAGER)
        deployments = [d for d in docs if d["kind"] == "Deployment"]
        wait_until_none(lambda: _unavailable(client, deployments), available_timeout,
                        "meshgate's Deployments to be Available", clock=clock, sleep=sleep)
    names = [d["metadata"]["name"] for d in deployments]
    log.info("meshgate installed from manifests deployments=%s", ",".join(names))
    return names


def add_control_args(docs: list[dict[str, Any]], args: Sequence[str]) -> None:
    """Append `args` to the control plane container's arguments, in place."""
    for doc in docs:
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] == CONTROL_SERVICE:
            for container in doc["spec"]["template"]["spec"]["containers"]:
                if container["name"] == "control":
                    container["args"] = [*container.get("args", []), *args]


def _apply(client: Any, docs: Iterable[dict[str, Any]], *,
           manager: str = FIELD_MANAGER) -> None:
    from kubernetes.client.rest import ApiException

    for doc in docs:
        meta = doc["metadata"]
        what = f"{doc['kind']} {meta.get('namespace', '')}/{meta['name']}".replace(" /", " ")
        try:
            resource = client.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
            client.server_side_apply(resource, body=doc, name=meta["name"],
                                     namespace=meta.get("namespace"),
                                     field_manager=manager, force_conflicts=True)
        except ApiException as e:
            raise InstallError(f"applying {what} failed: {e.status} {e.reason}: "
                               f"{_message(e)}") from e
        except Exception as e:
            if type(e).__name__ == "ResourceNotFoundError":
                raise InstallError(f"applying {what}: the cluster does not serve "
                                   f"{doc['apiVersion']} {doc['kind']}") from e
            raise


def _message(e: Any) -> str:
    import json

    try:
        return str(json.loads(e.body).get("message", e.body))
    except (TypeError, ValueError, AttributeError):
        return str(e.body)


def _unestablished(client: Any, crds: list[dict[str, Any]]) -> list[str]:
    resource = client.resources.get(api_version="apiextensions.k8s.io/v1",
                                    kind="CustomResourceDefinition")
    return [crd["metadata"]["name"] for crd in crds if not established(
        resource.get(name=crd["metadata"]["name"]).to_dict())]


def _unavailable(client: Any, deployments: list[dict[str, Any]]) -> list[str]:
    resource = client.resources.get(api_version="apps/v1", kind="Deployment")
    return [d["metadata"]["name"] for d in deployments if not available(resource.get(
        name=d["metadata"]["name"], namespace=d["metadata"]["namespace"]).to_dict())]


def established(crd: dict[str, Any]) -> bool:
    return _condition(crd, "Established")


def available(deployment: dict[str, Any]) -> bool:
    """As `kubectl rollout status` sees it done: Available, and every wanted replica
    updated and available."""
    want = (deployment.get("spec") or {}).get("replicas", 1)
    status = deployment.get("status") or {}
    return (_condition(deployment, "Available") and status.get("availableReplicas", 0) >= want
            and status.get("updatedReplicas", 0) >= want)


def _condition(obj: dict[str, Any], kind: str) -> bool:
    return any(c.get("type") == kind and c.get("status") == "True"
               for c in (obj.get("status") or {}).get("conditions") or [])


def wait_until_none(pending: Callable[[], list[str]], timeout: float, what: str, *,
                    clock: Callable[[], float], sleep: Callable[[float], None]) -> None:
    """Until `pending()` names nothing; InstallError naming what is left after
    `timeout` seconds."""
    deadline = clock() + timeout
    while True:
        left = pending()
        if not left:
            return
        if clock() >= deadline:
            raise InstallError(f"timed out after {timeout:.0f}s waiting for {what}: "
                               f"{', '.join(left)} not yet; see `kubectl -n meshgate get "
                               "pods,events`")
        sleep(POLL)
