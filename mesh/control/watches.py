"""The informers on Kubernetes that the control plane's indexes and the gateway keep:
Pods, EndpointSlices and Services for destinations, ExternalWorkloads, and the policy
resources. Only the watching is here, so a process that needs the watches does not
import the control plane's HTTP servers."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable

from kubernetes import client

from mesh.control.externalworkloads import GROUP as WORKLOAD_GROUP
from mesh.control.externalworkloads import PLURAL as WORKLOAD_PLURAL
from mesh.control.externalworkloads import VERSION as WORKLOAD_VERSION
from mesh.control.policy import (
    AUTHORIZATION_POLICY,
    GROUP,
    MESH_TLS_AUTHENTICATION,
    PLURALS,
    SERVER,
    VERSION,
)
from mesh.discovery.index import SERVICE_NAME_LABEL
from mesh.informer import Handler, Informer, Obj


def watch_destinations(kube: client.ApiClient, loop: asyncio.AbstractEventLoop, *,
                       pods: Handler, slices: Handler, services: Handler,
                       workloads: Handler | None = None) -> list[Informer]:
    """Start the informers a `DestinationIndex` needs, each calling its handler on `loop`
    (hand each event to the index's ``pod_event``, ``slice_event``, ``service_event`` and
    ``workload_event``); ExternalWorkloads are watched when `workloads` is given."""
    core, disc = client.CoreV1Api(kube), client.DiscoveryV1Api(kube)
    informers = [
        Informer(core.list_pod_for_all_namespaces, kind="pods", handler=pods),
        Informer(disc.list_endpoint_slice_for_all_namespaces, kind="endpointslices",
                 label_selector=SERVICE_NAME_LABEL, handler=slices),
        Informer(core.list_service_for_all_namespaces, kind="services", handler=services),
    ]
    if workloads is not None:
        informers.append(watch_workloads(kube, workloads))
    for informer in informers:
        informer.start(loop)
    return informers


def watch_workloads(kube: client.ApiClient, handler: Handler) -> Informer:
    """An informer (not yet started) on every ExternalWorkload, calling `handler`."""
    custom = client.CustomObjectsApi(kube)
    return Informer(functools.partial(custom.list_cluster_custom_object, WORKLOAD_GROUP,
                                      WORKLOAD_VERSION, WORKLOAD_PLURAL),
                    kind=WORKLOAD_PLURAL, handler=handler)


def watch_policy_resources(kube: client.ApiClient, loop: asyncio.AbstractEventLoop,
                           handler: Callable[[str, str, Obj], None]) -> list[Informer]:
    """Start informers on Servers, MeshTLSAuthentications and AuthorizationPolicies that
    call ``handler(kind, event, obj)`` on `loop` (for `PolicyIndex.apply`)."""
    custom = client.CustomObjectsApi(kube)
    informers = []
    for kind in (SERVER, MESH_TLS_AUTHENTICATION, AUTHORIZATION_POLICY):
        informer = Informer(functools.partial(custom.list_cluster_custom_object, GROUP,
                                              VERSION, PLURALS[kind]),
                            kind=PLURALS[kind], handler=functools.partial(handler, kind))
        informers.append(informer)
        informer.start(loop)
    return informers
