"""Injection on the embedded cluster, as on kind: `meshgate inject deploy.yaml | kubectl
apply -f -`, the kubelet runs meshgate-init, then the meshgate-proxy sidecar, then the
app; the pods go Ready; an injected client calls the server by its Service name over
mTLS (the server's proxy counts the client's identity); `meshgate uninject` applied
the same way gives pods without the proxy.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pyroute2 import netns

from tests.cluster import wait_for
from tests.e2e.onecluster import OneCluster
from tests.e2e.pod_scripts import GET

NAME = "mginject"
PREFIX = f"mg-{NAME}-"
SERVICE_CIDR = "10.226.0.0/16"
KUBECTL = str(Path(sys.executable).parent / "kubectl")
ROOT = Path(__file__).resolve().parents[2]
CLIENT_ID = "client.default.serviceaccount.identity.meshgate.cluster.local"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def manifests() -> str:
    """A server (the demo app behind Service web) and a client that idles, each with
    its ServiceAccount: plain manifests, nothing of the mesh in them."""
    env = [{"name": "PYTHONPATH", "value": str(ROOT)},
           {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "POD_NAMESPACE",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]
    docs: list[dict[str, Any]] = []
    for app, command in (
            ("web", [sys.executable, "-m", "localcluster.demoapp", "--port", "8080"]),
            ("client", [sys.executable, "-c", "import time; time.sleep(1e9)"])):
        docs.append({"apiVersion": "v1", "kind": "ServiceAccount",
                     "metadata": {"name": app, "namespace": "default"}})
        docs.append({"apiVersion": "apps/v1", "kind": "Deployment",
                     "metadata": {"name": app, "namespace": "default"},
                     "spec": {"replicas": 1, "selector": {"matchLabels": {"app": app}},
                              "template": {"metadata": {"labels": {"app": app}}, "spec": {
                                  "serviceAccountName": app,
                                  "terminationGracePeriodSeconds": 5,
                                  "containers": [{"name": app, "image": "python",
                                                  "command": command, "env": env}]}}}})
    docs.append({"apiVersion": "v1", "kind": "Service",
                 "metadata": {"name": "web", "namespace": "default"},
                 "spec": {"selector": {"app": "web"},
                          "ports": [{"port": 80, "targetPort": 8080}]}})
    return "".join("---\n" + json.dumps(d) + "\n" for d in docs)


class Cluster(OneCluster):
    def pods(self, app: str) -> list[dict[str, Any]]:
        out = self.kubectl("get", "pods", "-l", f"app={app}", "-o", "json").stdout
        return [p for p in json.loads(out)["items"]
                if not p["metadata"].get("deletionTimestamp")]

    def ready_pod(self, app: str) -> dict[str, Any] | None:
        pods = self.pods(app)
        for pod in pods:
            conditions = {c["type"]: c["status"]
                          for c in (pod.get("status") or {}).get("conditions") or []}
            if len(pods) == 1 and conditions.get("Ready") == "True":
                return pod
        return None

    def exec(self, pod: str, container: str, script: str, *args: str) -> str:
        return self.kubectl("exec", pod, "-c", container, "--", sys.executable, "-c", script,
                            *args).stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("inject")
    env = {**os.environ, "MESHGATE_RUN_DIR": str(base / "run"), "PYTHONUNBUFFERED": "1"}
    c = Cluster(base, env)
    c.meshgate("cluster", "up", "--name", NAME, "--state-dir", str(base / "state"),
               "--pod-cidr", "10.225.0.0/16", "--service-cidr", SERVICE_CIDR)
    try:
        yield c
    finally:
        c.meshgate("cluster", "down", "--name", NAME, check=False)
    assert not [n for n in netns.listnetns() if n.startswith(PREFIX)]


def started(status: dict[str, Any]) -> dt.datetime:
    state = status["state"]
    at = (state.get("running") or state.get("terminated"))["startedAt"]
    return dt.datetime.fromisoformat(at)


def test_injected_pods_start_in_order_and_call_each_other_over_mtls(
        cluster: Cluster) -> None:
    wait_for(lambda: cluster.kubectl("get", "configmap", "-n", "meshgate",
                                     "meshgate-identity-trust-roots", check=False
                                     ).returncode == 0,
             timeout=30, what="the control plane to publish its trust roots")
    plain = cluster.base / "deploy.yaml"
    plain.write_text(manifests())
    injected = cluster.meshgate("inject", str(plain), "--kubeconfig", str(cluster.kubeconfig),
                                "--service-cidr", SERVICE_CIDR)
    assert injected.stderr.splitlines() == [
        "serviceaccount/web skipped: not a workload", "deployment/web injected",
        "serviceaccount/client skipped: not a workload", "deployment/client injected",
        "service/web skipped: not a workload"]
    (cluster.base / "injected.yaml").write_text(injected.stdout)
    cluster.kubectl("apply", "-f", "-", input=injected.stdout)

    web = wait_for(lambda: cluster.ready_pod("web"), timeout=90, what="web Ready")
    client = wait_for(lambda: cluster.ready_pod("client"), timeout=90, what="client Ready")
    for pod in (web, client):
        init, proxy = pod["status"]["initContainerStatuses"]
        assert init["name"] == "meshgate-init" and proxy["name"] == "meshgate-proxy"
        assert init["state"]["terminated"]["exitCode"] == 0
        assert proxy["ready"] and proxy["started"] and "running" in proxy["state"]
        app = pod["status"]["containerStatuses"][0]
        assert dt.datetime.fromisoformat(init["state"]["terminated"]["finishedAt"]) <= \
            started(proxy) <= started(app)
    logs = cluster.kubectl("logs", web["metadata"]["name"], "-c", "meshgate-init").stdout
    assert f"meshgate-init: {SERVICE_CIDR} is local (AnyIP route on lo)" in logs

    client_pod = client["metadata"]["name"]
    answer = wait_for(lambda: cluster.exec(client_pod, "client", GET,
                                           "http://web.default.svc.cluster.local/"),
                      timeout=30, what="the client's call to web")
    assert answer.strip() == f"hello from {web['metadata']['name']} in default"

    metrics = cluster.exec(web["metadata"]["name"], "meshgate-proxy", GET,
                           "http://127.0.0.1:4191/metrics")
    inbound = [(s.labels, s.value) for family in text_string_to_metric_families(metrics)
               for s in family.samples if s.name == "request_total"
               and s.labels.get("direction") == "inbound"]
    assert any(labels.get("client_id") == CLIENT_ID and labels.get("tls") == "true"
               and value >= 1 for labels, value in inbound), inbound


def test_uninjected_workloads_run_without_the_proxy(cluster: Cluster) -> None:
    injected = (cluster.base / "injected.yaml").read_text()
    plain = cluster.meshgate("uninject", "-", input=injected)
    assert "deployment/web uninjected" in plain.stderr.splitlines()
    cluster.kubectl("apply", "-f", "-", input=plain.stdout)

    def plain_web() -> dict[str, Any] | None:
        pod = cluster.ready_pod("web")
        if pod is None or pod["spec"].get("initContainers"):
            return None
        return pod

    pod = wait_for(plain_web, timeout=90, what="a web pod without the proxy")
    assert [c["name"] for c in pod["spec"]["containers"]] == ["web"]
    annotations = pod["metadata"].get("annotations") or {}
    assert "meshgate.io/proxy-version" not in annotations
    volumes = [v["name"] for v in pod["spec"].get("volumes") or []]
    assert not [v for v in volumes if v.startswith("meshgate-")]


def test_a_deployment_of_an_annotated_namespace_comes_up_injected(cluster: Cluster) -> None:
    """`cluster up` installs the injector as `meshgate install` renders it: its webhook
    configuration, and its Service in front of the control plane's Pod, which serves it."""
    hook = json.loads(cluster.kubectl("get", "mutatingwebhookconfiguration",
                                      "meshgate-proxy-injector", "-o", "json").stdout)
    assert hook["webhooks"][0]["clientConfig"]["service"] == {
        "name": "meshgate-injector", "namespace": "meshgate", "path": "/inject", "port": 443}
    cluster.kubectl("create", "namespace", "shop")
    cluster.kubectl("annotate", "namespace", "shop", "meshgate.io/inject=enabled")
    plain = "".join(f"---\n{line}\n" for line in manifests().split("---\n")[1:3])
    shop = plain.replace('"namespace": "default"', '"namespace": "shop"')
    cluster.kubectl("apply", "-f", "-", input=shop)

    def injected_ready() -> dict[str, Any] | None:
        out = cluster.kubectl("get", "pods", "-n", "shop", "-l", "app=web", "-o",
                              "json").stdout
        for pod in json.loads(out)["items"]:
            conditions = {c["type"]: c["status"]
                          for c in (pod.get("status") or {}).get("conditions") or []}
            if conditions.get("Ready") == "True":
                return pod  # type: ignore[no-any-return]
        return None

    pod = wait_for(injected_ready, timeout=90, what="shop's web pod Ready")
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["meshgate-init",
                                                                   "meshgate-proxy"]
    assert pod["metadata"]["annotations"]["meshgate.io/inbound-port"] == "4143"
    assert [s["ready"] for s in pod["status"]["initContainerStatuses"]] == [False, True]


def test_the_kubelet_gives_containers_only_their_capabilities_and_the_pods_sysctls(
        cluster: Cluster) -> None:
    """What the injected containers rely on: meshgate-init gets NET_ADMIN and nothing
    else, the proxy none; the pod's ip_unprivileged_port_start lets it bind port 80."""
    script = ("import socket; caps = [l for l in open('/proc/self/status') "
              "if l.startswith('CapEff')][0].split()[1]; s = socket.socket()\n"
              "import sys; port = int(sys.argv[1])\n"
              "try:\n    s.bind(('0.0.0.0', port)); bound = f'bound {port}'\n"
              "except OSError as e:\n    bound = f'cannot bind {port}: {e.strerror}'\n"
              "print(caps, bound, flush=True)\nimport time; time.sleep(1e9)")

    def container(name: str, caps: dict[str, Any], port: int) -> dict[str, Any]:
        return {"name": name, "image": "python",
                "command": [sys.executable, "-c", script, str(port)],
                "securityContext": {"capabilities": caps}}

    pods = [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": name, "namespace": "default"},
             "spec": {"terminationGracePeriodSeconds": 1, "securityContext": context,
                      "containers": [container("net-admin", {"drop": ["ALL"],
                                                             "add": ["NET_ADMIN"]}, 81),
                                     container("none", {"drop": ["ALL"]}, 80)]}}
            for name, context in (
                ("caps", {}),
                ("caps-sysctl", {"sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start",
                                              "value": "0"}]}))]
    cluster.kubectl("apply", "-f", "-", input="".join(f"---\n{json.dumps(p)}\n" for p in pods))

    def logs(pod: str, name: str) -> str:
        return cluster.kubectl("logs", pod, "-c", name, check=False).stdout.strip()

    assert wait_for(lambda: logs("caps", "net-admin"), timeout=30,
                    what="the first pod's output") == "0000000000001000 cannot bind 81: " \
        "Permission denied"
    assert wait_for(lambda: logs("caps", "none"), timeout=30, what="its second container"
                    ) == "0000000000000000 cannot bind 80: Permission denied"
    assert wait_for(lambda: logs("caps-sysctl", "none"), timeout=30,
                    what="the second pod's output") == "0000000000000000 bound 80"
    cluster.kubectl("delete", "pod", "caps", "caps-sysctl", "--wait=false")
