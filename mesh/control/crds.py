"""The policy.meshgate.io CustomResourceDefinitions: read from deploy/crds and
installed (created, or updated when they differ) through the kubernetes client."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from mesh.errors import PolicyError

# deploy/ is not a package: it is found beside mesh/ in the (editable) checkout.
CRD_FILE = Path(__file__).resolve().parents[2] / "deploy" / "crds" / "policy.yaml"


def crd_documents() -> list[dict[str, Any]]:
    """The CustomResourceDefinitions of policy.meshgate.io, from deploy/crds/policy.yaml."""
    try:
        text = CRD_FILE.read_text()
    except OSError as e:
        raise PolicyError(f"cannot read the policy CRDs at {CRD_FILE}: {e.strerror}; meshgate "
                          "must be installed from its source tree (pip install -e .)") from e
    return [doc for doc in yaml.safe_load_all(text) if doc]


def install_crds(api_client: Any, *, timeout: float = 30.0) -> dict[str, str]:
    """Create or update the policy CRDs and wait until they are established.

    Returns what happened to each, by name: ``created``, ``updated`` or
    ``unchanged``. Running it again changes nothing.
    """
    # Imported here: proxies load this module and must not pay for the client.
    from kubernetes import client

    api = client.ApiextensionsV1Api(api_client)
    done = {doc["metadata"]["name"]: _install(api, doc) for doc in crd_documents()}
    deadline = time.monotonic() + timeout
    for name in done:
        while not _established(_read(api, name)):
            if time.monotonic() > deadline:
                raise PolicyError(f"CustomResourceDefinition {name} was not established "
                                  f"within {timeout:g}s; see its status.conditions")
            time.sleep(0.1)
    return done


def _install(api: Any, doc: dict[str, Any]) -> str:
    from kubernetes.client.rest import ApiException

    name = doc["metadata"]["name"]
    for _ in range(5):  # another writer may race us; each round re-reads what is there
        try:
            api.create_custom_resource_definition(doc)
            return "created"
        except ApiException as e:
            if e.status != 409:
                raise _api_error(name, "create", e) from e
        current = _read(api, name)
        if current is None:
            continue  # deleted since: create again
        if _contains(current, doc):
            return "unchanged"
        body = copy.deepcopy(doc)
        body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        try:
            api.replace_custom_resource_definition(name, body)
            return "updated"
        except ApiException as e:
            if e.status not in (404, 409):
                raise _api_error(name, "replace", e) from e
    raise PolicyError(f"CustomResourceDefinition {name} kept changing while it was installed; "
                      "run the install again")


def _read(api: Any, name: str) -> dict[str, Any] | None:
    from kubernetes.client.rest import ApiException

    try:
        resp = api.read_custom_resource_definition(name, _preload_content=False)
    except ApiException as e:
        if e.status == 404:
            return None
        raise _api_error(name, "read", e) from e
    body: dict[str, Any] = json.loads(resp.data)
    return body


def _established(crd: Mapping[str, Any] | None) -> bool:
    conditions = ((crd or {}).get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)


def _contains(have: Any, want: Any) -> bool:
    """Whether `have` holds everything `want` says (the server may add defaults)."""
    if isinstance(want, Mapping):
        return isinstance(have, Mapping) and all(
            key in have and _contains(have[key], value) for key, value in want.items())
    if isinstance(want, list):
        return (isinstance(have, list) and len(have) == len(want)
                and all(_contains(h, w) for h, w in zip(have, want, strict=True)))
    return bool(have == want)


def _api_error(name: str, verb: str, e: Any) -> PolicyError:
    hint = {401: "the credential was refused", 403: "the credential may not do this; it needs "
            "create, get and update on customresourcedefinitions"}.get(e.status, "")
    detail = f"{e.status} {e.reason}" + (f": {hint}" if hint else "")
    return PolicyError(f"cannot {verb} CustomResourceDefinition {name} ({detail})")
