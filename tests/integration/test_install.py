"""`meshgate install` applied with kubectl to the embedded cluster, as on a real
one: the CRDs first, then the rest; each step idempotent and equal to
``kubectl apply -k deploy/``; and each component's ServiceAccount allowed what its
code calls and nothing of the Secrets (``kubectl auth can-i --as``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mesh.manifests import CRDS, DEPLOY_DIR
from tests.cluster import Cluster

CONTROL = "system:serviceaccount:meshgate:meshgate-control"
GATEWAY = "system:serviceaccount:meshgate:meshgate-gateway"
MIRROR = "system:serviceaccount:meshgate:meshgate-mirror"
INJECTOR = "system:serviceaccount:meshgate:meshgate-injector"


def meshgate(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "mesh.cli", *args], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return proc.stdout.splitlines()


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("identity") / "id"
    meshgate("identity", "init", "--trust-domain", "cluster.local", "--out", str(out))
    (out / "anchor.key").unlink()  # kept offline: install does not need it
    return out


@pytest.fixture(scope="module")
def installed(cluster: Cluster, identity: Path) -> str:
    crds = meshgate("install", "--crds")
    dry = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=crds)
    assert all(line.endswith("created (server dry run)") for line in lines(dry)), dry.stdout
    assert cluster.kubectl("get", "crd", "links.multicluster.meshgate.io",
                           check=False).returncode == 1  # a dry run persists nothing
    cluster.kubectl("apply", "-f", "-", input=crds)
    cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=30s")
    rest = meshgate("install", "--identity-dir", str(identity))
    applied = cluster.kubectl("apply", "-f", "-", input=rest)
    assert all(line.endswith(" created") for line in lines(applied)), applied.stdout
    return rest


def test_install_applies_every_object_once(cluster: Cluster, installed: str) -> None:
    rendered = [d for d in yaml.safe_load_all(installed) if d]
    assert len(lines(cluster.kubectl("apply", "-f", "-", input=installed))) == len(rendered)
    for proc in (cluster.kubectl("apply", "-f", "-", input=installed),
                 cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=installed)):
        assert all(" unchanged" in line for line in lines(proc)), proc.stdout
    deployments = cluster.kubectl("get", "deployments", "-n", "meshgate", "-o",
                                  "jsonpath={.items[*].metadata.name}").stdout.split()
    assert sorted(deployments) == ["meshgate-control", "meshgate-gateway", "meshgate-mirror"]
    service = yaml.safe_load(cluster.kubectl("get", "service", "-n", "meshgate",
                                             "meshgate-gateway", "-o", "yaml").stdout)
    assert service["spec"]["type"] == "LoadBalancer"
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "mc-gateway": 4143, "mc-probe": 4191}


def test_kubectl_apply_k_finds_the_same_objects(cluster: Cluster, installed: str) -> None:
    # But for the injector's caBundle, which install renders from the identity directory
    # and a kustomize user fills in (deploy/injector.yaml): without it, apply drops it.
    injector = ("mutatingwebhookconfiguration.admissionregistration.k8s.io/"
                "meshgate-proxy-injector configured")
    for path in (CRDS, DEPLOY_DIR):
        proc = cluster.kubectl("apply", "-k", str(path))
        assert proc.stdout and all(" unchanged" in line or line == injector
                                   for line in lines(proc)), proc.stdout
    cluster.kubectl("apply", "-f", "-", input=installed)


def test_ha_is_accepted_with_its_disruption_budgets(cluster: Cluster, identity: Path,
                                                    installed: str) -> None:
    docs = [d for d in yaml.safe_load_all(meshgate("install", "--identity-dir", str(identity),
                                                   "--ha")) if d]
    assert [d["kind"] for d in docs].count("PodDisruptionBudget") == 2
    proc = cluster.kubectl("apply", "--dry-run=server", "-f", "-",
                           input=yaml.safe_dump_all(docs))
    changed = [line for line in lines(proc) if " configured" in line or " created" in line]
    assert sorted(changed) == [
        "deployment.apps/meshgate-control configured (server dry run)",
        "deployment.apps/meshgate-gateway configured (server dry run)",
        "poddisruptionbudget.policy/meshgate-control created (server dry run)",
        "poddisruptionbudget.policy/meshgate-gateway created (server dry run)"]


def can_i(cluster: Cluster, who: str, *request: str) -> bool:
    proc = cluster.kubectl("auth", "can-i", *request, f"--as={who}", check=False)
    assert proc.stdout.strip() in ("yes", "no"), proc.stdout + proc.stderr
    return proc.stdout.strip() == "yes"


@pytest.mark.parametrize(("who", "asked", "allowed"), [
    # the control plane: its informers, the ExternalWorkloads' slices, TokenReviews and
    # the trust roots ConfigMap
    (CONTROL, "list pods -A", True),
    (CONTROL, "watch services -A", True),
    (CONTROL, "watch endpointslices.discovery.k8s.io -A", True),
    (CONTROL, "create endpointslices.discovery.k8s.io -n default", True),
    (CONTROL, "update endpointslices.discovery.k8s.io -n default", True),
    (CONTROL, "delete endpointslices.discovery.k8s.io -n default", True),
    (CONTROL, "list externalworkloads.workload.meshgate.io -A", True),
    (CONTROL, "watch authorizationpolicies.policy.meshgate.io -A", True),
    (CONTROL, "create tokenreviews.authentication.k8s.io -A", True),
    (CONTROL, "create configmaps -n meshgate", True),
    (CONTROL, "update configmaps/meshgate-identity-trust-roots -n meshgate", True),
    (CONTROL, "update configmaps/meshgate-kubeconfig -n meshgate", False),
    (CONTROL, "get secrets -A", False),
    (CONTROL, "list secrets -A", False),
    (CONTROL, "get secrets/meshgate-identity-issuer -n meshgate", False),
    (CONTROL, "create pods -n default", False),
    (CONTROL, "patch services -n default", False),
    # the gateway reads and writes nothing
    (GATEWAY, "watch pods -A", True),
    (GATEWAY, "list servers.policy.meshgate.io -A", True),
    (GATEWAY, "create endpointslices.discovery.k8s.io -n default", False),
    (GATEWAY, "list secrets -A", False),
    # the mirror controller: mirrors anywhere, its Links, credentials and Leases at home
    (MIRROR, "create services -n default", True),
    (MIRROR, "patch endpointslices.discovery.k8s.io -n default", True),
    (MIRROR, "create namespaces -A", True),
    (MIRROR, "patch links.multicluster.meshgate.io -n meshgate", True),
    (MIRROR, "patch links.multicluster.meshgate.io --subresource=status -n meshgate", True),
    (MIRROR, "update leases.coordination.k8s.io -n meshgate", True),
    (MIRROR, "get secrets -n meshgate", True),
    (MIRROR, "get secrets -n default", False),
    (MIRROR, "delete namespaces -A", False),
    (INJECTOR, "get namespaces -A", True),
    (INJECTOR, "list pods -A", False),
])
def test_each_component_may_do_what_its_code_calls_and_no_more(
        cluster: Cluster, installed: str, who: str, asked: str, allowed: bool) -> None:
    assert can_i(cluster, who, *asked.split()) is allowed


def test_join_tokens_reach_only_namespaces_bound_to_them(cluster: Cluster,
                                                          installed: str) -> None:
    cluster.kubectl("create", "namespace", "vms")
    assert not can_i(cluster, CONTROL, "get", "secrets", "-n", "vms")
    cluster.kubectl("-n", "vms", "create", "rolebinding", "meshgate-control-join-tokens",
                    "--clusterrole=meshgate-control-join-tokens",
                    "--serviceaccount=meshgate:meshgate-control")
    assert can_i(cluster, CONTROL, "get", "secrets", "-n", "vms")
    assert can_i(cluster, CONTROL, "delete", "secrets", "-n", "vms")
    assert not can_i(cluster, CONTROL, "get", "secrets", "-n", "default")


def test_uninstall_deletes_everything_install_made(cluster: Cluster, installed: str) -> None:
    proc = cluster.kubectl("delete", "-f", "-", "--wait=false",
                           input=meshgate("uninstall"))
    deleted = lines(proc)
    assert deleted[-1] == 'namespace "meshgate" deleted'
    assert len(deleted) == len([d for d in yaml.safe_load_all(installed) if d])
    assert cluster.kubectl("get", "clusterrole", "meshgate-control",
                           check=False).returncode == 1
    assert cluster.kubectl("get", "crd", "links.multicluster.meshgate.io").returncode == 0
