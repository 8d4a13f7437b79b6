"""The gateway's identity on the embedded cluster: the ServiceAccount
``meshgate-gateway`` of the control namespace, the identity `meshgate multicluster
link` names in the Links it prints and the one `run-pod`'s proxies trust to name the
callers it forwards. The gateway itself is the Deployment of meshgate's manifests
(deploy/gateway.yaml) that `cluster up` installs (localcluster.manifestinstall).
"""

from __future__ import annotations

from mesh.identity.names import GATEWAY_SERVICE_ACCOUNT, Identity

CONTROL_NAMESPACE = "meshgate"


def gateway_identity(trust_domain: str) -> Identity:
    return Identity(CONTROL_NAMESPACE, GATEWAY_SERVICE_ACCOUNT, trust_domain)
