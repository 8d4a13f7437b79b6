"""The cluster's trust bundle as the cluster publishes it: a ConfigMap
``meshgate-identity-trust-roots`` (key ``ca-bundle.crt``) in the control
namespace, as Linkerd publishes ``linkerd-identity-trust-roots``.

The control plane keeps it equal to the bundle of its identity directory, so
that tools without that directory (``meshgate multicluster check``, which
compares two linked clusters' anchors) can read it with a kubeconfig. The
calls block: run them in a thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from mesh.identity.bundle import TrustBundle
from mesh.identity.errors import TrustSetupError

log = logging.getLogger(__name__)

TRUST_ROOTS_CONFIGMAP = "meshgate-identity-trust-roots"
TRUST_ROOTS_KEY = "ca-bundle.crt"
PUBLISH_INTERVAL = 10.0


def publish(core: Any, namespace: str, pem: str) -> bool:
    """Make the ConfigMap hold `pem`; whether it had to be written."""
    body: dict[str, Any] = {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": TRUST_ROOTS_CONFIGMAP, "namespace": namespace,
                         "labels": {"app.kubernetes.io/part-of": "meshgate"}},
            "data": {TRUST_ROOTS_KEY: pem}}
    try:
        resp = core.read_namespaced_config_map(TRUST_ROOTS_CONFIGMAP, namespace,
                                               _preload_content=False)
    except ApiException as e:
        if e.status != 404:
            raise
        core.create_namespaced_config_map(namespace, body)
        return True
    current = json.loads(resp.data)
    if (current.get("data") or {}).get(TRUST_ROOTS_KEY) == pem:
        return False
    body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
    core.replace_namespaced_config_map(TRUST_ROOTS_CONFIGMAP, namespace, body)
    return True


async def keep_published(api: client.ApiClient, namespace: str,
                         bundle: Callable[[], TrustBundle], *,
                         interval: float = PUBLISH_INTERVAL) -> None:
    """Publish `bundle()` now and whenever it changes (a rotation), until cancelled."""
    core = client.CoreV1Api(api)
    written, failing = "", False
    while True:
        pem = bundle().to_pem().decode("ascii")
        if pem != written:
            try:
                if await asyncio.to_thread(publish, core, namespace, pem):
                    log.info("trust bundle published configmap=%s/%s anchors=%d", namespace,
                             TRUST_ROOTS_CONFIGMAP, len(bundle().anchors))
                written, failing = pem, False
            except Exception as e:  # the API being away is waited out, logged once
                if not failing:
                    log.warning("trust bundle not published configmap=%s/%s cause=%s; "
                                "retrying", namespace, TRUST_ROOTS_CONFIGMAP,
                                e.reason if isinstance(e, ApiException) else
                                type(e).__name__)
                failing = True
        await asyncio.sleep(interval)


def bundle_of(config_map: dict[str, Any], where: str) -> TrustBundle:
    """The trust bundle a trust roots ConfigMap holds (as read from the API); ``where``
    names it in the error when it holds none."""
    pem = (config_map.get("data") or {}).get(TRUST_ROOTS_KEY)
    if not pem:
        raise TrustSetupError(f"{where} has no {TRUST_ROOTS_KEY}")
    try:
        return TrustBundle.from_pem(str(pem).encode())
    except TrustSetupError as e:
        raise TrustSetupError(f"{where}: {e}") from e
