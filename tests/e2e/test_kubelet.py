"""The embedded cluster's kubelet, driven with the pinned kubectl and the official
client as on kind: Pods created directly are bound to the node and run as
processes in their own network namespace, with kube's status, Events, logs,
restarts with back-off, init containers and native sidecars, and graceful
deletion that leaves no process, namespace or mount behind, also on `cluster down`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from pyroute2 import netns

from localcluster import namespaces
from localcluster.kubelet.images import (
    MESHGATE_IMAGE,
    NOT_RUNNABLE_MESSAGE,
    NOT_RUNNABLE_REASON,
)
from localcluster.kubelet.reap import processes_in
from localcluster.workloads.nodes import node_name
from mesh.kube import api_client
from tests.cluster import wait_for
from tests.e2e.onecluster import OneCluster

NAME = "mgkubelet"
KUBECTL = str(Path(sys.executable).parent / "kubectl")
PREFIX = f"mg-{NAME}-"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


class Cluster(OneCluster):
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(api_client(self.kubeconfig))

    def pod(self, name: str) -> client.V1Pod:
        return self.core().read_namespaced_pod(name, "default")

    def status_of(self, pod: str, container: str) -> Any:
        statuses = self.pod(pod).status.container_statuses or []
        return next((s for s in statuses if s.name == container), None)


def _pod_namespaces() -> list[str]:
    return [n for n in netns.listnetns() if n.startswith(f"{PREFIX}pod-")]


def _pids_with(marker: str) -> list[int]:
    """Processes whose command line holds `marker` (a pod command is wrapped, then
    becomes the command itself: both count)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline and int(entry) != os.getpid():
                out.append(int(entry))
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("kubelet")
    env = {**os.environ, "MESHGATE_RUN_DIR": str(base / "run"), "PYTHONUNBUFFERED": "1"}
    c = Cluster(base, env)
    c.meshgate("cluster", "up", "--name", NAME, "--state-dir", str(base / "state"),
               "--pod-cidr", "10.217.0.0/16", "--service-cidr", "10.218.0.0/16")
    try:
        yield c
    finally:
        c.meshgate("cluster", "down", "--name", NAME, check=False)
    assert not [n for n in netns.listnetns() if n.startswith(PREFIX)]


def _running_ready(c: Cluster, name: str) -> bool:
    out = c.kubectl("get", "pod", name, "--no-headers").stdout.split()
    return out[1:3] == ["1/1", "Running"]


def test_node_registered_and_a_pod_is_bound_and_runs_a_server(cluster: Cluster) -> None:
    ready = cluster.kubectl("get", "node", node_name(NAME), "-o",
                            'jsonpath={.status.conditions[?(@.type=="Ready")].status}').stdout
    assert ready == "True"
    cluster.kubectl("run", "web", "--image=busybox", "--port=8080", "--labels=app=web",
                    "--command", "--", sys.executable, "-m", "http.server", "8080")
    wait_for(lambda: _running_ready(cluster, "web"), timeout=30, what="web Running 1/1")
    pod = cluster.pod("web")
    assert pod.spec.node_name == node_name(NAME)
    assert pod.status.phase == "Running" and pod.status.pod_ip.startswith("10.217.")
    assert pod.status.host_ip == "10.217.0.1" and pod.status.start_time is not None
    conditions = {c.type: c.status for c in pod.status.conditions}
    assert conditions == {"PodScheduled": "True", "Initialized": "True", "Ready": "True",
                          "ContainersReady": "True", "PodReadyToStartContainers": "True"}
    cs = cluster.status_of("web", "web")
    assert cs.ready and cs.started and cs.restart_count == 0 and cs.state.running.started_at
    assert cs.container_id.startswith("meshgate://") and cs.image == "busybox"
    # The server answers inside the pod's own network namespace, at its address.
    ns = [n for n in _pod_namespaces() if "default-web-" in n]
    assert len(ns) == 1 and processes_in(ns[0])
    sock = namespaces.socket_in_namespace(f"{PREFIX}node")
    try:
        sock.settimeout(5)
        wait_for(lambda: sock.connect_ex((pod.status.pod_ip, 8080)) == 0, timeout=10,
                 what="the pod's server to accept")
    finally:
        sock.close()
    events = cluster.kubectl("get", "events", "--field-selector",
                             "involvedObject.name=web", "-o",
                             "custom-columns=R:.reason,M:.message", "--no-headers").stdout
    assert "Scheduled" in events and f"assigned default/web to {node_name(NAME)}" in events
    assert "Created container: web" in events and "Started container web" in events


def test_a_ready_pod_is_a_ready_endpoint_of_its_service(cluster: Cluster) -> None:
    cluster.kubectl("expose", "pod", "web", "--port=80", "--target-port=8080",
                    "--name=web-svc")
    wait_for(lambda: _running_ready(cluster, "web"), timeout=30, what="web Running")
    ip = cluster.pod("web").status.pod_ip

    def ready_endpoints() -> list[str]:
        out = cluster.kubectl("get", "endpointslices", "-l",
                              "kubernetes.io/service-name=web-svc", "-o",
                              "jsonpath={.items[*].endpoints[?(@.conditions.ready==true)]"
                              ".addresses[0]}").stdout
        return out.split()
    assert wait_for(lambda: ready_endpoints() == [ip], timeout=15, what="a ready endpoint")


def test_logs_and_follow(cluster: Cluster) -> None:
    cluster.kubectl("run", "talker", "--image=busybox", "--restart=Never", "--command", "--",
                    "sh", "-c", "echo one; sleep 1; echo two >&2; sleep 1; echo three")
    wait_for(lambda: cluster.pod("talker").status.phase == "Running", timeout=30,
             what="talker running")
    followed = cluster.kubectl("logs", "-f", "talker", timeout=30).stdout
    assert followed.splitlines() == ["one", "two", "three"]
    wait_for(lambda: cluster.pod("talker").status.phase == "Succeeded", timeout=15,
             what="talker Succeeded")
    term = cluster.status_of("talker", "talker").state.terminated
    assert term.exit_code == 0 and term.reason == "Completed" and term.finished_at
    assert cluster.kubectl("logs", "talker", "--tail=1").stdout == "three\n"
    stamped = cluster.kubectl("logs", "talker", "--timestamps").stdout.splitlines()
    assert stamped[0].endswith(" one") and stamped[0][:4].isdigit() and "T" in stamped[0]
    no_prev = cluster.kubectl("logs", "talker", "--previous", check=False)
    assert no_prev.returncode == 1
    assert 'previous terminated container "talker" in pod "talker" not found' in no_prev.stderr


def test_a_crashing_container_backs_off(cluster: Cluster) -> None:
    cluster.kubectl("run", "crasher", "--image=busybox", "--command", "--",
                    "sh", "-c", "echo boom; exit 3")

    def backing_off() -> bool:
        cs = cluster.status_of("crasher", "crasher")
        return bool(cs and cs.restart_count >= 1 and cs.state.waiting
                    and cs.state.waiting.reason == "CrashLoopBackOff")
    wait_for(backing_off, timeout=30, what="CrashLoopBackOff")
    cs = cluster.status_of("crasher", "crasher")
    assert "back-off 10s restarting failed container=crasher" in cs.state.waiting.message
    assert cs.last_state.terminated.exit_code == 3 and cs.last_state.terminated.reason == "Error"
    row = cluster.kubectl("get", "pod", "crasher", "--no-headers").stdout.split()
    assert row[2] == "CrashLoopBackOff" and int(row[3]) >= 1
    assert cluster.kubectl("logs", "crasher", "--previous").stdout == "boom\n"
    events = cluster.kubectl("get", "events", "--field-selector",
                             "involvedObject.name=crasher,reason=BackOff", "-o",
                             "jsonpath={.items[*].message}").stdout
    assert "Back-off restarting failed container crasher in pod crasher_default(" in events


def test_meshgates_own_image_runs_the_local_installation(cluster: Cluster) -> None:
    cluster.kubectl("run", "mg", f"--image={MESHGATE_IMAGE}:dev", "--restart=Never", "--",
                    "--help")
    wait_for(lambda: cluster.pod("mg").status.phase == "Succeeded", timeout=30,
             what="mg Succeeded")
    assert cluster.kubectl("logs", "mg").stdout.startswith("usage: meshgate")
    assert cluster.kubectl("get", "pod", "mg", "--no-headers").stdout.split()[2] == "Completed"


def test_a_foreign_image_without_a_command_waits_with_the_reason(cluster: Cluster) -> None:
    cluster.kubectl("run", "foreign", "--image=nginx:1.27")
    wait_for(lambda: cluster.status_of("foreign", "foreign") is not None
             and cluster.status_of("foreign", "foreign").state.waiting.reason
             == NOT_RUNNABLE_REASON, timeout=30, what="ImageNotRunnable")
    waiting = cluster.status_of("foreign", "foreign").state.waiting
    assert NOT_RUNNABLE_MESSAGE in waiting.message
    assert cluster.pod("foreign").status.phase == "Pending"
    row = cluster.kubectl("get", "pod", "foreign", "--no-headers").stdout.split()
    assert row[2] == NOT_RUNNABLE_REASON
    logs = cluster.kubectl("logs", "foreign", check=False)
    assert logs.returncode == 1
    assert f'is waiting to start: {NOT_RUNNABLE_REASON}' in logs.stderr
    cluster.kubectl("delete", "pod", "foreign", "--wait=true", timeout=60)


def test_exec_runs_in_the_pod_over_kubectls_websocket(cluster: Cluster) -> None:
    wait_for(lambda: _running_ready(cluster, "web"), timeout=30, what="web Running")
    proc = cluster.kubectl("exec", "web", "--", "sh", "-c",
                           "echo out; echo err >&2; exit 3", check=False)
    assert (proc.returncode, proc.stdout) == (3, "out\n")
    assert "err" in proc.stderr
    # stdin, closed by the client at its end (v5), reaches the command.
    cat = subprocess.run([KUBECTL, "--kubeconfig", str(cluster.kubeconfig), "exec", "-i",
                          "web", "--", "cat"], input="hello\nworld\n", capture_output=True,
                         text=True, timeout=30, check=False)
    assert (cat.returncode, cat.stdout) == (0, "hello\nworld\n"), cat.stderr
    # The pod's network: its own server answers on localhost.
    code = ("import urllib.request; "
            "print(urllib.request.urlopen('http://127.0.0.1:8080/').status)")
    proc = cluster.kubectl("exec", "web", "--", sys.executable, "-c", code)
    assert proc.stdout == "200\n"
    missing = cluster.kubectl("exec", "web", "-c", "nope", "--", "true", check=False)
    assert missing.returncode == 1 and "container nope is not valid for pod web" in (
        missing.stderr)


def test_init_containers_sidecar_and_graceful_delete(cluster: Cluster, tmp_path: Path
                                                    ) -> None:
    order = tmp_path / "order"
    order.touch()
    f = str(order)

    def stays(word: str) -> list[str]:
        return ["sh", "-c", f"echo {word} >> {f}; trap 'echo {word}-stop >> {f}; exit 0' "
                f"TERM; while true; do sleep 0.1; done"]
    manifest = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ordered"},
        "spec": {"terminationGracePeriodSeconds": 10, "initContainers": [
            {"name": "first", "image": "busybox", "command": ["sh", "-c", f"echo first >> {f}"]},
            {"name": "sidecar", "image": "busybox", "restartPolicy": "Always",
             "command": stays("sidecar"),
             # started (so the next init container runs) once it has written its line
             "startupProbe": {"exec": {"command": ["grep", "-q", "sidecar", f]},
                              "periodSeconds": 1}},
            {"name": "second", "image": "busybox",
             "command": ["sh", "-c", f"echo second >> {f}"]}],
            "containers": [{"name": "main", "image": "busybox", "command": stays("main"),
                            "env": [{"name": "MARK", "value": "kubelet-e2e-ordered"},
                                    {"name": "POD", "valueFrom": {"fieldRef": {
                                        "fieldPath": "metadata.name"}}}]}]}}
    import json
    proc = subprocess.run([KUBECTL, "--kubeconfig", str(cluster.kubeconfig), "apply", "-f",
                           "-"], input=json.dumps(manifest), capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: cluster.kubectl("get", "pod", "ordered", "--no-headers").stdout.split()[
        1:3] == ["2/2", "Running"], timeout=30, what="ordered Running 2/2")
    wait_for(lambda: order.read_text().split() == ["first", "sidecar", "second", "main"],
             timeout=10, what="the order file")
    inits = {s.name: s for s in cluster.pod("ordered").status.init_container_statuses}
    assert inits["first"].state.terminated.reason == "Completed"
    assert inits["sidecar"].state.running and inits["sidecar"].ready
    ns = [n for n in _pod_namespaces() if "default-ordered-" in n]
    assert len(ns) == 1
    pids = processes_in(ns[0])
    assert pids
    environ = [Path(f"/proc/{p}/environ").read_bytes() for p in pids]
    assert any(b"POD=ordered\0" in e and b"MARK=kubelet-e2e-ordered" in e for e in environ)
    started = time.monotonic()
    cluster.kubectl("delete", "pod", "ordered", timeout=60)
    assert time.monotonic() - started < 10  # both stopped on SIGTERM, within the grace
    assert order.read_text().split()[4:] == ["main-stop", "sidecar-stop"]
    assert not [n for n in _pod_namespaces() if "default-ordered-" in n]
    assert not [p for p in pids if Path(f"/proc/{p}").exists()]
    events = cluster.kubectl("get", "events", "--field-selector",
                             "involvedObject.name=ordered,reason=Killing", "-o",
                             "jsonpath={.items[*].message}").stdout
    assert "Stopping container main" in events and "Stopping container sidecar" in events


def test_a_deployment_runs_scales_and_its_slices_follow(cluster: Cluster) -> None:
    cluster.kubectl("create", "deployment", "echo", "--image=busybox", "--port=8080",
                    "--", sys.executable, "-m", "http.server", "8080")
    cluster.kubectl("rollout", "status", "deployment/echo", "--timeout=60s", timeout=90)
    cluster.kubectl("expose", "deployment", "echo", "--port=80", "--target-port=8080")
    cluster.kubectl("scale", "deployment/echo", "--replicas=3")
    cluster.kubectl("rollout", "status", "deployment/echo", "--timeout=60s", timeout=90)

    def ready_addresses() -> set[str]:
        out = cluster.kubectl("get", "endpointslices", "-l",
                              "kubernetes.io/service-name=echo", "-o",
                              "jsonpath={.items[*].endpoints[?(@.conditions.ready==true)]"
                              ".addresses[0]}").stdout
        return set(out.split())
    ips = {p.status.pod_ip for p in cluster.core().list_namespaced_pod(
        "default", label_selector="app=echo").items}
    assert len(ips) == 3
    wait_for(lambda: ready_addresses() == ips, timeout=20, what="3 ready endpoints")
    assert len(_pids_with("http.server")) >= 3
    cluster.kubectl("scale", "deployment/echo", "--replicas=0")
    wait_for(lambda: not cluster.core().list_namespaced_pod(
        "default", label_selector="app=echo").items, timeout=60, what="the pods gone")
    wait_for(lambda: not ready_addresses(), timeout=20, what="no endpoints")
    assert not [n for n in _pod_namespaces() if "default-echo-" in n]


VOLUME_APP = """
import json, os, ssl, sys, urllib.request
base = sys.argv[1]
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
print("greeting", open(base + "/cfg/greeting").read())
print("password", open(base + "/sec/password").read())
print("init", open(base + "/work/from-init").read().strip())
print("name", open(base + "/info/name").read())
print("namespace", open(sa + "/namespace").read())
ctx = ssl.create_default_context(cafile=sa + "/ca.crt")
host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
req = urllib.request.Request(
    f"https://{host}:{port}/apis/authentication.k8s.io/v1/selfsubjectreviews", method="POST",
    data=json.dumps({"apiVersion": "authentication.k8s.io/v1",
                     "kind": "SelfSubjectReview"}).encode(),
    headers={"Authorization": "Bearer " + open(sa + "/token").read(),
             "Content-Type": "application/json"})
review = json.load(urllib.request.urlopen(req, context=ctx))
print("user", review["status"]["userInfo"]["username"], flush=True)
import time
time.sleep(600)
"""


def test_volumes_and_the_service_account_token(cluster: Cluster, tmp_path: Path) -> None:
    cluster.kubectl("create", "configmap", "vol-cfg", "--from-literal=greeting=hello")
    cluster.kubectl("create", "secret", "generic", "vol-sec", "--from-literal=password=s3cret")
    base = str(tmp_path)
    manifest = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "volumes"},
        "spec": {
            "volumes": [{"name": "cfg", "configMap": {"name": "vol-cfg"}},
                        {"name": "sec", "secret": {"secretName": "vol-sec"}},
                        {"name": "work", "emptyDir": {}},
                        {"name": "info", "downwardAPI": {"items": [
                            {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]}}],
            "initContainers": [{"name": "prepare", "image": "busybox", "command": [
                "sh", "-c", f"echo prepared > {base}/work/from-init"],
                "volumeMounts": [{"name": "work", "mountPath": f"{base}/work"}]}],
            "containers": [{"name": "app", "image": "busybox",
                            "command": [sys.executable, "-c", VOLUME_APP, base],
                            "volumeMounts": [
                                {"name": n, "mountPath": f"{base}/{n}"}
                                for n in ("cfg", "sec", "work", "info")]}]}}
    import json
    proc = subprocess.run([KUBECTL, "--kubeconfig", str(cluster.kubeconfig), "apply", "-f",
                           "-"], input=json.dumps(manifest), capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    pod = cluster.pod("volumes")
    api_access = [v.name for v in pod.spec.volumes if v.name.startswith("kube-api-access-")]
    assert len(api_access) == 1

    def printed() -> dict[str, str]:
        out = cluster.kubectl("logs", "volumes").stdout
        lines = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
        return lines if "user" in lines else {}
    lines = wait_for(printed, timeout=30, what="the app's report")
    assert lines == {"greeting": "hello", "password": "s3cret", "init": "prepared",
                     "name": "volumes", "namespace": "default",
                     "user": "system:serviceaccount:default:default"}
    # The mounts were the container's own: nothing of them shows on this machine.
    assert not any((tmp_path / n).exists() and any((tmp_path / n).iterdir())
                   for n in ("cfg", "sec", "info"))
    shown = cluster.kubectl("exec", "volumes", "--", "cat", f"{base}/cfg/greeting").stdout
    assert shown == "hello"
    sa_dir = Path("/var/run/secrets/kubernetes.io/serviceaccount")
    assert not (sa_dir / "token").exists()
    cluster.kubectl("delete", "pod", "volumes", "--grace-period=1", timeout=60)


def test_a_missing_configmap_holds_the_pod_with_failed_mount(cluster: Cluster) -> None:
    manifest = ('{"apiVersion":"v1","kind":"Pod","metadata":{"name":"nocfg"},"spec":{'
                '"volumes":[{"name":"c","configMap":{"name":"absent"}}],'
                '"containers":[{"name":"a","image":"busybox","command":["sleep","60"],'
                '"volumeMounts":[{"name":"c","mountPath":"/tmp/nocfg-test"}]}]}}')
    proc = subprocess.run([KUBECTL, "--kubeconfig", str(cluster.kubeconfig), "apply", "-f",
                           "-"], input=manifest, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr

    def failed_mount() -> str:
        return cluster.kubectl("get", "events", "--field-selector",
                               "involvedObject.name=nocfg,reason=FailedMount", "-o",
                               "jsonpath={.items[*].message}").stdout
    message = wait_for(failed_mount, timeout=20, what="FailedMount")
    assert 'MountVolume.SetUp failed for volume "c" : configmap "absent" not found' in message
    row = cluster.kubectl("get", "pod", "nocfg", "--no-headers").stdout.split()
    assert row[1:3] == ["0/1", "ContainerCreating"]
    cluster.kubectl("create", "configmap", "absent", "--from-literal=k=v")
    wait_for(lambda: _running_ready(cluster, "nocfg"), timeout=40, what="nocfg Running")
    cluster.kubectl("delete", "pod", "nocfg", "--grace-period=1", timeout=60)


def test_readiness_gates_the_endpoint_and_liveness_restarts(cluster: Cluster,
                                                           tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (tmp_path / "alive").touch()
    manifest = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "probed", "labels": {"app": "probed"}},
        "spec": {"containers": [{
            "name": "web", "image": "busybox",
            "command": [sys.executable, "-m", "http.server", "8081", "--directory", str(site)],
            "ports": [{"name": "http", "containerPort": 8081}],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"},
                               "periodSeconds": 1, "failureThreshold": 1},
            "livenessProbe": {"exec": {"command": ["test", "-e", str(tmp_path / "alive")]},
                              "periodSeconds": 1, "failureThreshold": 2}}]}}
    import json
    proc = subprocess.run([KUBECTL, "--kubeconfig", str(cluster.kubeconfig), "apply", "-f",
                           "-"], input=json.dumps(manifest), capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    cluster.kubectl("expose", "pod", "probed", "--port=80", "--target-port=8081")

    def endpoint() -> str:
        return cluster.kubectl("get", "endpointslices", "-l",
                               "kubernetes.io/service-name=probed", "-o",
                               "jsonpath={.items[*].endpoints[*].conditions.ready}").stdout
    wait_for(lambda: endpoint() == "false", timeout=30, what="a not-ready endpoint")
    row = cluster.kubectl("get", "pod", "probed", "--no-headers").stdout.split()
    assert row[1:3] == ["0/1", "Running"]
    def unhealthy() -> str:
        return cluster.kubectl("get", "events", "--field-selector",
                               "involvedObject.name=probed,reason=Unhealthy", "-o",
                               "jsonpath={.items[*].message}").stdout
    def saw_404() -> bool:
        seen = unhealthy()
        if "Readiness probe failed: HTTP probe failed with statuscode: 404" not in seen:
            raise AssertionError(f"Unhealthy Events so far: {seen!r}")
        return True
    wait_for(saw_404, timeout=20, what="the readiness probe's 404")
    (site / "ready").write_text("ok")
    wait_for(lambda: endpoint() == "true", timeout=15, what="a ready endpoint")
    assert cluster.kubectl("get", "pod", "probed", "--no-headers").stdout.split()[1] == "1/1"
    (site / "ready").unlink()
    wait_for(lambda: endpoint() == "false", timeout=15, what="not ready again")
    # Liveness: the check fails twice, the container is killed and restarted.
    (tmp_path / "alive").unlink()
    wait_for(lambda: cluster.status_of("probed", "web").restart_count >= 1, timeout=30,
             what="a restart")
    (tmp_path / "alive").touch()
    events = cluster.kubectl("get", "events", "--field-selector",
                             "involvedObject.name=probed", "-o",
                             "jsonpath={.items[*].message}").stdout
    assert "Liveness probe failed" in events
    assert "Container web failed liveness probe, will be restarted" in events
    cluster.kubectl("delete", "pod", "probed", "--grace-period=1", timeout=60)


def test_pods_run_again_after_the_api_server_restarts(cluster: Cluster) -> None:
    cluster.kubectl("run", "survivor", "--image=busybox", "--command", "--",
                    "sh", "-c", "echo run; exec sleep 7424203")
    wait_for(lambda: _running_ready(cluster, "survivor"), timeout=30, what="survivor Running")
    before = _pids_with("7424203")
    assert before
    wait_for(lambda: cluster.kubectl("logs", "survivor").stdout == "run\n", timeout=10,
             what="survivor's line logged")
    state = cluster.base / "state"
    os.kill(int((state / "run" / "apiserver.pid").read_text()), 9)
    cluster.meshgate("cluster", "up", "--name", NAME, "--state-dir", str(state),
                     "--pod-cidr", "10.217.0.0/16", "--service-cidr", "10.218.0.0/16")

    def restarted() -> bool:
        cs = cluster.status_of("survivor", "survivor")
        return bool(cs.restart_count == 1 and cs.state.running and cs.ready)
    wait_for(restarted, timeout=30, what="survivor running again")
    last = cluster.status_of("survivor", "survivor").last_state.terminated
    assert (last.reason, last.exit_code) == ("Unknown", 255)
    after = _pids_with("7424203")
    assert after and not set(before) & set(after)
    assert cluster.kubectl("logs", "survivor", "--previous").stdout == "run\n"
    cluster.kubectl("delete", "pod", "survivor", timeout=60)


def test_a_job_completes_and_a_daemonset_runs_one_pod(cluster: Cluster) -> None:
    cluster.kubectl("create", "job", "once", "--image=busybox", "--", "sh", "-c",
                    "echo job done")
    cluster.kubectl("wait", "--for=condition=complete", "job/once", "--timeout=60s",
                    timeout=90)
    assert cluster.kubectl("logs", "job/once").stdout == "job done\n"
    daemonset = {
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "agent"},
        "spec": {"selector": {"matchLabels": {"app": "agent"}}, "template": {
            "metadata": {"labels": {"app": "agent"}},
            "spec": {"containers": [{"name": "a", "image": "busybox",
                                     "command": ["sleep", "600"]}]}}}}
    import json
    proc = subprocess.run([KUBECTL, "--kubeconfig", str(cluster.kubeconfig), "apply", "-f",
                           "-"], input=json.dumps(daemonset), capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    cluster.kubectl("rollout", "status", "daemonset/agent", "--timeout=60s", timeout=90)
    pods = cluster.core().list_namespaced_pod("default", label_selector="app=agent").items
    assert len(pods) == 1 and pods[0].spec.node_name == node_name(NAME)
    assert pods[0].status.phase == "Running"
    cluster.kubectl("delete", "daemonset", "agent", timeout=60)
    cluster.kubectl("delete", "job", "once", timeout=60)


def _connects(ip: str, port: int) -> bool:
    sock = namespaces.socket_in_namespace(f"{PREFIX}node")
    try:
        sock.settimeout(0.5)
        return sock.connect_ex((ip, port)) == 0
    finally:
        sock.close()


def test_a_reused_pod_address_is_reachable_at_once(cluster: Cluster) -> None:
    """The next Pod gets a freed address at once, and the node, which reached the old
    Pod there a moment before, reaches the new one straight away (the new Pod's
    gratuitous ARP)."""
    serve = ["--command", "--", sys.executable, "-m", "http.server", "8082"]
    cluster.kubectl("run", "first", "--image=busybox", *serve)
    wait_for(lambda: _running_ready(cluster, "first"), timeout=30, what="first Running")
    ip = cluster.pod("first").status.pod_ip
    wait_for(lambda: _connects(ip, 8082), timeout=10, what="first answering")
    cluster.kubectl("delete", "pod", "first", timeout=60)
    cluster.kubectl("run", "second", "--image=busybox", *serve)
    wait_for(lambda: _running_ready(cluster, "second"), timeout=30, what="second Running")
    assert cluster.pod("second").status.pod_ip == ip
    wait_for(lambda: _connects(ip, 8082), timeout=4, what="second answering at once")
    cluster.kubectl("delete", "pod", "second", timeout=60)


def test_cluster_down_stops_every_pod(cluster: Cluster) -> None:
    cluster.kubectl("run", "lasting", "--image=busybox", "--command", "--",
                    "sleep", "7424201")
    wait_for(lambda: _running_ready(cluster, "lasting"), timeout=30, what="lasting Running")
    assert _pids_with("7424201")
    cluster.meshgate("cluster", "down", "--name", NAME)
    assert not _pids_with("7424201")
    assert not [n for n in netns.listnetns() if n.startswith(PREFIX)]


def test_cluster_down_after_the_kubelet_was_killed(cluster: Cluster) -> None:
    state = cluster.base / "state"
    cluster.meshgate("cluster", "up", "--name", NAME, "--state-dir", str(state),
                     "--pod-cidr", "10.217.0.0/16", "--service-cidr", "10.218.0.0/16")
    cluster.kubectl("run", "orphan", "--image=busybox", "--command", "--", "sleep", "7424202")
    wait_for(lambda: _running_ready(cluster, "orphan"), timeout=30, what="orphan Running")
    pids = _pids_with("7424202")
    assert pids
    os.kill(int((state / "run" / "apiserver.pid").read_text()), 9)
    cluster.meshgate("cluster", "down", "--name", NAME)
    assert not _pids_with("7424202")
    assert not [n for n in netns.listnetns() if n.startswith(PREFIX)]


def test_a_full_pod_network_is_reported_and_retried(tmp_path: Path) -> None:
    """A /29 pod CIDR holds five Pods, meshgate's three (control plane, gateway, mirror
    controller) and two more: the next waits with FailedCreatePodSandBox naming the
    cause, and starts once one is gone."""
    env = {**os.environ, "MESHGATE_RUN_DIR": str(tmp_path / "run")}
    small = Cluster(tmp_path, env)
    name = f"{NAME}2"
    small.meshgate("cluster", "up", "--name", name, "--state-dir", str(tmp_path / "state"),
                   "--pod-cidr", "10.221.0.0/29", "--service-cidr", "10.222.0.0/16")
    try:
        for pod in ("one", "filler"):
            small.kubectl("run", pod, "--image=busybox", "--command", "--", "sleep", "600")
            wait_for(lambda p=pod: _running_ready(small, p), timeout=30, what=f"{pod} Running")
        small.kubectl("run", "two", "--image=busybox", "--command", "--", "sleep", "600")

        def sandbox_failures() -> str:
            return small.kubectl("get", "events", "--field-selector",
                                 "involvedObject.name=two,reason=FailedCreatePodSandBox",
                                 "-o", "jsonpath={.items[*].message}").stdout
        message = wait_for(sandbox_failures, timeout=20, what="FailedCreatePodSandBox")
        assert "pod CIDR 10.221.0.0/29 has no free address" in message
        small.kubectl("delete", "pod", "one", timeout=60)
        wait_for(lambda: _running_ready(small, "two"), timeout=60, what="two Running")
    finally:
        small.meshgate("cluster", "down", "--name", name, check=False)
    assert not [n for n in netns.listnetns() if n.startswith(f"mg-{name}-")]
