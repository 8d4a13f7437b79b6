"""The only I/O of ``meshgate check``: a kubernetes client from a kubeconfig (its
context, and ``--as`` impersonation as kubectl sends it), and each object the
checks look at read once, 404 as absent and any other answer as the reason it
could not be read."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import urllib3
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.config.config_exception import ConfigException

from mesh.check import control, names, pre
from mesh.check.names import NS
from mesh.check.pre import KUBE_API, Access
from mesh.check.results import Got, Obj, Result
from mesh.kube import first_line, root_cause

TIMEOUT = 10.0
"""Seconds for each request."""


class Connection:
    """A client and the API server's ``/version``, once it answered."""

    def __init__(self, api: client.ApiClient, version: Obj) -> None:
        self.api = api
        self.version = version
        self.server = str(api.configuration.host)

    def close(self) -> None:
        self.api.close()


def connect(kubeconfig: Path | None, context: str | None, *, as_user: str | None = None,
            as_group: str | None = None) -> tuple[list[Result], Connection | None]:
    """The kubernetes-api checks: a client can be made, and the API server answers."""
    # urllib3 logs each retry of a refused connection; the check says it once.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    title = "can initialize the client"
    where = str(kubeconfig) if kubeconfig else "$KUBECONFIG or ~/.kube/config"
    if kubeconfig is not None and not kubeconfig.is_file():
        return [KUBE_API.fail(title, f"kubeconfig {kubeconfig} does not exist",
                              "give --kubeconfig the file of your cluster", fatal=True)], None
    try:
        api = config.new_client_from_config(
            config_file=str(kubeconfig) if kubeconfig else None, context=context)
    except (ConfigException, ValueError, TypeError, KeyError, OSError, yaml.YAMLError) as e:
        return [KUBE_API.fail(title, f"kubeconfig {where} cannot be used: {first_line(e)}",
                              "check the file and --context (kubectl config get-contexts)",
                              fatal=True)], None
    if as_user:
        api.set_default_header("Impersonate-User", as_user)
    if as_group:
        api.set_default_header("Impersonate-Group", as_group)
    results = [KUBE_API.ok(title)]
    title = "can query the Kubernetes API"
    try:
        version = _json(client.VersionApi(api).get_code(_preload_content=False,
                                                        _request_timeout=TIMEOUT))
    except ApiException as e:
        results.append(KUBE_API.fail(title, f"{api.configuration.host}: {_api_error(e)}",
                                     "check your credentials (kubectl get --raw /version)",
                                     fatal=True))
        api.close()
        return results, None
    except (urllib3.exceptions.HTTPError, OSError) as e:
        cause = first_line(root_cause(e))
        results.append(KUBE_API.fail(title, f"{api.configuration.host}: {cause}",
                                     "check that the API server is up and reachable from "
                                     "here (kubectl get --raw /version)", fatal=True))
        api.close()
        return results, None
    results.append(KUBE_API.ok(title))
    return results, Connection(api, version)


def read_pre(conn: Connection, docs: Sequence[Obj]) -> pre.PreState:
    access = pre.required_access(docs)
    allowed: dict[Access, bool | str] = {}

    def ask(asked: Access) -> bool | str:
        if asked not in allowed:
            allowed[asked] = may(conn, asked)
        return allowed[asked]

    for _, asked in access:
        ask(asked)
    roles = pre.roles(docs)
    for role in roles:  # each right a role grants only when the caller may not escalate
        if ask(pre.escalate_access(role)) is not True:
            for asked in pre.role_access(role):
                ask(asked)
    return pre.PreState(version=conn.version, served=served(conn),
                        apis=pre.required_apis(docs), access=access, allowed=allowed,
                        namespace=read(lambda: _core(conn).read_namespace(NS, **_opts())),
                        roles=roles)


def read_control(conn: Connection, expected: control.Expected) -> control.ControlState:
    core, apps = _core(conn), client.AppsV1Api(conn.api)
    ext = client.ApiextensionsV1Api(conn.api)
    admission = client.AdmissionregistrationV1Api(conn.api)
    discovery = client.DiscoveryV1Api(conn.api)

    def crd(name: str) -> Got:
        return read(lambda: ext.read_custom_resource_definition(name, **_opts()))

    def deployment(name: str) -> Got:
        return read(lambda: apps.read_namespaced_deployment(name, NS, **_opts()))

    return control.ControlState(
        crds={d["metadata"]["name"]: crd(d["metadata"]["name"]) for d in expected.crds},
        namespace=read(lambda: core.read_namespace(NS, **_opts())),
        deployments={d["metadata"]["name"]: deployment(d["metadata"]["name"])
                     for d in expected.deployments},
        issuer=read(lambda: core.read_namespaced_secret(names.ISSUER_SECRET, NS, **_opts())),
        roots=read(lambda: core.read_namespaced_config_map(names.TRUST_ROOTS_CONFIGMAP, NS,
                                                           **_opts())),
        webhook=read(lambda: admission.read_mutating_webhook_configuration(
            names.INJECTOR_WEBHOOK, **_opts())),
        injector_service=read(lambda: core.read_namespaced_service(
            names.INJECTOR_SERVICE, NS, **_opts())),
        injector_slices=read(lambda: discovery.list_namespaced_endpoint_slice(
            NS, label_selector=f"kubernetes.io/service-name={names.INJECTOR_SERVICE}",
            **_opts())),
        injector_answer=read(lambda: core.create_namespaced_pod(
            control.PROBE_NAMESPACE, control.probe_pod(), dry_run="All", **_opts())))


def read_pods(conn: Connection, namespace: str | None) -> tuple[Got, Got | None]:
    """The pods (of `namespace`, else of every namespace) and that namespace."""
    core = _core(conn)
    if namespace is None:
        return read(lambda: core.list_pod_for_all_namespaces(**_opts())), None
    return (read(lambda: core.list_namespaced_pod(namespace, **_opts())),
            read(lambda: core.read_namespace(namespace, **_opts())))


def served(conn: Connection) -> frozenset[str]:
    """The group versions the API server's discovery lists (empty if it would not say)."""
    names: set[str] = set()
    try:
        core = _json(client.CoreApi(conn.api).get_api_versions(**_opts()))
        groups = _json(client.ApisApi(conn.api).get_api_versions(**_opts()))
    except (ApiException, urllib3.exceptions.HTTPError, OSError):
        return frozenset()
    names.update(core.get("versions") or [])
    for group in groups.get("groups") or []:
        names.update(v["groupVersion"] for v in group.get("versions") or [])
    return frozenset(names)


def may(conn: Connection, access: Access) -> bool | str:
    """A SelfSubjectAccessReview: allowed or not, or why there was no answer."""
    body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": access.attributes()}}
    api: Any = client.AuthorizationV1Api(conn.api)
    try:
        review = _json(api.create_self_subject_access_review(body, **_opts()))
    except ApiException as e:
        return _api_error(e)
    except (urllib3.exceptions.HTTPError, OSError) as e:
        return first_line(root_cause(e))
    return bool((review.get("status") or {}).get("allowed"))


def read(call: Callable[[], Any]) -> Got:
    try:
        return Got(_json(call()))
    except ApiException as e:
        if e.status == 404:
            return Got(None)
        return Got(error=_api_error(e))
    except (urllib3.exceptions.HTTPError, OSError) as e:
        return Got(error=first_line(root_cause(e)))


def _core(conn: Connection) -> Any:
    return client.CoreV1Api(conn.api)


def _opts() -> dict[str, Any]:
    return {"_preload_content": False, "_request_timeout": TIMEOUT}


def _json(resp: Any) -> Obj:
    body: Obj = json.loads(resp.data)
    return body


def _api_error(e: ApiException) -> str:
    try:
        message = str(json.loads(e.body or "").get("message") or "")
    except (TypeError, ValueError, AttributeError):
        message = ""
    return f"{e.status} {e.reason}" + (f": {message}" if message else "")
