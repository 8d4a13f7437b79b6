"""`meshgate cluster run-pod` on a cluster whose control plane is meshgate's manifests:
the pod is created through the API with meshgate-init and meshgate-proxy exactly as
`meshgate inject` renders them, the kubelet runs it, its proxy is meshed (a call by
Service name goes over mTLS, the server's proxy counts the caller), run-pod prints
the command's output and returns its exit status, and an ended, stopped or failed
run-pod leaves no Pod, network namespace or process behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from pyroute2 import netns

from localcluster.kubepod import manifest
from localcluster.pods import PodRequest, run_pod_argv
from tests.cluster import wait_for
from tests.e2e.clusters import DEMO_APP, Clusters, Topology, clusters
from tests.e2e.pod_scripts import CALLS

NAME = "mfrunpod"
TOPOLOGY = Topology(wan="mg-mfrpwan", wan_cidr="172.31.231.0/24",
                    cidrs={NAME: ("10.252.0.0/16", "10.253.0.0/16")})
CLIENT_ID = "client.default.serviceaccount.identity.meshgate.cluster.local"
GATEWAY_ID = "meshgate-gateway.meshgate.serviceaccount.identity.meshgate.cluster.local"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""


@pytest.fixture(scope="module")
def mc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clusters]:
    with clusters(tmp_path_factory.mktemp("runpod"), TOPOLOGY) as c:
        c.up(NAME)
        c.kubectl(NAME, "apply", "-f", "-", input=SERVICE)
        c.run_pod(NAME, "web-1", *DEMO_APP, sa="web", labels=("app=web",), port=8080)
        c.run_pod(NAME, "client", "sleep", "600", sa="client")
        yield c


def pod_netns() -> list[str]:
    """The cluster's pod network namespaces (not the node's)."""
    return sorted(n for n in netns.listnetns()
                  if n.startswith(f"mg-{NAME}-") and n != f"mg-{NAME}-node")


def pods(mc: Clusters) -> list[str]:
    return mc.kubectl(NAME, "get", "pods", "-o", "name").split()


def missing(want: Any, got: Any, at: str = "") -> str:
    """Where `got` lacks something of `want` ("" if nowhere; dicts may have more keys,
    the API server's defaults, and lists the ServiceAccount token's mount)."""
    if isinstance(want, dict) and isinstance(got, dict):
        return next((m for k, v in want.items()
                     if (m := f"{at}.{k} absent" if k not in got else missing(
                         v, got[k], f"{at}.{k}"))), "")
    if isinstance(got, list):  # ServiceAccount admission mounts the API token
        got = [g for g in got if not (isinstance(g, dict) and str(g.get("name", ""))
                                      .startswith("kube-api-access-"))]
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        return next((m for i, (w, g) in enumerate(zip(want, got, strict=True))
                     if (m := missing(w, g, f"{at}[{i}]"))), "")
    return "" if want == got else f"{at}: {want!r} != {got!r}"


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in items}


def test_the_pod_is_injected_exactly_as_meshgate_inject_renders_it(mc: Clusters) -> None:
    live = yaml.safe_load(mc.kubectl(NAME, "get", "pod", "web-1", "-o", "yaml"))
    request = PodRequest(cluster=NAME, namespace="default", name="web-1",
                         service_account="web", command=DEMO_APP,
                         labels=(("app", "web"),), ports=(8080,))
    body = manifest(request, trusted_gateways=(GATEWAY_ID,))
    rendered = yaml.safe_load(mc.meshgate("inject", "--kubeconfig", str(mc.kubeconfig(NAME)),
                                          "-", input=yaml.safe_dump(body)).stdout)
    want = by_name(rendered["spec"]["initContainers"])
    got = by_name(live["spec"]["initContainers"])
    assert sorted(got) == sorted(want) == ["meshgate-init", "meshgate-proxy"]
    for name, container in want.items():
        # What the API server defaults (terminationMessagePath, probes' scheme, ...)
        # aside, the same.
        assert missing(container, got[name]) == "", name
    proxy_env = {e["name"]: e.get("value") for e in got["meshgate-proxy"]["env"]}
    assert proxy_env["MESHGATE_PROXY_INBOUND_TRUSTED_GATEWAYS"] == GATEWAY_ID
    assert live["metadata"]["annotations"]["meshgate.io/proxy-version"] == (
        rendered["metadata"]["annotations"]["meshgate.io/proxy-version"])
    assert live["spec"]["restartPolicy"] == "Never"
    statuses = {c["name"]: c for c in live["status"]["initContainerStatuses"]}
    assert statuses["meshgate-init"]["state"]["terminated"]["exitCode"] == 0
    assert statuses["meshgate-proxy"]["ready"] is True


def test_a_pod_calls_another_by_service_name_over_mtls(mc: Clusters) -> None:
    answers = wait_for(
        lambda: (a := mc.in_pod(NAME, "client", CALLS, "4", "http://web.default.svc"
                                ".cluster.local/").splitlines())
        and all(x.startswith("200") for x in a) and a,
        timeout=30, interval=0.5, what="calls from client to web")
    assert answers == ["200 hello from web-1 in default"] * 4
    assert mc.metric(NAME, "web-1", "request_total", direction="inbound",
                     client_id=CLIENT_ID) >= 4


def test_the_commands_output_and_exit_status_are_run_pods(mc: Clusters) -> None:
    before = pod_netns()
    proc = mc.meshgate("cluster", "run-pod", "--cluster", NAME, "--name", "once", "--",
                       "sh", "-c", "echo hello from $POD_NAME in $POD_NAMESPACE as "
                       "$SERVICE_ACCOUNT; exit 3", check=False)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "hello from once in default as default\n"
    assert "once" not in " ".join(pods(mc))
    assert pod_netns() == before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_run_pod_leaves_no_pod_namespace_or_process(mc: Clusters,
                                                              sig: signal.Signals) -> None:
    before = pod_netns()
    marker = f"74{int(sig)}"
    argv = run_pod_argv(NAME, "stopped", ("sleep", marker), service_account="default")
    proc = subprocess.Popen(argv, env=mc.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is None and "pod/stopped" in pods(mc) and mc.kubectl(
            NAME, "get", "pod", "stopped", "-o", "jsonpath={.status.phase}") == "Running",
            timeout=40, interval=0.3, what="the pod to run")
        assert len(pod_netns()) == len(before) + 1
        proc.send_signal(sig)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # The kubelet stops the command with SIGTERM, as for `kubectl delete pod`.
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "pod/stopped" not in pods(mc)
    assert pod_netns() == before
    ps = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True)
    assert ps.stdout == ""


def test_stopped_before_its_command_runs_run_pod_leaves_nothing(mc: Clusters) -> None:
    before = pod_netns()
    argv = run_pod_argv(NAME, "early", ("sleep", "7499"), service_account="default")
    proc = subprocess.Popen(argv, env=mc.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        # As soon as the Pod exists (its init container may still be running).
        wait_for(lambda: "pod/early" in pods(mc), timeout=40, interval=0.05,
                 what="the Pod to exist")
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "pod/early" not in pods(mc)
    assert pod_netns() == before
    assert subprocess.run(["pgrep", "-f", "sleep 7499"], capture_output=True).stdout == b""


def test_a_pod_whose_proxy_fails_ends_run_pod_with_the_reason(mc: Clusters) -> None:
    before = pod_netns()
    # The control plane's own identity is never issued to a workload.
    proc = mc.meshgate("cluster", "run-pod", "--cluster", NAME, "--namespace", "meshgate",
                       "--name", "impostor", "--service-account", "meshgate-identity", "--",
                       "sleep", "60", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "container meshgate-proxy failed" in proc.stderr, proc.stderr
    assert "never issued to workloads" in proc.stderr, proc.stderr
    assert "impostor" not in mc.kubectl(NAME, "-n", "meshgate", "get", "pods", "-o", "name")
    assert pod_netns() == before


def test_bad_input_is_refused_before_anything_is_created(mc: Clusters) -> None:
    proc = mc.meshgate("cluster", "run-pod", "--cluster", NAME, "--namespace", "nowhere",
                       "--name", "x", "--", "true", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("namespace 'nowhere' does not exist; create it with "
                                        "`kubectl create namespace nowhere`")
    taken = mc.meshgate("cluster", "run-pod", "--cluster", NAME, "--name", "client", "--",
                        "true", check=False)
    assert taken.returncode == 2
    assert "pod default/client already exists" in taken.stderr
    assert "pod/client" in pods(mc)  # the running one is left alone
    assert mc.in_pod(NAME, "client", "print('still here')") == "still here\n"
