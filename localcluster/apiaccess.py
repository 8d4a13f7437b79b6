"""kube's ServiceAccount admission for a new Pod's API access: unless the Pod or
its ServiceAccount turns ``automountServiceAccountToken`` off, a projected volume
``kube-api-access-<5 random>`` (a token bound to the Pod, the cluster's ca.crt
from ``kube-root-ca.crt``, and the namespace) is added and mounted read-only at
/var/run/secrets/kubernetes.io/serviceaccount in every container."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

MOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
TOKEN_SECONDS = 3607
ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def api_access_volume(name: str) -> dict[str, Any]:
    return {"name": name, "projected": {"defaultMode": 420, "sources": [
        {"serviceAccountToken": {"expirationSeconds": TOKEN_SECONDS, "path": "token"}},
        {"configMap": {"name": "kube-root-ca.crt",
                       "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {
            "apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}}


def mount_api_access(pod: dict[str, Any], service_account: Mapping[str, Any] | None) -> None:
    spec = pod.setdefault("spec", {})
    if spec.get("automountServiceAccountToken") is False:
        return
    if (spec.get("automountServiceAccountToken") is None and service_account is not None
            and service_account.get("automountServiceAccountToken") is False):
        return
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    if any(m.get("mountPath") == MOUNT_PATH for c in containers
           for m in c.get("volumeMounts") or []):
        return
    name = "kube-api-access-" + "".join(secrets.choice(ALPHABET) for _ in range(5))
    spec.setdefault("volumes", []).append(api_access_volume(name))
    for c in containers:
        c.setdefault("volumeMounts", []).append(
            {"name": name, "readOnly": True, "mountPath": MOUNT_PATH})
