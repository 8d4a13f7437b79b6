"""`meshgate inject` and `meshgate uninject` as a user runs them: files, directories and
stdin, YAML and JSON, the report on stderr, idempotence, the settings read from a
cluster (and what the API server then accepts), and each bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from mesh.identity.ca import IssuerDir
from tests.cluster import Cluster

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: default
spec:
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
        - name: web
          image: nginx
          command: [sleep, infinity]
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  selector: {app: web}
  ports: [{port: 80}]
"""


def meshgate(*args: str, stdin: str | None = None, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh.cli", *args], capture_output=True,
                          text=True, timeout=60, input=stdin, env=env)


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("identity") / "id"
    proc = meshgate("identity", "init", "--trust-domain", "example.org", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture
def offline(identity: Path) -> tuple[str, ...]:
    return ("--service-cidr", "10.96.0.0/16", "--identity-dir", str(identity))


def docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def proxy_of(deployment: dict[str, Any]) -> dict[str, Any]:
    inits = deployment["spec"]["template"]["spec"]["initContainers"]
    return next(c for c in inits if c["name"] == "meshgate-proxy")  # type: ignore[no-any-return]


def test_inject_a_file_prints_the_objects_and_reports_each(
        tmp_path: Path, offline: tuple[str, ...], identity: Path) -> None:
    path = tmp_path / "web.yaml"
    path.write_text(DEPLOYMENT)
    proc = meshgate("inject", str(path), *offline)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["deployment/web injected",
                                        "service/web skipped: not a workload"]
    deployment, service = docs(proc.stdout)
    assert service == docs(DEPLOYMENT)[1]
    inits = deployment["spec"]["template"]["spec"]["initContainers"]
    assert [c["name"] for c in inits] == ["meshgate-init", "meshgate-proxy"]
    assert inits[0]["args"] == ["proxy", "init", "--service-cidr", "10.96.0.0/16"]
    env = {e["name"]: e.get("value") for e in proxy_of(deployment)["env"]}
    assert env["MESHGATE_PROXY_IDENTITY_TRUST_ANCHORS"] == (
        IssuerDir(identity).load_bundle().to_pem().decode())
    assert env["MESHGATE_PROXY_IDENTITY_LOCAL_NAME"].endswith(".meshgate.example.org")

    again = meshgate("inject", "-", *offline, stdin=proc.stdout)
    assert again.returncode == 0, again.stderr
    assert again.stdout == proc.stdout, "injecting twice changes nothing"
    assert again.stderr.splitlines()[0] == (
        "deployment/web skipped: already injected (it has a meshgate-proxy container)")

    undone = meshgate("uninject", "-", stdin=proc.stdout)
    assert undone.returncode == 0, undone.stderr
    assert docs(undone.stdout) == docs(DEPLOYMENT)
    assert undone.stderr.splitlines() == ["deployment/web uninjected",
                                          "service/web skipped: not a workload"]


def test_json_in_json_out_and_a_directory(tmp_path: Path, offline: tuple[str, ...]) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "one"},
           "spec": {"containers": [{"name": "app", "image": "busybox"}]}}
    proc = meshgate("inject", "-", *offline, stdin=json.dumps(pod))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [c["name"] for c in out["spec"]["initContainers"]] == ["meshgate-init",
                                                                  "meshgate-proxy"]
    assert proc.stderr.strip() == "pod/one injected"

    folder = tmp_path / "manifests"
    (folder / "nested").mkdir(parents=True)
    (folder / "a.yaml").write_text(DEPLOYMENT)
    (folder / "nested" / "b.json").write_text(json.dumps(pod))
    (folder / "notes.txt").write_text("not a manifest")
    proc = meshgate("inject", str(folder), *offline)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["deployment/web injected",
                                        "service/web skipped: not a workload",
                                        "pod/one injected"]
    assert [d["kind"] for d in docs(proc.stdout)] == ["Deployment", "Service", "Pod"]


@pytest.mark.parametrize(("stdin", "args", "message"), [
    (None, ("inject", "/no/such/file.yaml"), "meshgate: /no/such/file.yaml does not exist"),
    ("kind: Pod\nmetadata: [\n  name: x\n", ("inject", "-"),
     "meshgate: stdin line 4: not valid YAML or JSON"),
    ("{", ("uninject", "-"), "meshgate: stdin line 1: not valid YAML or JSON"),
])
def test_unreadable_input_fails_in_one_line(stdin: str | None, args: tuple[str, ...],
                                            message: str, offline: tuple[str, ...]) -> None:
    extra = offline if args[0] == "inject" else ()
    proc = meshgate(*args, *extra, stdin=stdin)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(message), proc.stderr


def test_a_bad_annotation_fails_naming_the_workload_and_prints_nothing(
        offline: tuple[str, ...]) -> None:
    bad = DEPLOYMENT.replace("labels: {app: web}\n    spec:",
                             "labels: {app: web}\n      annotations:\n"
                             "        config.meshgate.io/proxy-log-level: loud\n    spec:")
    proc = meshgate("inject", "-", *offline, stdin=bad)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("meshgate: deployment/web: annotation config.meshgate.io/"
                           "proxy-log-level='loud' must be one of debug, info, warning, "
                           "error\n")


def test_without_a_cluster_or_flags_inject_says_what_to_give(tmp_path: Path) -> None:
    env = {"KUBECONFIG": str(tmp_path / "none"), "HOME": str(tmp_path), "PATH": "/usr/bin"}
    import os

    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    proc = meshgate("inject", "-", stdin=DEPLOYMENT, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("meshgate: no cluster to read the mesh's settings from")
    assert proc.stderr.rstrip().endswith("give --service-cidr and --identity-dir to inject "
                                         "without a cluster")


def test_settings_come_from_the_cluster_and_the_api_server_takes_the_result(
        cluster: Cluster, identity: Path) -> None:
    kubeconfig = ("--kubeconfig", str(cluster.kubeconfig))
    proc = meshgate("inject", "-", *kubeconfig, stdin=DEPLOYMENT)
    assert proc.returncode == 2
    assert proc.stderr.startswith("meshgate: the cluster has no trust bundle (ConfigMap "
                                  "meshgate/meshgate-identity-trust-roots")

    core = client.CoreV1Api(cluster.api())
    core.create_namespace({"metadata": {"name": "meshgate"}})
    pem = IssuerDir(identity).load_bundle().to_pem().decode()
    core.create_namespaced_config_map("meshgate", {
        "metadata": {"name": "meshgate-identity-trust-roots"}, "data": {"ca-bundle.crt": pem}})
    # the service range from the cluster's ServiceCIDR (kube 1.33+, and the embedded
    # one), which wins over meshgate-config's (install --service-cidr, for older kube)
    core.create_namespaced_config_map("meshgate", {
        "metadata": {"name": "meshgate-config"}, "data": {"serviceCIDRs": "10.0.0.0/8"}})
    proc = meshgate("inject", "-", *kubeconfig, stdin=DEPLOYMENT)
    assert proc.returncode == 0, proc.stderr
    deployment = docs(proc.stdout)[0]
    init = deployment["spec"]["template"]["spec"]["initContainers"][0]
    assert init["args"][-1] == "10.96.0.0/16"
    env = {e["name"]: e.get("value") for e in proxy_of(deployment)["env"]}
    assert env["MESHGATE_PROXY_IDENTITY_TRUST_ANCHORS"] == pem
    assert env["MESHGATE_PROXY_DESTINATION_SVC_ADDR"] == (
        "meshgate-control-headless.meshgate.svc.cluster.local:8086")

    overridden = meshgate("inject", "-", *kubeconfig, "--service-cidr", "10.0.0.0/24",
                          stdin=DEPLOYMENT)
    assert docs(overridden.stdout)[0]["spec"]["template"]["spec"]["initContainers"][0][
        "args"][-1] == "10.0.0.0/24"

    # a cluster serving no ServiceCIDR (kube before 1.33): meshgate-config's range
    net = client.NetworkingV1Api(cluster.api())
    net.delete_service_cidr("kubernetes")
    try:
        older = meshgate("inject", "-", *kubeconfig, stdin=DEPLOYMENT)
        assert older.returncode == 0, older.stderr
        assert docs(older.stdout)[0]["spec"]["template"]["spec"]["initContainers"][0][
            "args"][-1] == "10.0.0.0/8"
    finally:
        net.create_service_cidr({"metadata": {"name": "kubernetes"},
                                 "spec": {"cidrs": ["10.96.0.0/16"]}})

    applied = cluster.kubectl("apply", "-f", "-", input=proc.stdout)
    assert "deployment.apps/web created" in applied.stdout
    stored = client.AppsV1Api(cluster.api()).read_namespaced_deployment("web", "default")
    names = [c.name for c in stored.spec.template.spec.init_containers]
    assert names == ["meshgate-init", "meshgate-proxy"]
    assert stored.spec.template.spec.init_containers[1].restart_policy == "Always"


def test_several_json_objects_come_out_as_one_list(offline: tuple[str, ...]) -> None:
    pods = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
             "spec": {"containers": [{"name": "app", "image": "busybox"}]}}
            for name in ("a", "b")]
    proc = meshgate("inject", "-", *offline, stdin=json.dumps(pods))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["kind"] == "List" and [p["metadata"]["name"] for p in out["items"]] == ["a", "b"]
    assert proc.stderr.splitlines() == ["pod/a injected", "pod/b injected"]
