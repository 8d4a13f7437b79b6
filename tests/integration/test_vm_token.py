"""`meshgate vm token` against the embedded API server: the ExternalWorkload it
prepares, the agent credential limited to that one object, and the join line."""

from __future__ import annotations

import base64
import shlex
import subprocess
import sys
import uuid

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from mesh.control.crds import install_crds
from mesh.control.externalworkloads import GROUP, PLURAL, VERSION
from mesh.identity import jointoken
from tests.cluster import Cluster


def meshgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh.cli", *args], capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def ns(cluster: Cluster) -> str:
    api = cluster.api()
    install_crds(api)
    name = f"vm-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    core.create_namespaced_service_account(name, client.V1ServiceAccount(
        metadata=client.V1ObjectMeta(name="legacy")))
    return name


def _token(cluster: Cluster, ns: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return meshgate("vm", "token", "--kubeconfig", str(cluster.kubeconfig), "--namespace", ns,
                    "--workload", "legacy", "--service-account", "legacy", "--trust-domain",
                    "cluster.local", "--control-plane", "https://172.30.0.2:8086", *extra)


def test_vm_token_prepares_the_workload_and_prints_the_join_line(cluster: Cluster,
                                                                 ns: str) -> None:
    out = _token(cluster, ns, "--gateway", "172.30.0.2:4143", "--label", "app=legacy",
                 "--port", "http:8080", "--ttl", "10m")
    assert out.returncode == 0, out.stderr
    line = shlex.split(out.stdout.strip())
    assert line[:3] == ["meshgate", "vm", "join"]
    args = dict(zip(line[3::2], line[4::2], strict=True))
    assert args["--control-plane"] == "https://172.30.0.2:8086"
    assert args["--gateway"] == "172.30.0.2:4143"
    assert jointoken.parse(args["--token"]).service_account == "legacy"
    ew = client.CustomObjectsApi(cluster.api()).get_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, "legacy")
    assert ew["metadata"]["labels"] == {"app": "legacy"}
    assert ew["spec"]["meshTLS"]["identity"] == \
        f"legacy.{ns}.serviceaccount.identity.meshgate.cluster.local"
    assert ew["spec"]["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
    assert ew["spec"]["workloadIPs"] == []
    # Redeeming hands over the agent's credential once, with the workload's name.
    grant = jointoken.redeem(client.CoreV1Api(cluster.api()), args["--token"])
    assert (grant.namespace, grant.workload, grant.service_account) == (ns, "legacy", "legacy")
    assert grant.agent is not None and grant.agent.server == cluster.server
    assert "BEGIN CERTIFICATE" in grant.agent.certificate_authority
    # Again: a new token, the same objects, labels merged.
    again = _token(cluster, ns, "--label", "tier=db", "--port", "http:8080")
    assert again.returncode == 0, again.stderr
    assert again.stdout != out.stdout
    ew = client.CustomObjectsApi(cluster.api()).get_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, "legacy")
    assert ew["metadata"]["labels"] == {"app": "legacy", "tier": "db"}


def test_the_agent_credential_reaches_its_one_workload_and_nothing_else(
        cluster: Cluster, ns: str) -> None:
    assert _token(cluster, ns).returncode == 0
    objects = client.CustomObjectsApi(cluster.api())
    other = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ExternalWorkload",
             "metadata": {"name": "other"}, "spec": {"meshTLS": {
                 "identity": "x.y.serviceaccount.identity.meshgate.cluster.local",
                 "serverName": "x.y.serviceaccount.identity.meshgate.cluster.local"}}}
    objects.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, other)
    secret = client.CoreV1Api(cluster.api()).read_namespaced_secret("meshgate-vm-legacy-token",
                                                                     ns)
    vm = client.CustomObjectsApi(cluster.api(base64.b64decode(secret.data["token"]).decode()))
    assert vm.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "legacy")
    vm.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "legacy",
                                      {"spec": {"workloadIPs": [{"ip": "172.30.0.9"}]}})
    vm.patch_namespaced_custom_object_status(GROUP, VERSION, ns, PLURAL, "legacy", {
        "status": {"conditions": [{"type": "Ready", "status": "True",
                                   "lastProbeTime": "2026-12-06T00:00:00Z",
                                   "lastTransitionTime": "2026-12-06T00:00:00Z",
                                   "reason": "Heartbeat", "message": ""}]}})
    refused = [
        lambda: vm.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "other"),
        lambda: vm.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "other",
                                                  {"spec": {"workloadIPs": []}}),
        lambda: vm.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "legacy"),
        lambda: vm.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, other),
        lambda: vm.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL),
        lambda: client.CoreV1Api(vm.api_client).list_namespaced_secret(ns),
        lambda: client.CoreV1Api(vm.api_client).list_namespaced_config_map(ns),
    ]
    for call in refused:
        with pytest.raises(ApiException) as e:
            call()
        assert e.value.status == 403


def test_vm_token_says_what_is_missing(cluster: Cluster, ns: str) -> None:
    out = meshgate("vm", "token", "--kubeconfig", str(cluster.kubeconfig), "--namespace", ns,
                   "--workload", "w", "--service-account", "nobody", "--control-plane",
                   "https://x:8086")
    assert out.returncode == 2 and f"ServiceAccount {ns}/nobody does not exist" in out.stderr
    out = meshgate("vm", "token", "--kubeconfig", str(cluster.kubeconfig), "--namespace", ns,
                   "--workload", "w", "--service-account", "legacy", "--control-plane",
                   "https://x:8086")
    assert out.returncode == 2 and "pass --trust-domain" in out.stderr
