"""Immutability, defaults and allocations, generation and DELETE answers, each as
kube-apiserver 1.32 gives them, seen through the pinned kubectl and the official client."""

from __future__ import annotations

import json
import uuid

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.cluster import Cluster

MERGE = "application/merge-patch+json"
IMMUTABLE_WHY = "Forbidden: field is immutable when `immutable` is set"
POD_UPDATE_REFUSAL = (
    'The Pod "p" is invalid: spec: Forbidden: pod updates may not change fields other than '
    "`spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,"
    "`spec.tolerations` (only additions to existing tolerations),"
    "`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously "
    "negative)")


def _ns(cluster: Cluster) -> str:
    name = f"s-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(cluster.api()).create_namespace({"metadata": {"name": name}})
    return name


def _refused(cluster: Cluster, *args: str) -> str:
    proc = cluster.kubectl(*args, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    return proc.stderr.strip()


def _body(e: pytest.ExceptionInfo[ApiException]) -> dict[str, object]:
    assert e.value.status == 422
    body = json.loads(e.value.body)
    assert body["reason"] == "Invalid"
    return dict(body)


# -- immutability --------------------------------------------------------------------


def test_immutable_config_map_refuses_changes(cluster: Cluster) -> None:
    ns = _ns(cluster)
    core = client.CoreV1Api(cluster.api())
    core.create_namespaced_config_map(ns, {"metadata": {"name": "c"}, "data": {"a": "1"},
                                           "binaryData": {"b": "AAE="}, "immutable": True})
    err = _refused(cluster, "patch", "configmap", "c", "-n", ns, "--type=merge",
                   "-p", '{"data":{"a":"2"}}')
    assert err == f'The ConfigMap "c" is invalid: data: {IMMUTABLE_WHY}'
    err = _refused(cluster, "patch", "configmap", "c", "-n", ns, "--type=merge",
                   "-p", '{"immutable":false,"binaryData":null}')
    assert err == (f'The ConfigMap "c" is invalid: \n* immutable: {IMMUTABLE_WHY}\n'
                   f"* binaryData: {IMMUTABLE_WHY}")
    with pytest.raises(ApiException) as e:
        core.patch_namespaced_config_map("c", ns, {"data": {"new": "x"}}, _content_type=MERGE)
    body = _body(e)
    assert body["message"] == f'ConfigMap "c" is invalid: data: {IMMUTABLE_WHY}'
    assert body["details"] == {"name": "c", "kind": "ConfigMap", "causes": [
        {"reason": "FieldValueForbidden", "message": IMMUTABLE_WHY, "field": "data"}]}
    # Metadata stays writable, and the object is unchanged by the refusals.
    cluster.kubectl("label", "configmap", "c", "-n", ns, "tier=a")
    got = core.read_namespaced_config_map("c", ns)
    assert got.data == {"a": "1"} and got.immutable and got.metadata.labels == {"tier": "a"}
    # A mutable one may become immutable, once.
    core.create_namespaced_config_map(ns, {"metadata": {"name": "m"}, "data": {"a": "1"}})
    cluster.kubectl("patch", "configmap", "m", "-n", ns, "--type=merge",
                    "-p", '{"immutable":true,"data":{"a":"2"}}')
    assert core.read_namespaced_config_map("m", ns).data == {"a": "2"}


def test_immutable_secret_and_secret_type(cluster: Cluster) -> None:
    ns = _ns(cluster)
    core = client.CoreV1Api(cluster.api())
    core.create_namespaced_secret(ns, {"metadata": {"name": "s"}, "immutable": True,
                                       "stringData": {"password": "hunter2"}})
    err = _refused(cluster, "patch", "secret", "s", "-n", ns, "--type=merge",
                   "-p", '{"stringData":{"password":"x"}}')
    assert err == f'The Secret "s" is invalid: data: {IMMUTABLE_WHY}'
    with pytest.raises(ApiException) as e:
        core.patch_namespaced_secret("s", ns, {"immutable": False}, _content_type=MERGE)
    assert _body(e)["message"] == f'Secret "s" is invalid: immutable: {IMMUTABLE_WHY}'

    core.create_namespaced_secret(ns, {"metadata": {"name": "t"}, "type": "example.com/a"})
    err = _refused(cluster, "patch", "secret", "t", "-n", ns, "--type=merge",
                   "-p", '{"type":"example.com/b"}')
    assert err == ('The Secret "t" is invalid: type: Invalid value: '
                   '"example.com/b": field is immutable')
    with pytest.raises(ApiException) as e:
        core.replace_namespaced_secret("t", ns, {"metadata": {"name": "t"}})
    assert _body(e)["message"] == ('Secret "t" is invalid: type: Invalid value: "Opaque": '
                                   "field is immutable")


def test_pod_spec_refuses_what_kube_refuses(cluster: Cluster) -> None:
    ns = _ns(cluster)
    core = client.CoreV1Api(cluster.api())
    core.create_namespaced_pod(ns, {"metadata": {"name": "p"}, "spec": {"containers": [
        {"name": "app", "image": "busybox:1.36", "command": ["sleep", "1"]}]}})
    err = _refused(cluster, "patch", "pod", "p", "-n", ns, "--type=merge",
                   "-p", '{"spec":{"restartPolicy":"Never"}}')
    lines = err.splitlines()
    assert lines[0] == POD_UPDATE_REFUSAL
    assert '- \tRestartPolicy: "Always",' in lines and '+ \tRestartPolicy: "Never",' in lines
    err = _refused(cluster, "patch", "pod", "p", "-n", ns, "--type=json", "-p",
                   '[{"op":"add","path":"/spec/containers/-","value":{"name":"b","image":"x"}}]')
    assert err == ('The Pod "p" is invalid: spec.containers: '
                   "Forbidden: pod updates may not add or remove containers")
    with pytest.raises(ApiException) as e:
        core.patch_namespaced_pod("p", ns, {"spec": {"tolerations": []}}, _content_type=MERGE)
    assert _body(e)["message"] == ('Pod "p" is invalid: spec.tolerations: Forbidden: existing '
                                   "toleration can not be modified except its tolerationSeconds")
    # What kube lets change: images, activeDeadlineSeconds, added tolerations.
    cluster.kubectl("set", "image", "pod/p", "-n", ns, "app=busybox:1.37")
    pod = core.patch_namespaced_pod("p", ns, {"spec": {
        "activeDeadlineSeconds": 60,
        "tolerations": [*[t.to_dict() for t in core.read_namespaced_pod("p", ns).spec.tolerations],
                        {"key": "k", "operator": "Exists", "effect": "NoSchedule"}]}},
        _content_type=MERGE)
    assert pod.spec.containers[0].image == "busybox:1.37"
    assert pod.spec.active_deadline_seconds == 60 and len(pod.spec.tolerations) == 3


def test_service_cluster_ip_may_not_change(cluster: Cluster) -> None:
    ns = _ns(cluster)
    core = client.CoreV1Api(cluster.api())
    core.create_namespaced_service(ns, {"metadata": {"name": "web"}, "spec": {
        "clusterIP": "10.96.77.7", "ports": [{"port": 80}]}})
    err = _refused(cluster, "patch", "service", "web", "-n", ns, "--type=merge",
                   "-p", '{"spec":{"clusterIP":"10.96.77.8"}}')
    assert err == ('The Service "web" is invalid: spec.clusterIPs[0]: '
                   'Invalid value: ["10.96.77.8"]: may not change once set')
    with pytest.raises(ApiException) as e:
        core.patch_namespaced_service("web", ns, {"spec": {"clusterIP": "None",
                                                           "clusterIPs": ["None"]}},
                                      _content_type=MERGE)
    assert _body(e)["message"] == ('Service "web" is invalid: spec.clusterIPs[0]: Invalid '
                                   'value: ["None"]: may not change once set')
    # An update that leaves the address out keeps it.
    svc = core.replace_namespaced_service("web", ns, {"metadata": {"name": "web"}, "spec": {
        "ports": [{"port": 81}]}})
    assert svc.spec.cluster_ip == "10.96.77.7" and svc.spec.cluster_ips == ["10.96.77.7"]


# -- defaults and allocations --------------------------------------------------------


def test_service_defaults_and_status(cluster: Cluster) -> None:
    ns = _ns(cluster)
    cluster.kubectl("create", "service", "clusterip", "web", "--tcp=80:8080", "-n", ns)
    svc = json.loads(cluster.kubectl("get", "service", "web", "-n", ns, "-o", "json").stdout)
    spec = svc["spec"]
    assert spec["type"] == "ClusterIP" and spec["sessionAffinity"] == "None"
    assert spec["internalTrafficPolicy"] == "Cluster" and "externalTrafficPolicy" not in spec
    assert spec["ipFamilies"] == ["IPv4"] and spec["ipFamilyPolicy"] == "SingleStack"
    assert spec["ports"] == [{"name": "80-8080", "port": 80, "protocol": "TCP",
                              "targetPort": 8080}]
    assert svc["status"] == {"loadBalancer": {}}
    assert "generation" not in svc["metadata"]

    core = client.CoreV1Api(cluster.api())
    sticky = core.create_namespaced_service(ns, {"metadata": {"name": "sticky"}, "spec": {
        "sessionAffinity": "ClientIP", "ports": [{"port": 80, "targetPort": "http"}]}})
    assert sticky.spec.session_affinity_config.client_ip.timeout_seconds == 10800
    assert sticky.spec.ports[0].target_port == "http"
    assert sticky.status.load_balancer is not None


def test_node_ports_allocated_and_conflicts_refused(cluster: Cluster) -> None:
    ns = _ns(cluster)
    core = client.CoreV1Api(cluster.api())
    cluster.kubectl("create", "service", "nodeport", "np", "--tcp=80:8080", "-n", ns)
    svc = core.read_namespaced_service("np", ns)
    port = svc.spec.ports[0].node_port
    assert 30000 <= port <= 32767
    assert svc.spec.external_traffic_policy == "Cluster"
    row = cluster.kubectl("get", "service", "np", "-n", ns).stdout.splitlines()[1].split()
    assert row[1] == "NodePort" and row[4] == f"80:{port}/TCP"

    err = _refused(cluster, "create", "service", "nodeport", "again", "--tcp=81:8080",
                   f"--node-port={port}", "-n", ns)
    assert err == ('error: failed to create NodePort service: Service "again" is invalid: '
                   f"spec.ports[0].nodePort: Invalid value: {port}: provided port is already "
                   "allocated")
    with pytest.raises(ApiException) as e:
        core.create_namespaced_service(ns, {"metadata": {"name": "far"}, "spec": {
            "type": "NodePort", "ports": [{"port": 80, "nodePort": 40000}]}})
    assert _body(e)["message"] == (
        'Service "far" is invalid: spec.ports[0].nodePort: Invalid value: 40000: provided port '
        "is not in the valid range. The range of valid ports is 30000-32767")
    with pytest.raises(ApiException) as e:
        core.create_namespaced_service(ns, {"metadata": {"name": "cip"}, "spec": {
            "ports": [{"port": 80, "nodePort": 30999}]}})
    assert _body(e)["message"] == ('Service "cip" is invalid: spec.ports[0].nodePort: '
                                   "Forbidden: may not be used when `type` is 'ClusterIP'")

    # An update keeps the port; becoming ClusterIP gives it back for another to take.
    kept = core.patch_namespaced_service("np", ns, {"metadata": {"labels": {"a": "b"}}},
                                         _content_type=MERGE)
    assert kept.spec.ports[0].node_port == port
    cluster.kubectl("patch", "service", "np", "-n", ns, "--type=merge",
                    "-p", '{"spec":{"type":"ClusterIP"}}')
    plain = core.read_namespaced_service("np", ns)
    assert plain.spec.ports[0].node_port is None and plain.spec.external_traffic_policy is None
    taken = core.create_namespaced_service(ns, {"metadata": {"name": "again"}, "spec": {
        "type": "NodePort", "ports": [{"port": 81, "nodePort": port}]}})
    assert taken.spec.ports[0].node_port == port


def test_load_balancer_defaults(cluster: Cluster) -> None:
    ns = _ns(cluster)
    core = client.CoreV1Api(cluster.api())
    lb = core.create_namespaced_service(ns, {"metadata": {"name": "lb"}, "spec": {
        "type": "LoadBalancer", "externalTrafficPolicy": "Local",
        "ports": [{"port": 443, "name": "https"}, {"port": 80, "name": "http"}]}})
    ports = {p.node_port for p in lb.spec.ports} | {lb.spec.health_check_node_port}
    assert len(ports) == 3 and all(30000 <= p <= 32767 for p in ports)
    assert lb.spec.allocate_load_balancer_node_ports is True
    assert lb.spec.external_traffic_policy == "Local"
    assert lb.status.load_balancer.to_dict() == {"ingress": None}
    row = cluster.kubectl("get", "service", "lb", "-n", ns).stdout.splitlines()[1].split()
    assert row[1] == "LoadBalancer"
    with pytest.raises(ApiException) as e:
        core.create_namespaced_service(ns, {"metadata": {"name": "x"}, "spec": {
            "externalTrafficPolicy": "Cluster", "ports": [{"port": 80}]}})
    assert _body(e)["message"] == ('Service "x" is invalid: spec.externalTrafficPolicy: '
                                   'Invalid value: "Cluster": may only be set for '
                                   "externally-accessible services")


def test_pod_defaults_and_admission(cluster: Cluster) -> None:
    ns = _ns(cluster)
    cluster.kubectl("run", "p", "--image=busybox", "-n", ns, "--", "sleep", "1")
    pod = json.loads(cluster.kubectl("get", "pod", "p", "-n", ns, "-o", "json").stdout)
    spec = pod["spec"]
    assert "generation" not in pod["metadata"]
    assert spec["restartPolicy"] == "Always" and spec["dnsPolicy"] == "ClusterFirst"
    assert spec["terminationGracePeriodSeconds"] == 30
    assert spec["serviceAccountName"] == spec["serviceAccount"] == "default"
    assert spec["enableServiceLinks"] is True and spec["schedulerName"] == "default-scheduler"
    assert spec["securityContext"] == {} and spec["priority"] == 0
    assert spec["preemptionPolicy"] == "PreemptLowerPriority"
    assert spec["tolerations"] == [
        {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute",
         "tolerationSeconds": 300},
        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
         "tolerationSeconds": 300}]
    (c,) = spec["containers"]
    assert c["imagePullPolicy"] == "Always" and c["resources"] == {}
    assert c["terminationMessagePath"] == "/dev/termination-log"
    assert c["terminationMessagePolicy"] == "File"
    assert pod["status"] == {"phase": "Pending", "qosClass": "BestEffort"}

    core = client.CoreV1Api(cluster.api())
    core.create_namespaced_service_account(ns, {"metadata": {"name": "robot"}})
    made = core.create_namespaced_pod(ns, {"metadata": {"name": "q"}, "spec": {
        "serviceAccount": "robot", "restartPolicy": "Never",
        "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists"}],
        "containers": [
            {"name": "a", "image": "example.com:5000/app:1.2", "ports": [{"containerPort": 80}],
             "resources": {"limits": {"cpu": "1", "memory": "64Mi"}},
             "readinessProbe": {"httpGet": {"port": 80}}},
            {"name": "b", "image": "app@sha256:" + "0" * 64,
             "resources": {"limits": {"cpu": "1", "memory": "64Mi"}}},
            {"name": "c", "image": "app:latest",
             "resources": {"limits": {"cpu": "1", "memory": "64Mi"}}}]}})
    s = made.spec
    assert s.service_account_name == "robot" and s.restart_policy == "Never"
    assert [t.key for t in s.tolerations] == ["node.kubernetes.io/not-ready",
                                              "node.kubernetes.io/unreachable"]
    assert [c.image_pull_policy for c in s.containers] == ["IfNotPresent", "IfNotPresent",
                                                            "Always"]
    assert s.containers[0].ports[0].protocol == "TCP"
    assert s.containers[0].resources.requests == {"cpu": "1", "memory": "64Mi"}
    probe = s.containers[0].readiness_probe
    assert (probe.http_get.path, probe.http_get.scheme, probe.period_seconds,
            probe.timeout_seconds, probe.failure_threshold) == ("/", "HTTP", 10, 1, 3)
    assert made.status.qos_class == "Guaranteed"


# -- generation and DELETE answers ---------------------------------------------------


def test_generation_only_where_kube_keeps_it(cluster: Cluster) -> None:
    ns = _ns(cluster)
    core = client.CoreV1Api(cluster.api())
    cm = core.create_namespaced_config_map(ns, {"metadata": {"name": "c"}, "data": {"a": "1"}})
    assert cm.metadata.generation is None
    cm = core.patch_namespaced_config_map("c", ns, {"data": {"a": "2"}}, _content_type=MERGE)
    assert cm.metadata.generation is None
    disc = client.DiscoveryV1Api(cluster.api())
    es = disc.create_namespaced_endpoint_slice(ns, {"metadata": {"name": "e"},
                                                    "addressType": "IPv4", "endpoints": []})
    assert es.metadata.generation == 1
    es = disc.patch_namespaced_endpoint_slice("e", ns, {"endpoints": [
        {"addresses": ["10.1.0.1"]}]}, _content_type=MERGE)
    assert es.metadata.generation == 2


def test_delete_answers_per_kind(cluster: Cluster) -> None:
    ns = _ns(cluster)
    core = client.CoreV1Api(cluster.api())
    made = core.create_namespaced_config_map(ns, {"metadata": {"name": "c"}})
    status, body = cluster.raw("DELETE", f"/api/v1/namespaces/{ns}/configmaps/c")
    assert status == 200 and body == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
        "details": {"name": "c", "kind": "configmaps", "uid": made.metadata.uid}}
    core.create_namespaced_secret(ns, {"metadata": {"name": "s"}})
    answer = core.delete_namespaced_secret("s", ns)
    assert answer["kind"] == "Status" and answer["details"]["kind"] == "secrets"

    core.create_namespaced_service(ns, {"metadata": {"name": "web"}, "spec": {
        "ports": [{"port": 80}]}})
    status, body = cluster.raw("DELETE", f"/api/v1/namespaces/{ns}/services/web")
    assert status == 200 and body["kind"] == "Service" and body["metadata"]["name"] == "web"
    core.create_namespaced_pod(ns, {"metadata": {"name": "p"}, "spec": {"containers": [
        {"name": "a", "image": "x"}]}})
    status, body = cluster.raw("DELETE", f"/api/v1/namespaces/{ns}/pods/p")
    assert status == 200 and body["kind"] == "Pod"

    # Held by a finalizer: the object, marked for deletion.
    core.create_namespaced_config_map(ns, {"metadata": {"name": "held",
                                                        "finalizers": ["example.com/x"]}})
    status, body = cluster.raw("DELETE", f"/api/v1/namespaces/{ns}/configmaps/held")
    assert status == 200 and body["kind"] == "ConfigMap"
    assert body["metadata"]["deletionTimestamp"]
    core.patch_namespaced_config_map("held", ns, {"metadata": {"finalizers": None}},
                                     _content_type=MERGE)

    out = cluster.kubectl("delete", "configmap", "kube-root-ca.crt", "-n", ns).stdout
    assert out.strip() == f'configmap "kube-root-ca.crt" deleted from {ns} namespace'
    for name in ("a", "b"):
        core.create_namespaced_config_map(ns, {"metadata": {"name": name, "labels": {"x": "y"}}})
    status, body = cluster.raw("DELETE", f"/api/v1/namespaces/{ns}/configmaps?labelSelector=x%3Dy")
    assert status == 200 and body["kind"] == "ConfigMapList"
    assert sorted(i["metadata"]["name"] for i in body["items"]) == ["a", "b"]
    assert core.list_namespaced_config_map(ns, label_selector="x=y").items == []


# -- events --------------------------------------------------------------------------


def test_events_in_both_versions(cluster: Cluster) -> None:
    ns = _ns(cluster)
    api = cluster.api()
    core, events = client.CoreV1Api(api), client.EventsV1Api(api)
    svc = core.create_namespaced_service(ns, {"metadata": {"name": "web"}, "spec": {
        "ports": [{"port": 80}]}})
    regarding = {"kind": "Service", "namespace": ns, "name": "web", "uid": svc.metadata.uid,
                 "apiVersion": "v1"}
    core.create_namespaced_event(ns, {
        "metadata": {"name": "web.1"}, "involvedObject": regarding, "type": "Warning",
        "reason": "FailedToUpdateEndpointSlices", "message": "Error updating Endpoint Slices",
        "source": {"component": "endpoint-slice-controller"}, "count": 2,
        "firstTimestamp": "2026-01-01T00:00:00Z", "lastTimestamp": "2026-01-01T00:01:00Z"})
    events.create_namespaced_event(ns, {
        "metadata": {"name": "web.2"}, "regarding": regarding, "type": "Normal",
        "reason": "Synced", "note": "all good", "action": "Sync",
        "eventTime": "2026-01-01T00:02:00.000000Z", "reportingController": "example.com/ctl",
        "reportingInstance": "ctl-1"})

    as_core = {e.metadata.name: e for e in core.list_namespaced_event(ns).items}
    assert as_core["web.2"].message == "all good" and as_core["web.2"].involved_object.name == \
        "web"
    assert as_core["web.2"].reporting_component == "example.com/ctl"
    # Read raw: an Event written through core/v1 has no eventTime, which the client's
    # events.k8s.io model insists on (as it does against kube).
    status, listed = cluster.raw("GET", f"/apis/events.k8s.io/v1/namespaces/{ns}/events")
    assert status == 200 and listed["kind"] == "EventList"
    as_v1 = {e["metadata"]["name"]: e for e in listed["items"]}
    assert as_v1["web.1"]["apiVersion"] == "events.k8s.io/v1"
    assert as_v1["web.1"]["note"] == "Error updating Endpoint Slices"
    assert as_v1["web.1"]["regarding"]["uid"] == svc.metadata.uid
    assert as_v1["web.1"]["deprecatedCount"] == 2
    assert as_v1["web.1"]["deprecatedLastTimestamp"] == "2026-01-01T00:01:00Z"
    assert as_v1["web.2"]["eventTime"] == "2026-01-01T00:02:00.000000Z"
    assert as_v1["web.1"]["deprecatedSource"] == {"component": "endpoint-slice-controller"}
    assert "involvedObject" not in as_v1["web.1"] and "message" not in as_v1["web.1"]
    picked = events.list_namespaced_event(ns, field_selector="regarding.name=web,type=Normal")
    assert [e.metadata.name for e in picked.items] == ["web.2"]
    assert picked.items[0].note == "all good"
    picked = core.list_namespaced_event(ns, field_selector="involvedObject.name=web,"
                                        "reason=FailedToUpdateEndpointSlices")
    assert [e.metadata.name for e in picked.items] == ["web.1"]

    rows = cluster.kubectl("get", "events", "-n", ns).stdout.splitlines()
    assert rows[0].split() == ["LAST", "SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]
    assert any(r.split()[1:5] == ["Warning", "FailedToUpdateEndpointSlices", "service/web",
                                  "Error"] for r in rows[1:])
    rows = cluster.kubectl("get", "events.v1.events.k8s.io", "-n", ns).stdout.splitlines()
    assert any("Synced" in r and "service/web" in r and "all good" in r for r in rows[1:])
    described = cluster.kubectl("describe", "service", "web", "-n", ns).stdout
    events_part = described.split("Events:", 1)[1]
    assert "FailedToUpdateEndpointSlices" in events_part and "all good" in events_part

    # Raw: the client refuses to send an Event without eventTime at all.
    status, body = cluster.raw("POST", f"/apis/events.k8s.io/v1/namespaces/{ns}/events",
                               json.dumps({"metadata": {"name": "bad"}, "regarding": regarding,
                                           "type": "Odd", "note": "x",
                                           "deprecatedCount": 3}).encode())
    assert status == 422 and body["message"] == (
        'Event.events.k8s.io "bad" is invalid: [eventTime: Required value, '
        "reportingController: Required value, reportingInstance: Required value, action: "
        'Required value, reason: Required value, type: Unsupported value: "Odd": supported '
        'values: "Normal", "Warning", deprecatedCount: Invalid value: "": needs to be unset]')
    status, body = cluster.raw("DELETE", f"/apis/events.k8s.io/v1/namespaces/{ns}/events/web.1")
    assert status == 200 and body["details"] == {"name": "web.1", "group": "events.k8s.io",
                                                 "kind": "events",
                                                 "uid": as_core["web.1"].metadata.uid}
    assert [e.metadata.name for e in core.list_namespaced_event(ns).items] == ["web.2"]


def test_kubectl_apply_keeps_what_the_server_filled_in(cluster: Cluster) -> None:
    ns = _ns(cluster)
    manifest = """
apiVersion: v1
kind: Pod
metadata: {name: app, namespace: NS}
spec:
  containers: [{name: app, image: "busybox:IMAGE", command: [sleep, "1"]}]
---
apiVersion: v1
kind: Service
metadata: {name: app, namespace: NS}
spec:
  type: NodePort
  selector: {app: app}
  ports: [{port: 80}]
"""

    def apply(image: str) -> str:
        text = manifest.replace("NS", ns).replace("IMAGE", image)
        return cluster.kubectl("apply", "-f", "-", input=text).stdout

    assert apply("1.36").split() == ["pod/app", "created", "service/app", "created"]
    port = client.CoreV1Api(cluster.api()).read_namespaced_service("app", ns).spec.ports[0]
    assert apply("1.36").split() == ["pod/app", "unchanged", "service/app", "unchanged"]
    assert apply("1.37").split() == ["pod/app", "configured", "service/app", "unchanged"]
    again = client.CoreV1Api(cluster.api()).read_namespaced_service("app", ns).spec.ports[0]
    assert again.node_port == port.node_port
    text = manifest.replace("NS", ns).replace("IMAGE", "1.37").replace(
        'command: [sleep, "1"]', 'command: [sleep, "2"]')
    proc = cluster.kubectl("apply", "-f", "-", input=text, check=False)
    assert proc.returncode == 1
    assert 'The Pod "app" is invalid: spec: Forbidden: pod updates may not change fields' in \
        proc.stderr


def test_service_type_changes_to_and_from_external_name(cluster: Cluster) -> None:
    ns = _ns(cluster)
    core = client.CoreV1Api(cluster.api())
    core.create_namespaced_service(ns, {"metadata": {"name": "s"}, "spec": {
        "ports": [{"port": 80}]}})
    err = _refused(cluster, "patch", "service", "s", "-n", ns, "--type=merge",
                   "-p", '{"spec":{"type":"ExternalName"}}')
    assert err == 'The Service "s" is invalid: spec.externalName: Required value'
    cluster.kubectl("patch", "service", "s", "-n", ns, "--type=merge",
                    "-p", '{"spec":{"type":"ExternalName","externalName":"example.com"}}')
    named = core.read_namespaced_service("s", ns).spec
    assert (named.cluster_ip, named.cluster_ips, named.ip_families,
            named.internal_traffic_policy) == (None, None, None, None)
    cluster.kubectl("patch", "service", "s", "-n", ns, "--type=merge",
                    "-p", '{"spec":{"type":"ClusterIP","externalName":null}}')
    addressed = core.read_namespaced_service("s", ns).spec
    assert addressed.cluster_ip and addressed.cluster_ips == [addressed.cluster_ip]
    assert addressed.ip_families == ["IPv4"]
