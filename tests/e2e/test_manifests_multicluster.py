"""The multicluster scenario (as tests/e2e/test_multicluster.py runs it) on two
clusters whose control plane, gateway and mirror controller are meshgate's own
manifests run by the kubelet (`cluster up --control-plane=manifests`): linked both
ways with `meshgate multicluster link`, which finds each gateway at the WAN address
its LoadBalancer Service names, a pod in east calls west's exported Service by its
mirror's name, through west's gateway Pod, and west's pod sees east's caller.

    client (east pod) -> east node (masquerade) -> WAN -> west node (DNAT to the
    gateway Pod) -> west gateway -> web (west pod)
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from kubernetes import client

from mesh.kube import api_client
from tests.cluster import wait_for
from tests.e2e.clusters import DEMO_APP, Clusters, Topology, clusters
from tests.e2e.pod_scripts import CALLS

EAST, WEST = "mfmceast", "mfmcwest"
TOPOLOGY = Topology(wan="mg-mfmcwan", wan_cidr="172.31.235.0/24", cidrs={
    EAST: ("10.242.0.0/16", "10.243.0.0/16"), WEST: ("10.246.0.0/16", "10.247.0.0/16")})
MIRROR = f"web-{WEST}"
CALLER = "frontend.default.serviceaccount.identity.meshgate.cluster.local"
GATEWAY_ID = "meshgate-gateway.meshgate.serviceaccount.identity.meshgate.cluster.local"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

SERVICES = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default, labels: {mirror.meshgate.io/exported: "true"}}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""


@pytest.fixture(scope="module")
def mc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clusters]:
    with clusters(tmp_path_factory.mktemp("mfmc"), TOPOLOGY) as c:
        c.up(EAST, "--control-plane=manifests")
        c.up(WEST, "--control-plane=manifests")
        c.link(EAST, WEST)
        c.link(WEST, EAST)
        c.kubectl(WEST, "apply", "-f", "-", input=SERVICES)
        c.run_pod(WEST, "web-1", *DEMO_APP, sa="web", labels=("app=web",), port=8080)
        c.run_pod(EAST, "client", "sleep", "600", sa="frontend")
        yield c


def mirror_ready(mc: Clusters) -> list[bool]:
    slices = client.DiscoveryV1Api(api_client(mc.kubeconfig(EAST)))
    found = slices.list_namespaced_endpoint_slice(
        "default", label_selector=f"kubernetes.io/service-name={MIRROR}").items
    return [bool(ep.conditions and ep.conditions.ready)
            for s in found for ep in s.endpoints or []]


def test_link_finds_the_gateway_pod_at_its_wan_address(mc: Clusters) -> None:
    link = mc.kubectl(EAST, "-n", "meshgate", "get", "link", WEST, "-o",
                      "jsonpath={.spec.gatewayAddress}:{.spec.gatewayPort}")
    assert link == f"{mc.wan_address(WEST)}:4143"
    # West's mirror controller is a Pod.
    assert "1/1" in mc.kubectl(WEST, "-n", "meshgate", "get", "deploy", "meshgate-mirror",
                               "--no-headers")


def test_a_pod_calls_the_other_cluster_by_name_through_the_gateway_pod(mc: Clusters
                                                                        ) -> None:
    wait_for(lambda: mirror_ready(mc) == [True], timeout=60, interval=0.5,
             what=f"the mirror {MIRROR} to have a ready gateway endpoint")
    url = f"http://{MIRROR}.default.svc.cluster.local/"
    answers = wait_for(
        lambda: (a := mc.in_pod(EAST, "client", CALLS, "5", url).splitlines())
        and all(x.startswith("200") for x in a) and a,
        timeout=30, interval=0.5, what="calls through west's gateway Pod")
    assert answers == ["200 hello from web-1 in default"] * 5
    # West's pod authorized and counted east's pod, not the gateway that forwarded it.
    assert mc.metric(WEST, "web-1", "request_total", direction="inbound",
                     client_id=CALLER) >= 5
    assert mc.metric(WEST, "web-1", "inbound_gateway_forwarded_total",
                     gateway_id=GATEWAY_ID, client_id=CALLER) >= 1
