"""meshgate's CustomResourceDefinitions: read from deploy/crds/<name>.yaml
(``policy`` for policy.meshgate.io, ``workload`` for the ExternalWorkload,
``multicluster`` for the Link) and installed (created, or updated when they
differ) through the kubernetes client. The control plane reads the first two
(`CORE`), which are what `install_crds` installs unless told otherwise."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mesh.errors import CrdError

# deploy/ is not a package: it is found beside mesh/ in the (editable) checkout.
CRD_DIR = Path(__file__).resolve().parents[2] / "deploy" / "crds"
CORE = ("policy", "workload")
"""The CRD files whose resources the control plane reads."""


def crd_documents(name: str | Sequence[str] = CORE) -> list[dict[str, Any]]:
    """The CustomResourceDefinitions in deploy/crds/<name>.yaml (each file of `name`,
    in order, when it names several)."""
    if not isinstance(name, str):
        return [doc for one in name for doc in crd_documents(one)]
    path = CRD_DIR / f"{name}.yaml"
    try:
        text = path.read_text()
    except OSError as e:
        raise CrdError(f"cannot read the {name} CRDs at {path}: {e.strerror}; meshgate must "
                       "be installed from its source tree (pip install -e .)") from e
    return [doc for doc in yaml.safe_load_all(text) if doc]


def install_crds(api_client: Any, *, name: str | Sequence[str] = CORE,
                 timeout: float = 30.0) -> dict[str, str]:
    """Create or update the CRDs of deploy/crds/<name>.yaml (by default the control
    plane's, `CORE`) and wait until they are established.

    Returns what happened to each, by name: ``created``, ``updated`` or
    ``unchanged``. Running it again changes nothing.
    """
    # Imported here: proxies load this module and must not pay for the client.
    from kubernetes import client

    api = client.ApiextensionsV1Api(api_client)
    done = {doc["metadata"]["name"]: _install(api, doc) for doc in crd_documents(name)}
    deadline = time.monotonic() + timeout
    for crd in done:
        while not _established(_read(api, crd)):
            if time.monotonic() > deadline:
                raise CrdError(f"CustomResourceDefinition {crd} was not established "
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
    raise CrdError(f"CustomResourceDefinition {name} kept changing while it was installed; "
                      "run the install again")


def is_current(installed: Mapping[str, Any] | None, doc: Mapping[str, Any]) -> bool:
    """Whether an installed CRD holds everything its document says: what
    `install_crds` would leave unchanged."""
    return installed is not None and _contains(installed, doc)


def is_established(installed: Mapping[str, Any] | None) -> bool:
    return _established(installed)


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


def _api_error(name: str, verb: str, e: Any) -> CrdError:
    hint = {401: "the credential was refused", 403: "the credential may not do this; it needs "
            "create, get and update on customresourcedefinitions"}.get(e.status, "")
    detail = f"{e.status} {e.reason}" + (f": {hint}" if hint else "")
    return CrdError(f"cannot {verb} CustomResourceDefinition {name} ({detail})")
