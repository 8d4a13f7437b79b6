"""The proxy injector webhook end to end through the embedded API server: the control
plane serves it (`control run --injector-listen`), the MutatingWebhookConfiguration and
Service are the ones `meshgate install` renders (caBundle: the trust bundle), and Pods
created with kubectl come out injected when they or their namespace ask for it,
unchanged otherwise, refused for a bad annotation, and admitted without a proxy while
the injector is down (failurePolicy Ignore)."""

from __future__ import annotations

import http.client
import re
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator

import pytest
import yaml
from kubernetes import client

from tests.cluster import Cluster, wait_for
from tests.controlplane import ControlProcess, start_control
from tests.meshproxy import Trust


def pod(name: str, namespace: str, annotations: dict[str, str] | None = None) -> str:
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace,
                     "annotations": annotations or {}},
        "spec": {"serviceAccountName": "default",
                 "containers": [{"name": "app", "image": "nginx"}]}})


def init_names(cluster: Cluster, namespace: str, name: str) -> list[str]:
    stored = client.CoreV1Api(cluster.api()).read_namespaced_pod(name, namespace)
    return [c.name for c in stored.spec.init_containers or []]


@pytest.fixture(scope="module")
def injector(cluster: Cluster, trust: Trust) -> Iterator[ControlProcess]:
    control = start_control(cluster, trust, extra=["--injector-listen", "127.0.0.1:0",
                                                   "--service-cidr", "10.96.0.0/16"])
    try:
        line = wait_for(lambda: next((x for x in control.output
                                      if "injector serving at" in x), None),
                        timeout=10, what="the injector to listen")
        found = re.search(r"https://127\.0\.0\.1:(\d+)/inject", line)
        assert found is not None, line
        rendered = subprocess.run([sys.executable, "-m", "mesh.cli", "install",
                                   "--identity-dir", str(trust.issuers.path)],
                                  capture_output=True, text=True, check=True).stdout
        docs = [d for d in yaml.safe_load_all(rendered) if d]
        wanted = [d for d in docs if d["kind"] in ("Namespace", "MutatingWebhookConfiguration")
                  or (d["kind"] == "Service" and d["metadata"]["name"] == "meshgate-injector")]
        # The control plane runs on this host, not in a pod: its endpoint by hand.
        wanted.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                       "metadata": {"name": "meshgate-injector-host", "namespace": "meshgate",
                                    "labels": {"kubernetes.io/service-name":
                                               "meshgate-injector"}},
                       "addressType": "IPv4",
                       "endpoints": [{"addresses": ["127.0.0.1"]}],
                       "ports": [{"name": "injector", "port": int(found.group(1))}]})
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(wanted))
        for ns, annotations in (("shop", {"meshgate.io/inject": "enabled"}), ("plain", {})):
            client.CoreV1Api(cluster.api()).create_namespace(
                {"metadata": {"name": ns, "annotations": annotations}})
        yield control
    finally:
        control.stop()


def test_a_pod_in_an_annotated_namespace_is_injected(cluster: Cluster,
                                                     injector: ControlProcess) -> None:
    cluster.kubectl("apply", "-f", "-", input=pod("web", "shop"))
    assert init_names(cluster, "shop", "web") == ["meshgate-init", "meshgate-proxy"]
    stored = client.CoreV1Api(cluster.api()).read_namespaced_pod("web", "shop")
    assert stored.metadata.annotations["meshgate.io/inbound-port"] == "4143"
    proxy = stored.spec.init_containers[1]
    assert proxy.restart_policy == "Always"
    env = {e.name: e.value for e in proxy.env}
    assert env["MESHGATE_PROXY_IDENTITY_TRUST_ANCHORS"].startswith("-----BEGIN CERTIFICATE")
    assert stored.spec.init_containers[0].args[-1] == "10.96.0.0/16"
    assert any("injector pod=shop/web injected=True" in line for line in injector.output)


def test_pods_that_do_not_ask_are_left_alone(cluster: Cluster,
                                             injector: ControlProcess) -> None:
    cluster.kubectl("apply", "-f", "-", input=pod("web", "plain"))
    assert init_names(cluster, "plain", "web") == []
    cluster.kubectl("apply", "-f", "-", input=pod("opted-out", "shop",
                                                   {"meshgate.io/inject": "disabled"}))
    assert init_names(cluster, "shop", "opted-out") == []
    cluster.kubectl("apply", "-f", "-", input=pod("asks", "plain",
                                                   {"meshgate.io/inject": "enabled"}))
    assert init_names(cluster, "plain", "asks") == ["meshgate-init", "meshgate-proxy"]


def test_a_bad_annotation_refuses_the_pod_with_the_reason(cluster: Cluster,
                                                          injector: ControlProcess) -> None:
    bad = pod("loud", "shop", {"config.meshgate.io/proxy-log-level": "loud"})
    proc = cluster.kubectl("apply", "-f", "-", input=bad, check=False)
    assert proc.returncode == 1
    assert ("meshgate-proxy-injector: pod/loud: annotation config.meshgate.io/"
            "proxy-log-level='loud' must be one of debug, info, warning, error"
            in proc.stderr), proc.stderr


def test_the_injector_names_itself_for_its_service_and_refuses_what_is_no_review(
        injector: ControlProcess, trust: Trust) -> None:
    line = next(x for x in injector.output if "injector serving at" in x)
    url = line.split("injector serving at ", 1)[1].strip()
    host, port = url.removeprefix("https://").split("/", 1)[0].rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(trust.bundle))
    for body, status in ((b"[]", 400), (b"not json", 400), (b'{"request": 1}', 400)):
        conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
        conn.sock = ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=10),
                                    server_hostname="meshgate-injector.meshgate.svc")
        conn.request("POST", "/inject", body=body,
                     headers={"Content-Type": "application/json"})
        answer = conn.getresponse()
        assert answer.status == status
        assert answer.read().decode().startswith("the body is not")
        conn.close()


def test_with_the_injector_down_pods_are_admitted_without_a_proxy(
        cluster: Cluster, injector: ControlProcess) -> None:
    injector.stop()
    cluster.kubectl("apply", "-f", "-", input=pod("while-down", "shop"))
    assert init_names(cluster, "shop", "while-down") == []
