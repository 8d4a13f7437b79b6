"""localcluster.kubepod: the Pod `cluster run-pod` asks for (valid for the supported
Kubernetes versions, before and after injection), and how its status is read: the
command's exit code, a failed injected container, a command the kubelet cannot
start."""

from __future__ import annotations

import sys
from typing import Any

import kubernetes_validate
import pytest
from kubernetes import client

from localcluster.kubepod import (
    PORTS_OPEN,
    TRUSTED_GATEWAYS,
    exit_code,
    failed_sidecar,
    manifest,
    not_startable,
)
from localcluster.pods import PodRequest
from mesh.image import reference
from mesh.inject import INIT_CONTAINER, PROXY_CONTAINER, Outcome, inject
from tests.unit.test_inject import SETTINGS
from tests.unit.test_install import VERSIONS

REQ = PodRequest(cluster="c", namespace="default", name="web-1", service_account="web",
                 command=("python3", "-m", "http.server", "8080"),
                 labels=(("app", "web"),), ports=(8080, 9090))
GATEWAY = "meshgate-gateway.meshgate.serviceaccount.identity.meshgate.example.org"


def test_the_pod_runs_the_command_in_meshgates_image_once() -> None:
    pod = manifest(REQ, pythonpath="/src")
    assert pod["metadata"] == {"name": "web-1", "namespace": "default",
                               "labels": {"app": "web"}}
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never" and spec["serviceAccountName"] == "web"
    (app,) = spec["containers"]
    assert app["image"] == reference()
    assert app["command"] == list(REQ.command)
    env = {e["name"]: e for e in app["env"]}
    assert {n: e["valueFrom"]["fieldRef"]["fieldPath"] for n, e in env.items()
            if "valueFrom" in e} == {"POD_NAME": "metadata.name",
                                     "POD_NAMESPACE": "metadata.namespace",
                                     "POD_IP": "status.podIP",
                                     "SERVICE_ACCOUNT": "spec.serviceAccountName"}
    assert env["PYTHONPATH"]["value"] == "/src"
    assert app["ports"] == [{"containerPort": 8080}, {"containerPort": 9090}]
    assert app["readinessProbe"]["exec"]["command"] == [sys.executable, "-c", PORTS_OPEN,
                                                        "8080", "9090"]
    for version in VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)


def test_without_ports_or_gateways_there_is_no_probe_or_annotation() -> None:
    pod = manifest(PodRequest(cluster="c", namespace="default", name="once",
                              service_account="default", command=("true",)))
    assert "annotations" not in pod["metadata"] and "labels" not in pod["metadata"]
    assert "readinessProbe" not in pod["spec"]["containers"][0]
    assert "PYTHONPATH" not in {e["name"] for e in pod["spec"]["containers"][0]["env"]}


def test_injected_the_proxy_trusts_the_gateway_and_stays_valid() -> None:
    pod = manifest(REQ, trusted_gateways=(GATEWAY,))
    assert pod["metadata"]["annotations"] == {TRUSTED_GATEWAYS: GATEWAY}
    out, reports = inject(pod, SETTINGS)
    assert [r.outcome for r in reports] == [Outcome.INJECTED]
    inits = out["spec"]["initContainers"]
    assert [c["name"] for c in inits] == [INIT_CONTAINER, PROXY_CONTAINER]
    env = {e["name"]: e.get("value") for e in inits[1]["env"]}
    assert env["MESHGATE_PROXY_INBOUND_TRUSTED_GATEWAYS"] == GATEWAY
    for version in VERSIONS:
        kubernetes_validate.validate(out, version, strict=True)


def status(**fields: Any) -> client.V1Pod:
    return client.V1Pod(status=client.V1PodStatus(**fields))


def app(state: client.V1ContainerState) -> client.V1ContainerStatus:
    return client.V1ContainerStatus(name="app", image="x", image_id="", ready=False,
                                    restart_count=0, state=state)


def terminated(code: int) -> client.V1ContainerState:
    return client.V1ContainerState(terminated=client.V1ContainerStateTerminated(
        exit_code=code))


def waiting(reason: str, message: str = "") -> client.V1ContainerState:
    return client.V1ContainerState(waiting=client.V1ContainerStateWaiting(
        reason=reason, message=message))


def test_the_exit_code_is_the_command_containers() -> None:
    assert exit_code(status()) is None
    assert exit_code(status(container_statuses=[app(waiting("PodInitializing"))])) is None
    assert exit_code(status(container_statuses=[app(terminated(3))])) == 3


def test_an_injected_container_that_failed_is_named() -> None:
    proxy = client.V1ContainerStatus(
        name=PROXY_CONTAINER, image="x", image_id="", ready=False, restart_count=1,
        state=waiting("CrashLoopBackOff"), last_state=terminated(2))
    init = client.V1ContainerStatus(name=INIT_CONTAINER, image="x", image_id="",
                                    ready=False, restart_count=0, state=terminated(0))
    assert failed_sidecar(status(init_container_statuses=[init, proxy])) == PROXY_CONTAINER
    assert failed_sidecar(status(init_container_statuses=[init])) is None
    # Once the command has ended, its exit code is what counts.
    assert failed_sidecar(status(init_container_statuses=[init, proxy],
                                 container_statuses=[app(terminated(0))])) is None


@pytest.mark.parametrize(("state", "why"), [
    (waiting("PodInitializing"), None),
    (waiting("ContainerCreating"), None),
    (waiting("CreateContainerConfigError", 'configmap "x" not found'),
     'CreateContainerConfigError: configmap "x" not found'),
])
def test_a_command_the_kubelet_cannot_start_is_reported(state: client.V1ContainerState,
                                                        why: str | None) -> None:
    assert not_startable(status(container_statuses=[app(state)])) == why
