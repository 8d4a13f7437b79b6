"""`meshgate check` against the embedded cluster, as a user runs it: `--pre` as the
administrator and as a user lacking rights; after `meshgate install` applied with
kubectl, each failure until what it checks holds; an expired and a soon-to-expire
issuer; and `--proxy` over meshed pods. No process serves the injector here (the
control plane's pods are reported ready by the test, not run), so its dry-run probe
comes back without a proxy, or refused with failurePolicy Fail, and that one check
fails throughout; tests/e2e/test_manifests.py shows the whole check passing with the
injector a kubelet runs."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from mesh.identity import ca
from mesh.identity.bundle import rfc3339
from mesh.identity.ca import IssuerDir
from mesh.image import VERSION, reference
from tests.cluster import Cluster, wait_for

Obj = dict[str, Any]
MESHED_NS = "shop"
CA_BUNDLE = base64.b64encode(ca.cert_pem(ca.new_anchor(
    "cluster.local", lifetime=timedelta(days=365), now=datetime.now(UTC)).cert)).decode()
"""The CA of the injector's serving certificate, as the webhook carries it."""


def meshgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh.cli", *args], capture_output=True,
                          text=True, timeout=120)


def check(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return meshgate("check", "--kubeconfig", str(cluster.kubeconfig), *args)


def results(cluster: Cluster, *args: str) -> tuple[int, dict[str, Obj]]:
    """The exit status and each check of `check -o json`, by description."""
    proc = check(cluster, *args, "-o", "json")
    doc = json.loads(proc.stdout)
    assert doc["success"] is (proc.returncode == 0), proc.stdout
    return proc.returncode, {c["description"]: c for cat in doc["categories"]
                             for c in cat["checks"]}


def failed(checks: dict[str, Obj]) -> dict[str, Obj]:
    return {d: c for d, c in checks.items() if c["result"] != "success"}


def errors(checks: dict[str, Obj]) -> set[str]:
    return {d for d, c in checks.items() if c["result"] == "error"}


ANSWERS = "proxy injector answers the API server"
NO_ANSWER = ("a dry-run Pod asking for injection in namespace default came back without the "
             "proxy: the injector did not answer (failurePolicy Ignore admits pods without "
             "it), or the webhook's selectors leave that namespace out")


def test_pre_passes_for_the_administrator(cluster: Cluster) -> None:
    proc = check(cluster, "--pre")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:3] == ["kubernetes-api", "--------------", "\u221a can initialize the client"]
    for line in ("\u221a is running the minimum Kubernetes API version",
                 "\u221a control plane namespace does not already exist",
                 "\u221a can create CustomResourceDefinitions",
                 "\u221a can create ClusterRoleBindings", "\u221a can create Deployments",
                 "\u221a can create Secrets", "\u221a can create MutatingWebhookConfigurations"):
        assert line in lines, proc.stdout
    assert lines[-1] == "Status check results are \u221a"


def test_pre_names_each_permission_a_user_lacks(cluster: Cluster) -> None:
    # installer may create Namespaces and CRDs, and in meshgate only ConfigMaps and Secrets
    cluster.kubectl("create", "clusterrole", "half-installer", "--verb=create",
                    "--resource=namespaces,customresourcedefinitions.apiextensions.k8s.io")
    cluster.kubectl("create", "clusterrolebinding", "half-installer",
                    "--clusterrole=half-installer", "--user=installer")
    cluster.kubectl("create", "namespace", "meshgate")
    cluster.kubectl("-n", "meshgate", "create", "role", "half-installer", "--verb=create",
                    "--resource=configmaps,secrets")
    cluster.kubectl("-n", "meshgate", "create", "rolebinding", "half-installer",
                    "--role=half-installer", "--user=installer")
    try:
        proc = check(cluster, "--pre", "--as", "installer")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        lines = proc.stdout.splitlines()
        for kind in ("CustomResourceDefinitions", "Namespaces", "ConfigMaps", "Secrets"):
            assert f"\u221a can create {kind}" in lines, proc.stdout
        for missing in ("serviceaccounts in namespace meshgate",
                        "clusterroles.rbac.authorization.k8s.io cluster-wide",
                        "clusterrolebindings.rbac.authorization.k8s.io cluster-wide",
                        "roles.rbac.authorization.k8s.io in namespace meshgate",
                        "rolebindings.rbac.authorization.k8s.io in namespace meshgate",
                        "deployments.apps in namespace meshgate",
                        "services in namespace meshgate",
                        "poddisruptionbudgets.policy in namespace meshgate",
                        "mutatingwebhookconfigurations.admissionregistration.k8s.io "
                        "cluster-wide"):
            assert f"    not allowed to create {missing}" in lines, proc.stdout
        assert "\u00d7 can create Deployments" in lines
        # RBAC refuses a role granting what its creator does not hold (no escalate verb)
        assert "\u00d7 can grant the rights of meshgate's roles" in lines
        assert ("    ClusterRole meshgate-injector grants what you do not hold: namespaces "
                "(get); servicecidrs.networking.k8s.io (list)") in lines, proc.stdout
        assert ("    Role meshgate-control in namespace meshgate grants what you do not hold: "
                "configmaps meshgate-identity-trust-roots (get, update)") in lines
        assert lines[-1] == "Status check results are \u00d7"
        # the Namespace is there (a warning: it does not fail the run), and unreadable
        # to the installer, which is no failure either
        code, checks = results(cluster, "--pre")
        assert code == 0
        ns = checks["control plane namespace does not already exist"]
        assert ns["result"] == "warning"
        assert ns["error"] == "the Namespace meshgate already exists"
        _, checks = results(cluster, "--pre", "--as", "installer")
        assert checks["control plane namespace does not already exist"]["result"] == "warning"
    finally:
        cluster.kubectl("delete", "namespace", "meshgate", "--wait=true")
        cluster.kubectl("delete", "clusterrolebinding,clusterrole", "half-installer")


def test_pre_as_a_member_of_a_group_of_administrators(cluster: Cluster) -> None:
    cluster.kubectl("create", "clusterrolebinding", "mesh-admins", "--clusterrole=cluster-admin",
                    "--group=mesh-admins")
    try:
        assert results(cluster, "--pre", "--as", "bob")[0] == 1
        code, checks = results(cluster, "--pre", "--as", "bob", "--as-group", "mesh-admins")
        assert code == 0, failed(checks)
        assert checks["can grant the rights of meshgate's roles"]["result"] == "success"
    finally:
        cluster.kubectl("delete", "clusterrolebinding", "mesh-admins")


def test_flags_that_do_not_go_together(cluster: Cluster, tmp_path: Path) -> None:
    for args, message in ((("--pre", "--proxy"), "--pre and --proxy go apart"),
                          (("--namespace", "x"), "give --proxy too"),
                          (("--as-group", "g"), "--as-group needs --as USER")):
        proc = check(cluster, *args)
        assert proc.returncode == 2
        assert proc.stdout == ""
        assert proc.stderr.startswith("meshgate: ") and message in proc.stderr
        assert len(proc.stderr.splitlines()) == 1
    proc = meshgate("check", "--kubeconfig", str(tmp_path / "nope"))
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[2:5] == [
        "\u00d7 can initialize the client", f"    kubeconfig {tmp_path / 'nope'} does not exist",
        "    fix: give --kubeconfig the file of your cluster"]
    proc = check(cluster, "--context", "elsewhere")
    assert proc.returncode == 1
    assert "\u00d7 can initialize the client\n" in proc.stdout
    assert "Expected object with name elsewhere" in proc.stdout
    # an API server that is not there: nothing more is asked
    dead = tmp_path / "dead"
    dead.write_text(cluster.kubeconfig.read_text().replace(cluster.server,
                                                           "https://127.0.0.1:1"))
    proc = meshgate("check", "--kubeconfig", str(dead))
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[2:] == [
        "\u221a can initialize the client", "\u00d7 can query the Kubernetes API",
        "    https://127.0.0.1:1: [Errno 111] Connection refused",
        "    fix: check that the API server is up and reachable from here (kubectl get --raw "
        "/version)", "", "Status check results are \u00d7"]


def test_an_empty_cluster_fails_naming_the_fixes(cluster: Cluster) -> None:
    proc = check(cluster)
    assert proc.returncode == 1
    out = proc.stdout
    assert "\u00d7 control plane CustomResourceDefinitions exist\n" in out
    assert "    missing links.multicluster.meshgate.io\n" in out
    assert "    fix: meshgate install --crds | kubectl apply -f -\n" in out
    assert ("\u00d7 control plane Namespace exists\n    the Namespace meshgate does not exist: "
            "meshgate is not installed\n    fix: meshgate install --crds | kubectl apply -f -, "
            "then meshgate install --identity-dir DIR | kubectl apply -f -\n") in out
    # the Namespace's failure is fatal: nothing in it is looked for
    assert "meshgate-identity" not in out
    assert out.endswith("Status check results are \u00d7\n")


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("identity") / "id"
    assert meshgate("identity", "init", "--trust-domain", "cluster.local", "--out",
                    str(out)).returncode == 0
    return out


def install(cluster: Cluster, identity: Path) -> None:
    rest = meshgate("install", "--identity-dir", str(identity))
    assert rest.returncode == 0, rest.stderr
    cluster.kubectl("apply", "-f", "-", input=rest.stdout)


@pytest.fixture(scope="module")
def installed(cluster: Cluster, identity: Path) -> Cluster:
    crds = meshgate("install", "--crds")
    cluster.kubectl("apply", "-f", "-", input=crds.stdout)
    cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=30s")
    install(cluster, identity)
    return cluster


def core(cluster: Cluster) -> Any:
    return client.CoreV1Api(cluster.api())


def mark_ready(cluster: Cluster, pod: Any, *, proxy_ready: bool = True) -> None:
    """What a kubelet reports for a pod whose containers started and pass their probes:
    the embedded cluster has a kubelet only under `cluster up`, so the test reports it,
    and the ReplicaSet and Deployment controllers count the pod available from it."""
    spec = pod.spec
    statuses = [{"name": c.name, "ready": True, "restartCount": 0, "image": c.image,
                 "imageID": "", "started": True, "state": {"running": {}}}
                for c in spec.containers]
    inits = [{"name": c.name, "ready": proxy_ready, "restartCount": 0, "image": c.image,
              "imageID": "", "started": True, "state": {"running": {}}}
             for c in spec.init_containers or []]
    ready = "True" if proxy_ready else "False"
    core(cluster).patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace, {
        "status": {"phase": "Running", "podIP": "10.244.0.7",
                   "conditions": [{"type": "Ready", "status": ready}],
                   "containerStatuses": statuses, "initContainerStatuses": inits}})


def test_after_install_each_deployment_fails_until_available(installed: Cluster) -> None:
    code, checks = results(installed)
    assert code == 1
    for ok in ("control plane CustomResourceDefinitions exist",
               "control plane CustomResourceDefinitions are established",
               "control plane Namespace exists", "control plane and cli versions match",
               "issuer Secret and trust roots exist",
               "issuer certificate is issued by the trust roots",
               "issuer certificate is within the validity period",
               "issuer certificate is valid for at least 30 days"):
        assert checks[ok]["result"] == "success", checks[ok]
    for name in ("meshgate-control", "meshgate-gateway", "meshgate-mirror"):
        bad = checks[f"Deployment {name} is available"]
        assert bad["result"] == "error"
        assert bad["error"].startswith("0 of 1 replicas available")
        assert bad["hint"].startswith(f"kubectl -n meshgate describe deployment {name}")
    pods = wait_for(lambda: [p for p in core(installed).list_namespaced_pod("meshgate").items
                             if p.status.phase == "Pending"] or None, what="the pods")
    assert len(pods) == 3
    for pod in pods:
        mark_ready(installed, pod)

    def available() -> dict[str, Obj] | None:
        _, checks = results(installed)
        return None if any(d.startswith("Deployment ") for d in failed(checks)) else checks

    checks = wait_for(available, timeout=30, interval=0.3, what="the Deployments available")
    # install renders the injector too; its Service has the control plane's now ready
    # pod, but nothing serves it here
    assert set(failed(checks)) == {ANSWERS}
    assert checks[ANSWERS]["error"] == NO_ANSWER


def injector(cluster: Cluster, *, failure_policy: str = "Ignore") -> None:
    """The injector's Service and webhook by the names the check looks for, with the
    failurePolicy given (install renders Ignore); only pods of namespaces that ask for
    injection are sent to it, so nothing else of these tests is."""
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                    "items": [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "meshgate-injector", "namespace": "meshgate"},
         "spec": {"selector": {"app.kubernetes.io/name": "meshgate-control"},
                  "ports": [{"name": "injector", "port": 443, "targetPort": 8443}]}},
        {"apiVersion": "admissionregistration.k8s.io/v1",
         "kind": "MutatingWebhookConfiguration",
         "metadata": {"name": "meshgate-proxy-injector"},
         "webhooks": [{"name": "proxy-injector.meshgate.io", "admissionReviewVersions": ["v1"],
                       "sideEffects": "None", "failurePolicy": failure_policy,
                       "clientConfig": {"service": {"name": "meshgate-injector",
                                                    "namespace": "meshgate",
                                                    "path": "/inject", "port": 443},
                                        "caBundle": CA_BUNDLE},
                       "namespaceSelector": {"matchLabels": {"meshgate.io/inject": "enabled"}},
                       "rules": [{"operations": ["CREATE"], "apiGroups": [""],
                                  "apiVersions": ["v1"], "resources": ["pods"]}]}]}]}))


def test_the_injector_must_exist_and_have_ready_endpoints(installed: Cluster) -> None:
    installed.kubectl("delete", "mutatingwebhookconfiguration", "meshgate-proxy-injector",
                      "--ignore-not-found")
    proc = check(installed)
    assert proc.returncode == 1
    assert ("\u00d7 proxy injector MutatingWebhookConfiguration meshgate-proxy-injector exists\n"
            "    there is no MutatingWebhookConfiguration meshgate-proxy-injector: pods are not "
            "injected with a proxy\n    fix: install a meshgate that ships the proxy injector: "
            "meshgate install --identity-dir DIR | kubectl apply -f -\n") in proc.stdout
    injector(installed, failure_policy="Fail")
    # the control plane's pod is not ready: the webhook has nobody to answer it
    control = next(p for p in core(installed).list_namespaced_pod("meshgate").items
                   if p.metadata.labels["app.kubernetes.io/name"] == "meshgate-control")
    core(installed).patch_namespaced_pod_status(control.metadata.name, "meshgate", {
        "status": {"conditions": [{"type": "Ready", "status": "False"}]}})

    def injector_down() -> Obj | None:
        _, checks = results(installed)
        return checks.get("proxy injector Service meshgate-injector has ready endpoints")

    down = wait_for(lambda: (c := injector_down()) and c["result"] == "error" and c,
                    what="the injector without endpoints")
    assert down["error"] == ("the Service meshgate/meshgate-injector has no ready endpoints, "
                             "so the webhook cannot answer: with failurePolicy Fail, pods it "
                             "selects are refused")
    mark_ready(installed, control)
    # this webhook selects annotated namespaces only: the probe in default is not sent
    unasked = wait_for(lambda: (c := results(installed)[1].get(ANSWERS)) and c,
                       timeout=30, interval=0.3, what="the injector's probe")
    assert unasked["error"] == ("a dry-run Pod asking for injection in namespace default "
                                "came back without the proxy: the injector did not answer, "
                                "or the webhook's selectors leave that namespace out")
    injector(installed)
    wait_for(lambda: set(failed(results(installed)[1])) == {ANSWERS}, timeout=30,
             interval=0.3, what="every check but the injector's answer to pass")
    proc = check(installed)
    assert proc.returncode == 1, proc.stdout
    assert [line for line in proc.stdout.splitlines() if line.startswith("\u00d7")] == [
        f"\u00d7 {ANSWERS}"]
    assert "\u203c" not in proc.stdout


def reissue(identity: Path, *, valid_from: datetime, lifetime: timedelta) -> datetime:
    """A new anchor and an issuer under it valid from `valid_from` for `lifetime` (as
    `meshgate identity init --force` at that time); the issuer's notAfter."""
    _, issuer = IssuerDir(identity).init("cluster.local", anchor_lifetime=timedelta(days=3650),
                                         issuer_lifetime=lifetime, now=valid_from, force=True)
    return issuer.cert.not_valid_after_utc


def test_an_expired_issuer_fails_naming_its_not_after(installed: Cluster,
                                                      identity: Path) -> None:
    now = datetime.now(UTC)
    not_after = reissue(identity, valid_from=now - timedelta(days=3), lifetime=timedelta(days=1))
    install(installed, identity)
    code, checks = results(installed)
    assert code == 1
    expired = checks["issuer certificate is within the validity period"]
    assert expired["result"] == "error"
    assert f"expired: notAfter {rfc3339(not_after)}" in expired["error"]
    assert "meshgate identity rotate" in expired["hint"]
    assert set(failed(checks)) == {"issuer certificate is within the validity period",
                                   ANSWERS}


def test_a_soon_to_expire_issuer_warns_and_passes(installed: Cluster, identity: Path) -> None:
    not_after = reissue(identity, valid_from=datetime.now(UTC), lifetime=timedelta(days=10))
    install(installed, identity)
    proc = check(installed)
    assert ("\u203c issuer certificate is valid for at least 30 days\n"
            "    identity.meshgate.cluster.local") in proc.stdout
    assert f"expires soon: notAfter {rfc3339(not_after)}\n" in proc.stdout
    _, checks = results(installed)
    assert errors(checks) == {ANSWERS}  # the warning fails nothing
    reissue(identity, valid_from=datetime.now(UTC), lifetime=timedelta(days=365))
    install(installed, identity)


def meshed_pod(cluster: Cluster, name: str, *, version: str = VERSION) -> Any:
    return core(cluster).create_namespaced_pod(MESHED_NS, {
        "metadata": {"name": name, "annotations": {"meshgate.io/proxy-version": version}},
        "spec": {"initContainers": [{"name": "meshgate-proxy", "image": reference(version),
                                     "restartPolicy": "Always"}],
                 "containers": [{"name": "app", "image": "app"}]}})


def test_proxy_checks_every_meshed_pod(installed: Cluster) -> None:
    installed.kubectl("create", "namespace", MESHED_NS)
    code, checks = results(installed, "--proxy", "--namespace", MESHED_NS)
    assert code == 1
    assert checks["data plane proxies are ready"]["error"] == (
        f"no pods with a meshgate-proxy container in namespace {MESHED_NS}")
    web = meshed_pod(installed, "web")
    code, checks = results(installed, "--proxy", "--namespace", MESHED_NS)
    assert code == 1
    assert checks["data plane proxies are ready"]["error"] == (
        f"meshgate-proxy not ready in {MESHED_NS}/web")
    mark_ready(installed, web)
    old = meshed_pod(installed, "old", version="0.0.9")
    mark_ready(installed, old)
    proc = check(installed, "--proxy", "--namespace", MESHED_NS)
    _, checks = results(installed, "--proxy", "--namespace", MESHED_NS)
    assert errors(checks) == {ANSWERS}, proc.stdout  # version skew warns, as Linkerd's
    assert "\u221a data plane proxies are ready\n" in proc.stdout
    assert ("\u203c data plane and control plane versions match\n"
            f"    the control plane runs {VERSION}; proxies of another version: "
            f"{MESHED_NS}/old (0.0.9)\n") in proc.stdout
    mark_ready(installed, old, proxy_ready=False)
    code, checks = results(installed, "--proxy")  # every namespace
    assert code == 1
    assert checks["data plane proxies are ready"]["error"] == (
        f"meshgate-proxy not ready in {MESHED_NS}/old")
    code, checks = results(installed, "--proxy", "--namespace", "nowhere")
    assert checks["data plane namespace exists"]["error"] == (
        "the Namespace nowhere does not exist")
