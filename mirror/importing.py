"""The importing cluster as `meshgate multicluster gateways` and `check` read it:
its Links, mirror Services and their EndpointSlices, Leases, and the trust
bundle it publishes, through the official kubernetes client.

A kubeconfig that is missing or unusable, an API that cannot be reached and a
credential it refuses are `ConfigError`s (the command ends with exit status 2
and that one line); an object that is not there is None. The calls block.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.rest import ApiException

from mesh.errors import ConfigError
from mesh.kube import api_client, first_line, root_cause
from mirror.lease import lease_name
from mirror.link import GROUP, PLURAL, VERSION
from mirror.mirrors import MANAGED_BY, MANAGED_BY_LABEL, MIRRORED_LABEL, SERVICE_NAME_LABEL

Obj = dict[str, Any]

LINK_CRD = f"{PLURAL}.{GROUP}"
REQUEST_TIMEOUT = (3.0, 10.0)
"""(connect, read) seconds for each call: a check never hangs on a silent API."""
LEASE_SLACK = 5.0
"""Seconds past a Lease's duration before its holder counts as gone (clock skew)."""


@dataclass(frozen=True)
class Serving:
    """Whether a mirror controller serves a Link, by its Lease."""

    holder: str
    problem: str
    """Why no controller serves it, or '' when one does."""


def quiet_retries() -> None:
    """urllib3 logs each retry of a refused connection; a command prints one line
    for the failure instead."""
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


class ImportingCluster:
    """Read-only views of the importing cluster for one Link namespace."""

    def __init__(self, kubeconfig: Path, namespace: str) -> None:
        self.api = api_client(kubeconfig)
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.server = str(self.api.configuration.host)
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.discovery = client.DiscoveryV1Api(self.api)
        self.extensions = client.ApiextensionsV1Api(self.api)
        self.coordination = client.CoordinationV1Api(self.api)

    def close(self) -> None:
        self.api.close()

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any
             ) -> Obj | None:
        """`fn(*args, **kwargs)`'s JSON body, or None on 404."""
        try:
            resp = fn(*args, _preload_content=False, _request_timeout=REQUEST_TIMEOUT,
                      **kwargs)
        except ApiException as e:
            if e.status == 404:
                return None
            if e.status == 401:
                raise ConfigError(f"the importing cluster's API at {self.server} refused the "
                                  f"credential of kubeconfig {self.kubeconfig} (401); use a "
                                  "kubeconfig whose credential is current") from e
            raise ConfigError(f"cannot {what} in the importing cluster at {self.server}: "
                              f"{e.status} {e.reason}; use a kubeconfig that may read "
                              "Links, Services, EndpointSlices, Leases and ConfigMaps") from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise ConfigError(f"the importing cluster's API at {self.server} cannot be reached: "
                              f"{first_line(root_cause(e))}; check --kubeconfig "
                              f"{self.kubeconfig} and that the cluster is up") from e
        body: Obj = json.loads(resp.data or b"{}")
        return body

    def _items(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any
               ) -> list[Obj]:
        body = self.call(what, fn, *args, **kwargs) or {}
        items: list[Obj] = body.get("items") or []
        return items

    # -- what the commands read ------------------------------------------------------

    def link_crd(self) -> Obj | None:
        return self.call(f"read CustomResourceDefinition {LINK_CRD}",
                         self.extensions.read_custom_resource_definition, LINK_CRD)

    def links(self) -> list[Obj]:
        """The Links of the namespace, by name; [] when the CRD is not installed."""
        items = self._items(f"list Links in namespace {self.namespace}",
                            self.custom.list_namespaced_custom_object, GROUP, VERSION,
                            self.namespace, PLURAL)
        return sorted(items, key=lambda o: str(o["metadata"]["name"]))

    def all_links(self) -> list[Obj]:
        """The Links of every namespace: a mirror is orphaned only if none names its cluster."""
        return self._items("list Links", self.custom.list_cluster_custom_object, GROUP,
                           VERSION, PLURAL)

    def services(self) -> list[Obj]:
        """Every Service of the cluster: mirrors, and what may sit where one should."""
        return self._items("list Services", self.core.list_service_for_all_namespaces)

    def mirror_slices(self) -> list[Obj]:
        """The EndpointSlices mirror controllers write."""
        return self._items("list EndpointSlices",
                           self.discovery.list_endpoint_slice_for_all_namespaces,
                           label_selector=f"{MANAGED_BY_LABEL}={MANAGED_BY},"
                           f"{MIRRORED_LABEL}=true")

    def slices_of(self, namespace: str, service: str) -> list[Obj]:
        """The EndpointSlices of one Service."""
        return self._items(f"list EndpointSlices of {namespace}/{service}",
                           self.discovery.list_namespaced_endpoint_slice, namespace,
                           label_selector=f"{SERVICE_NAME_LABEL}={service}")

    def serving(self, link: str, *, namespace: str | None = None) -> Serving:
        """Who holds the Lease of the Link (of this namespace, or `namespace`), and
        whether they still renew it."""
        name = lease_name(link)
        where = namespace or self.namespace
        lease = self.call(f"read Lease {where}/{name}",
                          self.coordination.read_namespaced_lease, name, where)
        spec = (lease or {}).get("spec") or {}
        holder = str(spec.get("holderIdentity") or "")
        if not holder:
            return Serving("", f"nothing holds its Lease {where}/{name}")
        age = _age(spec.get("renewTime"))
        duration = float(spec.get("leaseDurationSeconds") or 15)
        if age is None or age > duration + LEASE_SLACK:
            when = f"{age:.0f}s ago" if age is not None else "at an unknown time"
            return Serving(holder, f"its Lease {where}/{name} was last renewed "
                           f"{when} by {holder}, which has stopped")
        return Serving(holder, "")

    def config_map(self, namespace: str, name: str) -> Obj | None:
        return self.call(f"read ConfigMap {namespace}/{name}",
                         self.core.read_namespaced_config_map, name, namespace)


def _age(stamp: Any) -> float | None:
    """Seconds since an RFC 3339 time, by this machine's clock."""
    if not isinstance(stamp, str):
        return None
    try:
        when = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (dt.datetime.now(dt.UTC) - when).total_seconds()
