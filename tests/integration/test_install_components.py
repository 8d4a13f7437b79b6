"""The control plane and the gateway run as `meshgate install` renders them, with
exactly their ServiceAccounts' rights: each container's arguments, files and
kubeconfig as the kubelet would give them (ConfigMaps, the issuer Secret and
projected tokens written under a directory per mount; the ServiceAccount's own
token from a TokenRequest), against the embedded cluster. Both become ready, which
needs every informer's list and watch, and the gateway's certificate, which needs
the control plane's TokenReview. Without its role, a component is not ready and says
in one line per refused resource which ServiceAccount lacks which right."""

from __future__ import annotations

import base64
import re
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from mesh.manifests import containers
from tests.cluster import Cluster, spawn, stop_process, wait_for
from tests.meshproxy import free_port

SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
Obj = dict[str, Any]


@pytest.fixture(scope="module")
def rendered(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> list[Obj]:
    out = tmp_path_factory.mktemp("identity") / "id"
    run = [sys.executable, "-m", "mesh.cli"]
    subprocess.run([*run, "identity", "init", "--trust-domain", "cluster.local", "--out",
                    str(out)], check=True, capture_output=True)
    crds = subprocess.run([*run, "install", "--crds"], check=True, capture_output=True,
                          text=True).stdout
    cluster.kubectl("apply", "-f", "-", input=crds)
    cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=30s")
    rest = subprocess.run([*run, "install", "--identity-dir", str(out)], check=True,
                          capture_output=True, text=True).stdout
    cluster.kubectl("apply", "-f", "-", input=rest)
    return [d for d in yaml.safe_load_all(rest) if d]


def find(docs: list[Obj], kind: str, name: str) -> Obj:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


class Pod:
    """One Deployment's container, its volumes written under `root` as the kubelet
    would mount them; `local` maps a path in the container to the file here."""

    def __init__(self, cluster: Cluster, docs: list[Obj], deployment: str, root: Path,
                 ) -> None:
        self.cluster, self.root = cluster, root
        pod = find(docs, "Deployment", deployment)["spec"]["template"]["spec"]
        self.container = next(containers(find(docs, "Deployment", deployment)))
        self.service_account = pod["serviceAccountName"]
        self.mounts: dict[str, Path] = {SA_MOUNT: self._service_account_files()}
        volumes = {v["name"]: v for v in pod["volumes"]}
        for mount in self.container["volumeMounts"]:
            directory = root / mount["name"]
            directory.mkdir(parents=True)
            self._fill(docs, volumes[mount["name"]], directory)
            self.mounts[mount["mountPath"]] = directory

    def _token(self, audience: str | None = None, seconds: int = 3600) -> str:
        spec: Obj = {"expirationSeconds": seconds}
        if audience:
            spec["audiences"] = [audience]
        review = client.CoreV1Api(self.cluster.api()).create_namespaced_service_account_token(
            self.service_account, "meshgate", {"spec": spec})
        return str(review.status.token)

    def _service_account_files(self) -> Path:
        directory = self.root / "serviceaccount"
        directory.mkdir(parents=True)
        kubeconfig = yaml.safe_load(self.cluster.kubeconfig.read_text())
        ca = kubeconfig["clusters"][0]["cluster"]["certificate-authority-data"]
        (directory / "ca.crt").write_bytes(base64.b64decode(ca))
        (directory / "token").write_text(self._token())
        (directory / "namespace").write_text("meshgate")
        return directory

    def _fill(self, docs: list[Obj], volume: Obj, directory: Path) -> None:
        sources = (volume["projected"]["sources"] if "projected" in volume
                   else [{k: v} for k, v in volume.items() if k != "name"])
        for source in sources:
            if "configMap" in source:
                data = find(docs, "ConfigMap", source["configMap"]["name"])["data"]
                self._items(source["configMap"], {k: v.encode() for k, v in data.items()},
                            directory)
            elif "secret" in source:
                data = find(docs, "Secret", source["secret"]["name"])["data"]
                self._items(source["secret"], {k: base64.b64decode(v) for k, v in data.items()},
                            directory)
            elif "serviceAccountToken" in source:
                spec = source["serviceAccountToken"]
                (directory / spec["path"]).write_text(
                    self._token(spec.get("audience"), spec["expirationSeconds"]))
            else:
                assert "emptyDir" in source, source

    @staticmethod
    def _items(source: Obj, data: dict[str, bytes], directory: Path) -> None:
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            (directory / item["path"]).write_bytes(data[item["key"]])

    def local(self, text: str) -> str:
        """`text` with the container's paths made this machine's."""
        # One pass: a directory here may itself lie under a mounted path such as /tmp.
        paths = "|".join(map(re.escape, sorted(self.mounts, key=len, reverse=True)))
        return re.sub(rf"({paths})(?=/|\b|$)", lambda m: str(self.mounts[m.group(1)]), text)

    def kubeconfig_for(self, server: str) -> None:
        """The kubeconfig ConfigMap's file, pointed at the embedded cluster (the pod
        would reach it as kubernetes.default.svc) and at these files."""
        path = Path(self.local("/etc/meshgate/kubeconfig/kubeconfig"))
        path.write_text(self.local(path.read_text()).replace("https://kubernetes.default.svc",
                                                             server))

    def argv(self, **replace: str) -> list[str]:
        args = [self.local(arg) for arg in self.container["args"]]
        for old, new in replace.items():
            args = [new if arg == old else arg for arg in args]
        return [sys.executable, "-m", "mesh.cli", *args]


def ready(url: str) -> bool:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # as the kubelet's probes
    with urllib.request.urlopen(url, context=ctx, timeout=5) as resp:
        return bool(resp.status == 200)


@pytest.fixture(scope="module")
def control(cluster: Cluster, rendered: list[Obj],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pod = Pod(cluster, rendered, "meshgate-control", tmp_path_factory.mktemp("control"))
    pod.kubeconfig_for(cluster.server)
    proc, output, _, line = spawn(pod.argv(**{"--listen=0.0.0.0:8086": "--listen=127.0.0.1:0",
                                              "--injector-listen=0.0.0.0:8443":
                                                  "--injector-listen=127.0.0.1:0"}),
                                  lambda line: "serving at https://" in line,
                                  what="control plane")
    url = re.search(r"serving at (https://\S+)", line)
    assert url is not None
    try:
        wait_for(lambda: ready(f"{url.group(1)}/ready"), timeout=30,
                 what="the control plane ready with its ServiceAccount's rights")
        yield url.group(1)
    finally:
        stop_process(proc)
        # 403 as a status, not as a log line's milliseconds (",403").
        text = "".join(output)
        assert "Forbidden" not in text and not re.search(r"(?<![,\d])403(?!\d)", text), output


def test_the_control_plane_is_ready_with_its_service_account(control: str) -> None:
    assert ready(f"{control}/ready")


def test_the_gateway_gets_its_certificate_and_is_ready_with_its_service_account(
        cluster: Cluster, rendered: list[Obj], control: str,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    pod = Pod(cluster, rendered, "meshgate-gateway", tmp_path_factory.mktemp("gateway"))
    pod.kubeconfig_for(cluster.server)
    config_path = Path(pod.local("/etc/meshgate/gateway/gateway.yaml"))
    config = yaml.safe_load(pod.local(config_path.read_text()))
    assert config["identity"]["server"] == "https://meshgate-control.meshgate.svc:8086"
    admin = free_port()
    config["identity"]["server"] = control  # the pod reaches it by its Service's name
    config.update(listen=f"127.0.0.1:{free_port()}", admin=f"127.0.0.1:{admin}")
    config_path.write_text(yaml.safe_dump(config))
    proc, output, _, _ = spawn([*pod.argv(), "--loop", "asyncio"],
                               lambda line: "listening on" in line, what="gateway")
    try:
        wait_for(lambda: ready(f"http://127.0.0.1:{admin}/ready"), timeout=30,
                 what="the gateway ready with its ServiceAccount's rights")
    finally:
        stop_process(proc)
    assert "Forbidden" not in "".join(output), output


def test_the_mirror_controller_serves_a_link_with_its_service_account(
        cluster: Cluster, rendered: list[Obj], tmp_path_factory: pytest.TempPathFactory) -> None:
    api = cluster.api()
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        "multicluster.meshgate.io", "v1alpha1", "meshgate", "links", {
            "apiVersion": "multicluster.meshgate.io/v1alpha1", "kind": "Link",
            "metadata": {"name": "west"},
            "spec": {"targetClusterName": "west", "clusterCredentialsSecret": "west-creds",
                     "gatewayAddress": "192.0.2.1", "gatewayPort": 4143,
                     "gatewayIdentity": "meshgate-gateway.meshgate.serviceaccount.identity."
                                        "meshgate.cluster.local",
                     "selector": {"matchLabels": {"mirror.meshgate.io/exported": "true"}}}})
    pod = Pod(cluster, rendered, "meshgate-mirror", tmp_path_factory.mktemp("mirror"))
    pod.kubeconfig_for(cluster.server)
    argv = [sys.executable, *pod.container["command"][1:],
            *(pod.local(arg) for arg in pod.container["args"])]
    proc, output, _, _ = spawn(argv, lambda line: True, what="mirror controller")
    coordination = client.CoordinationV1Api(api)
    custom = client.CustomObjectsApi(api)

    def link_status() -> str:
        link = custom.get_namespaced_custom_object("multicluster.meshgate.io", "v1alpha1",
                                                   "meshgate", "links", "west")
        return yaml.safe_dump((link.get("status") or {}).get("conditions") or [])

    try:
        # Its child holds the Link's Lease (leases get/create/update) and says in the
        # Link's status (links/status patch) that the credentials are missing.
        lease = wait_for(lambda: coordination.read_namespaced_lease("mirror-west", "meshgate"),
                         timeout=30, what="the Link's Lease")
        assert lease.spec.holder_identity == "mirrorset-west"
        wait_for(lambda: "west-creds" in link_status(), timeout=30,
                 what="the Link's status naming its missing credentials")
    finally:
        stop_process(proc)
    log = (Path(pod.local("/var/run/meshgate/mirrors")) / "logs" / "mirror-west.log").read_text()
    assert "Forbidden" not in "".join(output) + log, "".join(output) + log


def test_without_its_cluster_role_the_gateway_says_which_right_it_lacks(
        cluster: Cluster, rendered: list[Obj], control: str,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """The gateway with its ClusterRoleBinding gone: not ready, and its log names the
    ServiceAccount and the right it lacks rather than failing somewhere later."""
    binding = find(rendered, "ClusterRoleBinding", "meshgate-gateway")
    rbac = client.RbacAuthorizationV1Api(cluster.api())
    rbac.delete_cluster_role_binding("meshgate-gateway")
    pod = Pod(cluster, rendered, "meshgate-gateway", tmp_path_factory.mktemp("unbound"))
    pod.kubeconfig_for(cluster.server)
    config_path = Path(pod.local("/etc/meshgate/gateway/gateway.yaml"))
    config = yaml.safe_load(pod.local(config_path.read_text()))
    admin = free_port()
    config["identity"]["server"] = control
    config.update(listen=f"127.0.0.1:{free_port()}", admin=f"127.0.0.1:{admin}")
    config_path.write_text(yaml.safe_dump(config))
    proc, output, _, _ = spawn([*pod.argv(), "--loop", "asyncio"],
                               lambda line: "listening on" in line, what="gateway")
    try:
        wait_for(lambda: "informer servers" in "".join(output), timeout=30,
                 what="the gateway's informers refused")
        assert not ready_or_false(f"http://127.0.0.1:{admin}/ready")
    finally:
        stop_process(proc)
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(binding))
    lines = [line for line in output if "WARNING mesh.informer" in line]
    user = 'User "system:serviceaccount:meshgate:meshgate-gateway"'
    for resource in ("pods", "services", "endpointslices"):
        said = next(line for line in lines if f"informer {resource}:" in line)
        assert f"{user} cannot list resource \"{resource}\"" in said, said
        assert "its role must allow list and watch (meshgate's roles: deploy/rbac-*.yaml)" in said
    informers = [re.search(r"informer (\S+):", line).group(1)  # type: ignore[union-attr]
                 for line in lines]
    assert len(informers) == len(set(informers)), "one line per informer, not per retry"


def ready_or_false(url: str) -> bool:
    try:
        return ready(url)
    except OSError:
        return False
