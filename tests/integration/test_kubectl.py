"""The real kubectl against the embedded cluster."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import yaml

from tests.cluster import Cluster, wait_for

SERVICE = """\
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: {ns}
  labels: {{app: web}}
spec:
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, targetPort: 8080}}
{extra}"""


def _ns(cluster: Cluster) -> str:
    ns = f"k-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", ns)
    return ns


def test_get_namespaces_and_api_resources(cluster: Cluster) -> None:
    out = cluster.kubectl("get", "namespaces").stdout
    assert out.splitlines()[0].split() == ["NAME", "STATUS", "AGE"]
    assert any(line.split()[:2] == ["kube-system", "Active"] for line in out.splitlines())
    svc = cluster.kubectl("get", "service", "kubernetes", "-o", "wide").stdout.splitlines()
    assert svc[0].split() == ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE",
                              "SELECTOR"]
    assert svc[1].split()[:5] == ["kubernetes", "ClusterIP", "10.96.0.1", "<none>", "443/TCP"]
    resources = cluster.kubectl("api-resources").stdout
    for line in ("services", "endpointslices", "customresourcedefinitions", "leases"):
        assert line in resources
    assert "svc" in cluster.kubectl("api-resources", "--api-group=").stdout


def test_apply_twice_then_get_yaml_and_delete(cluster: Cluster, tmp_path: Path) -> None:
    ns = _ns(cluster)
    manifest = tmp_path / "svc.yaml"
    manifest.write_text(SERVICE.format(ns=ns, extra="  - {name: metrics, port: 9090}\n"))
    assert "service/web created" in cluster.kubectl("apply", "-f", str(manifest)).stdout
    manifest.write_text(SERVICE.format(ns=ns, extra="").replace("8080", "8081"))
    assert "service/web configured" in cluster.kubectl("apply", "-f", str(manifest)).stdout
    svc = yaml.safe_load(cluster.kubectl("get", "service", "web", "-n", ns, "-o",
                                         "yaml").stdout)
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "protocol": "TCP",
                                     "targetPort": 8081}]
    assert "kubectl.kubernetes.io/last-applied-configuration" in svc["metadata"]["annotations"]
    assert "unchanged" in cluster.kubectl("apply", "-f", str(manifest)).stdout
    assert "deleted" in cluster.kubectl("delete", "-f", str(manifest)).stdout
    gone = cluster.kubectl("get", "service", "web", "-n", ns, check=False)
    assert gone.returncode == 1 and 'services "web" not found' in gone.stderr


def test_get_watch_receives_a_change(cluster: Cluster) -> None:
    ns = _ns(cluster)
    exe = cluster.kubectl("version", "--client").args[0]
    watcher = subprocess.Popen(
        [exe, "--kubeconfig", str(cluster.kubeconfig), "get", "configmaps", "-n", ns, "-w",
         "--request-timeout=20s", "-o", "name"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The watch is established once the initial list (kube-root-ca.crt) is printed.
        assert watcher.stdout is not None
        first = watcher.stdout.readline()
        assert first.strip() == "configmap/kube-root-ca.crt"
        # kubectl watches from the list's resourceVersion, so nothing falls in between.
        cluster.kubectl("create", "configmap", "fresh", "-n", ns, "--from-literal=a=b")
        line = watcher.stdout.readline()
        assert line.strip() == "configmap/fresh"
    finally:
        watcher.kill()
        watcher.wait()


def test_imperative_create_commands(cluster: Cluster) -> None:
    ns = _ns(cluster)
    cluster.kubectl("create", "serviceaccount", "bot", "-n", ns)
    cluster.kubectl("create", "secret", "generic", "creds", "-n", ns, "--from-literal=k=v")
    token = cluster.kubectl("create", "token", "bot", "-n", ns).stdout.strip()
    assert token.count(".") == 2
    # A token for another audience does not open the API.
    foreign = cluster.kubectl("create", "token", "bot", "-n", ns, "--audience",
                              "identity.meshgate.io").stdout.strip()
    assert cluster.raw("GET", f"/api/v1/namespaces/{ns}/services", token=foreign)[0] == 401
    cluster.kubectl("create", "role", "reader", "-n", ns, "--verb=get,list",
                    "--resource=services")
    cluster.kubectl("create", "rolebinding", "reader", "-n", ns, "--role=reader",
                    f"--serviceaccount={ns}:bot")
    out = subprocess.run(
        [cluster.kubectl("version", "--client").args[0], "--kubeconfig",
         str(cluster.kubeconfig), "--token", token, "get", "services", "-n", ns],
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    denied = subprocess.run(
        [cluster.kubectl("version", "--client").args[0], "--kubeconfig",
         str(cluster.kubeconfig), "--token", token, "get", "secrets", "-n", ns],
        capture_output=True, text=True, timeout=30)
    assert denied.returncode == 1
    assert (f'secrets is forbidden: User "system:serviceaccount:{ns}:bot" cannot list resource '
            f'"secrets" in API group "" in the namespace "{ns}"') in denied.stderr


def test_apply_crd_and_custom_resource(cluster: Cluster, tmp_path: Path) -> None:
    crd = tmp_path / "crd.yaml"
    crd.write_text("""\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.meshgate.io}
spec:
  group: example.meshgate.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wd]}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer, minimum: 1}
""")
    cluster.kubectl("apply", "-f", str(crd))
    ns = _ns(cluster)
    widget = tmp_path / "w.yaml"
    widget.write_text(f"apiVersion: example.meshgate.io/v1\nkind: Widget\nmetadata: "
                      f"{{name: w, namespace: {ns}}}\nspec: {{size: 3}}\n")
    wait_for(lambda: cluster.kubectl("apply", "-f", str(widget), check=False).returncode == 0,
             what="widget applied")
    assert "widget.example.meshgate.io/w" in cluster.kubectl("get", "wd", "-n", ns,
                                                             "-o", "name").stdout
    widget.write_text(widget.read_text().replace("size: 3", "size: 0"))
    bad = cluster.kubectl("apply", "-f", str(widget), check=False)
    assert bad.returncode == 1 and "spec.size" in bad.stderr
    bad_field = cluster.kubectl("apply", "-f", "-", check=False, input=(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x, namespace: " + ns +
        "}\nbogus: 1\n"))
    assert bad_field.returncode == 1 and 'unknown field "bogus"' in bad_field.stderr
