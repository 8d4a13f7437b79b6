"""What `cluster up --multicluster` adds to a cluster besides its WAN link
(localcluster.wan): the gateway's identity and configuration, and the command
lines of the gateway and of the mirror supervisor (localcluster.mirrorset).

The gateway is the ServiceAccount ``meshgate-gateway`` of the control namespace,
the identity `meshgate multicluster link` names in the Links it prints. It
gets its certificate from the cluster's identity service like any pod: with a
ServiceAccount token for the identity audience, written next to its
configuration, and renews it with the certificate itself.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from localcluster.rootless import meshgate_argv
from mesh.identity.names import GATEWAY_SERVICE_ACCOUNT, Identity

CONTROL_NAMESPACE = "meshgate"
GATEWAY_PORT = 4143
GATEWAY_ADMIN_PORT = 4191
TOKEN_LIFETIME = 24 * 3600
"""Seconds. The token is spent on the first certificate; renewals use the certificate,
and every `cluster up` that starts the gateway writes a fresh token."""


def gateway_identity(trust_domain: str) -> Identity:
    return Identity(CONTROL_NAMESPACE, GATEWAY_SERVICE_ACCOUNT, trust_domain)


def gateway_config(*, state_dir: Path, kubeconfig: Path, control_url: str, trust_domain: str,
                   cluster_domain: str, wan_address: str, core: Any) -> Path:
    """Write the gateway's token and configuration under `state_dir`/gateway; the path
    of the configuration."""
    from kubernetes import client as k8s
    from kubernetes.client.rest import ApiException

    from mesh.identity.names import SERVICE_AUDIENCE

    try:
        core.create_namespaced_service_account(CONTROL_NAMESPACE, k8s.V1ServiceAccount(
            metadata=k8s.V1ObjectMeta(name=GATEWAY_SERVICE_ACCOUNT)))
    except ApiException as e:
        if e.status != 409:
            raise
    review = core.create_namespaced_service_account_token(
        GATEWAY_SERVICE_ACCOUNT, CONTROL_NAMESPACE, k8s.AuthenticationV1TokenRequest(
            spec=k8s.V1TokenRequestSpec(audiences=[SERVICE_AUDIENCE],
                                        expiration_seconds=TOKEN_LIFETIME)))
    directory = state_dir / "gateway"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = directory / "token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(str(review.status.token))
    config = {
        "identity": {"name": gateway_identity(trust_domain).dns_name,
                     "trustBundle": str(state_dir / "identity" / "trust-bundle.pem"),
                     "server": control_url, "tokenFile": str(token)},
        "kubeconfig": str(kubeconfig),
        "listen": f"{wan_address}:{GATEWAY_PORT}",
        "admin": f"{wan_address}:{GATEWAY_ADMIN_PORT}",
        "clusterDomain": cluster_domain,
    }
    path = directory / "gateway.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def publish_gateway_service(core: Any, wan_address: str) -> None:
    """The gateway's Service ``meshgate/meshgate-gateway``, a LoadBalancer whose ingress
    is the node's WAN address, as a cloud's load balancer controller would write it on a
    real cluster: `meshgate multicluster link` reads the gateway's address and ports from
    it (mirror.gatewayservice). Idempotent."""
    from kubernetes.client.rest import ApiException

    from mirror import gatewayservice

    body = {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": gatewayservice.NAME, "namespace": CONTROL_NAMESPACE,
                         "labels": {"app.kubernetes.io/name": "meshgate-gateway"}},
            "spec": {"type": "LoadBalancer", "ports": [
                {"name": gatewayservice.GATEWAY_PORT_NAME, "port": GATEWAY_PORT,
                 "targetPort": GATEWAY_PORT, "protocol": "TCP"},
                {"name": gatewayservice.PROBE_PORT_NAME, "port": GATEWAY_ADMIN_PORT,
                 "targetPort": GATEWAY_ADMIN_PORT, "protocol": "TCP"}]}}
    try:
        core.create_namespaced_service(CONTROL_NAMESPACE, body)
    except ApiException as e:
        if e.status != 409:
            raise
        core.patch_namespaced_service(gatewayservice.NAME, CONTROL_NAMESPACE,
                                      {"spec": body["spec"]})
    core.patch_namespaced_service_status(
        gatewayservice.NAME, CONTROL_NAMESPACE,
        {"status": {"loadBalancer": {"ingress": [{"ip": wan_address}]}}})


def gateway_argv(config: Path) -> list[str]:
    return meshgate_argv(("gateway", "run", "--config", str(config)))


def mirrorset_argv(*, kubeconfig: Path, state_dir: Path) -> list[str]:
    return [sys.executable, "-m", "localcluster.mirrorset", "--kubeconfig", str(kubeconfig),
            "--state-dir", str(state_dir), "--namespace", CONTROL_NAMESPACE]
