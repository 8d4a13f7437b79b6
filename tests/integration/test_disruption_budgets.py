"""policy/v1 PodDisruptionBudgets on the embedded cluster: served as kube serves them
(`kubectl get pdb` columns, kube's validation), and their status written as kube's
disruption controller writes it as the Pods they select come and turn Ready. Nothing
runs the Pods here: a test marks them Running and Ready as a kubelet would."""

from __future__ import annotations

import json
import uuid

from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.cluster import Cluster, wait_for

DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: {ns}}}
spec:
  replicas: 4
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      containers: [{{name: web, image: busybox, command: [sleep, "3600"]}}]
"""


def _status(cluster: Cluster, ns: str, name: str) -> dict[str, object]:
    pdb = client.PolicyV1Api(cluster.api()).read_namespaced_pod_disruption_budget(name, ns)
    return cluster.api().sanitize_for_serialization(pdb.status) or {}


def _ready(cluster: Cluster, ns: str, count: int) -> None:
    core = client.CoreV1Api(cluster.api())
    pods = wait_for(lambda: (p := core.list_namespaced_pod(ns).items) and len(p) == 4 and p,
                    timeout=20, what="the deployment's 4 pods")
    for pod in pods[:count]:
        core.patch_namespaced_pod_status(pod.metadata.name, ns, {"status": {
            "phase": "Running", "conditions": [
                {"type": "Ready", "status": "True",
                 "lastTransitionTime": "2024-05-01T10:00:00Z"}]}})


def test_a_budget_counts_the_healthy_pods_it_selects(cluster: Cluster) -> None:
    ns = f"pdb-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", ns)
    cluster.kubectl("apply", "-f", "-", input=DEPLOYMENT.format(ns=ns))
    cluster.kubectl("create", "poddisruptionbudget", "web-min", "-n", ns,
                    "--selector=app=web", "--min-available=2")
    cluster.kubectl("create", "poddisruptionbudget", "web-max", "-n", ns,
                    "--selector=app=web", "--max-unavailable=25%")
    _ready(cluster, ns, 3)
    got = wait_for(lambda: (s := _status(cluster, ns, "web-min")).get("currentHealthy") == 3
                   and s, timeout=20, what="web-min's status")
    assert (got["disruptionsAllowed"], got["desiredHealthy"], got["expectedPods"]) == (1, 2, 4)
    assert [(c["type"], c["status"], c["reason"]) for c in got["conditions"]] == [
        ("DisruptionAllowed", "True", "SufficientPods")]
    # 25 % of the ReplicaSet's 4 may be down: 3 must be healthy, and 3 are.
    got = wait_for(lambda: (s := _status(cluster, ns, "web-max")).get("currentHealthy") == 3
                   and s, timeout=20, what="web-max's status")
    assert (got["disruptionsAllowed"], got["desiredHealthy"], got["expectedPods"]) == (0, 3, 4)
    assert got["conditions"][0]["reason"] == "InsufficientPods"
    rows = [line.split() for line in cluster.kubectl("get", "pdb", "-n", ns).stdout
            .splitlines()]
    assert rows[0] == ["NAME", "MIN", "AVAILABLE", "MAX", "UNAVAILABLE", "ALLOWED",
                       "DISRUPTIONS", "AGE"]
    assert [r[:4] for r in rows[1:]] == [["web-max", "N/A", "25%", "0"],
                                         ["web-min", "2", "N/A", "1"]]


def test_a_budget_with_both_bounds_is_refused_as_kube_refuses_it(cluster: Cluster) -> None:
    policy = client.PolicyV1Api(cluster.api())
    try:
        policy.create_namespaced_pod_disruption_budget("default", {
            "metadata": {"name": "both"},
            "spec": {"minAvailable": 1, "maxUnavailable": "150%",
                     "selector": {"matchLabels": {"app": "x"}}}})
    except ApiException as e:
        assert e.status == 422
        message = json.loads(e.body)["message"]
        assert message.startswith('PodDisruptionBudget.policy "both" is invalid: [')
        assert "minAvailable and maxUnavailable cannot be both set" in message
        assert "spec.maxUnavailable" in message
    else:
        raise AssertionError("a budget with minAvailable and maxUnavailable was accepted")
