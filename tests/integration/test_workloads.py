"""apps/v1 and batch/v1 workloads on the embedded cluster, driven with the pinned
kubectl and the official client. Nothing runs the Pods here: a test marks a Pod
Running and Ready (or Succeeded) through its status subresource, as a kubelet
would, and checks that the controllers react."""

from __future__ import annotations

import datetime
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.cluster import Cluster, wait_for


@pytest.fixture
def ns(cluster: Cluster) -> Iterator[str]:
    name = f"w-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name


def _core(cluster: Cluster) -> Any:
    return client.CoreV1Api(cluster.api())


def _apps(cluster: Cluster) -> Any:
    return client.AppsV1Api(cluster.api())


def _pods(cluster: Cluster, ns: str, selector: str = "") -> list[Any]:
    return [p for p in _core(cluster).list_namespaced_pod(ns, label_selector=selector).items
            if not p.metadata.deletion_timestamp]


def _mark(cluster: Cluster, ns: str, name: str, phase: str = "Running") -> None:
    """What a kubelet reports for a started (or finished) pod."""
    ready = "True" if phase == "Running" else "False"
    _core(cluster).patch_namespaced_pod_status(name, ns, {"status": {
        "phase": phase, "podIP": "10.244.0.9",
        "conditions": [{"type": "Ready", "status": ready}]}})


def _ready_all(cluster: Cluster, ns: str) -> int:
    marked = 0
    for pod in _pods(cluster, ns):
        if pod.status.phase == "Pending":
            _mark(cluster, ns, pod.metadata.name)
            marked += 1
    return marked


def _rollout(cluster: Cluster, ns: str, target: str, want: int) -> str:
    """`kubectl rollout status` while pods are marked ready as they appear."""
    args = [str(Path(cluster.kubectl("version", "--client", "-o", "yaml").args[0])),
            "--kubeconfig", str(cluster.kubeconfig), "rollout", "status", target, "-n", ns,
            "--timeout=30s"]
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        def done() -> bool:
            _ready_all(cluster, ns)
            return proc.poll() is not None
        wait_for(done, timeout=30, what=f"rollout of {target}")
        out = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, out
    assert len([p for p in _pods(cluster, ns) if p.status.phase == "Running"]) >= want
    return out


def _events(cluster: Cluster, ns: str) -> set[tuple[str, str, str, str]]:
    """(object kind, reporting component, reason, message) of the namespace's Events."""
    return {(e.involved_object.kind, e.source.component, e.reason, e.message)
            for e in _core(cluster).list_namespaced_event(ns).items}


def _message(e: ApiException) -> str:
    return str(json.loads(e.body)["message"])


def _table(cluster: Cluster, *args: str) -> list[list[str]]:
    return [line.split() for line in cluster.kubectl("get", *args).stdout.splitlines()]


# -- Deployments -----------------------------------------------------------------------


def test_create_deployment_rolls_out_and_is_available(cluster: Cluster, ns: str) -> None:
    out = cluster.kubectl("create", "deployment", "web", "--image=nginx:1.27", "--replicas=2",
                          "-n", ns).stdout
    assert out.strip() == "deployment.apps/web created"
    rows = _table(cluster, "deploy", "-n", ns)
    assert rows[0] == ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]
    assert rows[1][:2] == ["web", "0/2"]
    pods = wait_for(lambda: len(_pods(cluster, ns, "app=web")) == 2 and _pods(
        cluster, ns, "app=web"), what="two pods")
    rs = _apps(cluster).list_namespaced_replica_set(ns).items
    assert len(rs) == 1
    rs_name, template_hash = rs[0].metadata.name, rs[0].metadata.labels["pod-template-hash"]
    assert rs_name == f"web-{template_hash}"
    assert rs[0].metadata.annotations["deployment.kubernetes.io/revision"] == "1"
    assert rs[0].metadata.owner_references[0].kind == "Deployment"
    for pod in pods:
        owner = pod.metadata.owner_references[0]
        assert (owner.kind, owner.name, owner.controller) == ("ReplicaSet", rs_name, True)
        assert pod.metadata.name.startswith(f"{rs_name}-")
        assert len(pod.metadata.name) == len(rs_name) + 6
        assert pod.metadata.labels["pod-template-hash"] == template_hash
        assert pod.spec.node_name == f"{cluster.args[cluster.args.index('--name') + 1]}" \
            "-control-plane"

    out = _rollout(cluster, ns, "deployment/web", 2)
    assert 'deployment "web" successfully rolled out' in out
    waited = cluster.kubectl("wait", "--for=condition=Available", "deployment/web", "-n", ns,
                             "--timeout=10s")
    assert "condition met" in waited.stdout
    dep = _apps(cluster).read_namespaced_deployment("web", ns)
    assert (dep.status.replicas, dep.status.updated_replicas, dep.status.ready_replicas,
            dep.status.available_replicas) == (2, 2, 2, 2)
    assert dep.status.observed_generation == dep.metadata.generation
    reasons = {c.type: (c.status, c.reason) for c in dep.status.conditions}
    assert reasons == {"Available": ("True", "MinimumReplicasAvailable"),
                       "Progressing": ("True", "NewReplicaSetAvailable")}
    assert dep.metadata.annotations["deployment.kubernetes.io/revision"] == "1"
    assert _table(cluster, "deploy", "web", "-n", ns)[1][:4] == ["web", "2/2", "2", "2"]
    events = _events(cluster, ns)
    assert ("Deployment", "deployment-controller", "ScalingReplicaSet",
            f"Scaled up replica set {rs_name} from 0 to 2") in events
    assert {("ReplicaSet", "replicaset-controller", "SuccessfulCreate",
             f"Created pod: {p.metadata.name}") for p in pods} <= events


def test_scale_one_three_zero(cluster: Cluster, ns: str) -> None:
    cluster.kubectl("create", "deployment", "s", "--image=app:1", "-n", ns)
    wait_for(lambda: len(_pods(cluster, ns)) == 1, what="one pod")
    _rollout(cluster, ns, "deployment/s", 1)
    assert cluster.kubectl("scale", "deployment/s", "--replicas=3", "-n", ns).stdout.strip() \
        == "deployment.apps/s scaled"
    _rollout(cluster, ns, "deployment/s", 3)
    assert len(_pods(cluster, ns)) == 3
    scale = _apps(cluster).read_namespaced_deployment_scale("s", ns)
    assert (scale.spec.replicas, scale.status.replicas, scale.status.selector) == (3, 3, "app=s")
    cluster.kubectl("scale", "deployment/s", "--replicas=0", "-n", ns)
    wait_for(lambda: not _pods(cluster, ns), what="no pods")
    assert _table(cluster, "deploy", "s", "-n", ns)[1][:4] == ["s", "0/0", "0", "0"]
    bad = cluster.kubectl("scale", "deployment/s", "--replicas=-1", "-n", ns, check=False)
    assert bad.returncode != 0 and "--replicas=COUNT" in bad.stderr + bad.stdout
    with pytest.raises(ApiException) as refused:
        _apps(cluster).patch_namespaced_deployment_scale("s", ns, {"spec": {"replicas": -2}})
    assert refused.value.status == 422
    assert "spec.replicas: Invalid value: -2: must be greater than or equal to 0" in \
        _message(refused.value)


def test_rollout_update_undo_and_restart(cluster: Cluster, ns: str) -> None:
    cluster.kubectl("create", "deployment", "r", "--image=app:1", "--replicas=2", "-n", ns)
    _rollout(cluster, ns, "deployment/r", 2)
    cluster.kubectl("set", "image", "deployment/r", "app=app:2", "-n", ns)
    _rollout(cluster, ns, "deployment/r", 2)
    images = {p.spec.containers[0].image for p in _pods(cluster, ns)}
    assert images == {"app:2"}
    history = cluster.kubectl("rollout", "history", "deployment/r", "-n", ns).stdout
    assert [line.split()[0] for line in history.splitlines()[2:] if line.strip()] == ["1", "2"]

    assert "rolled back" in cluster.kubectl("rollout", "undo", "deployment/r", "-n", ns).stdout
    _rollout(cluster, ns, "deployment/r", 2)
    dep = _apps(cluster).read_namespaced_deployment("r", ns)
    assert dep.spec.template.spec.containers[0].image == "app:1"
    assert dep.metadata.annotations["deployment.kubernetes.io/revision"] == "3"
    assert {p.spec.containers[0].image for p in _pods(cluster, ns)} == {"app:1"}
    assert len(_apps(cluster).list_namespaced_replica_set(ns).items) == 2

    cluster.kubectl("rollout", "restart", "deployment/r", "-n", ns)
    _rollout(cluster, ns, "deployment/r", 2)
    sets = _apps(cluster).list_namespaced_replica_set(ns).items
    assert len(sets) == 3
    current = [rs for rs in sets if rs.spec.replicas]
    assert len(current) == 1
    assert "kubectl.kubernetes.io/restartedAt" in current[0].spec.template.metadata.annotations
    assert current[0].metadata.annotations["deployment.kubernetes.io/revision"] == "4"


def test_pause_resume_and_recreate(cluster: Cluster, ns: str) -> None:
    cluster.kubectl("create", "deployment", "p", "--image=app:1", "--replicas=2", "-n", ns)
    _rollout(cluster, ns, "deployment/p", 2)
    cluster.kubectl("rollout", "pause", "deployment/p", "-n", ns)
    cluster.kubectl("set", "image", "deployment/p", "app=app:2", "-n", ns)
    cluster.kubectl("scale", "deployment/p", "--replicas=3", "-n", ns)
    wait_for(lambda: len(_pods(cluster, ns)) == 3, what="scaled while paused")
    assert {p.spec.containers[0].image for p in _pods(cluster, ns)} == {"app:1"}
    progressing = wait_for(lambda: next(
        c for c in _apps(cluster).read_namespaced_deployment("p", ns).status.conditions
        if c.type == "Progressing" and c.reason == "DeploymentPaused"), what="paused")
    assert (progressing.status, progressing.message) == ("Unknown", "Deployment is paused")
    cluster.kubectl("rollout", "resume", "deployment/p", "-n", ns)
    _rollout(cluster, ns, "deployment/p", 3)
    assert {p.spec.containers[0].image for p in _pods(cluster, ns)} == {"app:2"}

    _apps(cluster).patch_namespaced_deployment("p", ns, {"spec": {"strategy": {
        "type": "Recreate", "rollingUpdate": None}}})
    cluster.kubectl("set", "image", "deployment/p", "app=app:3", "-n", ns)
    # Recreate: the old pods all go before any new one is made
    wait_for(lambda: {p.spec.containers[0].image for p in _pods(cluster, ns)} == {"app:3"},
             what="only new pods")
    _rollout(cluster, ns, "deployment/p", 3)


def test_pods_count_as_available_after_min_ready_seconds(cluster: Cluster, ns: str) -> None:
    _apps(cluster).create_namespaced_deployment(ns, {"metadata": {"name": "slow"}, "spec": {
        "replicas": 2, "minReadySeconds": 3, "selector": {"matchLabels": {"app": "slow"}},
        "template": {"metadata": {"labels": {"app": "slow"}},
                     "spec": {"containers": [{"name": "c", "image": "c:1"}]}}}})
    wait_for(lambda: len(_pods(cluster, ns)) == 2, what="two pods")
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for pod in _pods(cluster, ns):
        _core(cluster).patch_namespaced_pod_status(pod.metadata.name, ns, {"status": {
            "phase": "Running", "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": now}]}})
    ready = wait_for(lambda: (d := _apps(cluster).read_namespaced_deployment("slow", ns))
                     .status.ready_replicas == 2 and d, what="two ready replicas")
    assert not ready.status.available_replicas
    available = wait_for(lambda: _apps(cluster).read_namespaced_deployment(
        "slow", ns).status.available_replicas == 2, timeout=10, what="available after 3s")
    assert available


def test_rollout_that_makes_no_progress_exceeds_its_deadline(cluster: Cluster,
                                                              ns: str) -> None:
    _apps(cluster).create_namespaced_deployment(ns, {"metadata": {"name": "stuck"}, "spec": {
        "progressDeadlineSeconds": 1, "selector": {"matchLabels": {"app": "stuck"}},
        "template": {"metadata": {"labels": {"app": "stuck"}},
                     "spec": {"containers": [{"name": "c", "image": "c:1"}]}}}})
    out = cluster.kubectl("rollout", "status", "deployment/stuck", "-n", ns, "--timeout=20s",
                          check=False)
    assert out.returncode == 1
    assert 'error: deployment "stuck" exceeded its progress deadline' in out.stderr
    cond = next(c for c in _apps(cluster).read_namespaced_deployment("stuck", ns).status
                .conditions if c.type == "Progressing")
    assert (cond.status, cond.reason) == ("False", "ProgressDeadlineExceeded")


def test_deployment_defaults_and_refusals(cluster: Cluster, ns: str, tmp_path: Path) -> None:
    body = {"metadata": {"name": "d"}, "spec": {
        "selector": {"matchLabels": {"app": "d"}},
        "template": {"metadata": {"labels": {"app": "d"}},
                     "spec": {"containers": [{"name": "c", "image": "c:1"}]}}}}
    dep = _apps(cluster).create_namespaced_deployment(ns, body)
    assert dep.spec.replicas == 1
    assert dep.spec.strategy.type == "RollingUpdate"
    assert (dep.spec.strategy.rolling_update.max_surge,
            dep.spec.strategy.rolling_update.max_unavailable) == ("25%", "25%")
    assert (dep.spec.revision_history_limit, dep.spec.progress_deadline_seconds) == (10, 600)
    pod_spec = dep.spec.template.spec
    assert (pod_spec.restart_policy, pod_spec.dns_policy,
            pod_spec.termination_grace_period_seconds) == ("Always", "ClusterFirst", 30)

    manifest = tmp_path / "bad.yaml"
    manifest.write_text(yaml.safe_dump({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "nosel"},
        "spec": {"template": body["spec"]["template"]}}))
    out = cluster.kubectl("apply", "-f", str(manifest), "-n", ns, check=False)
    assert out.returncode == 1
    assert 'The Deployment "nosel" is invalid: spec.selector: Required value' in out.stderr

    manifest.write_text(yaml.safe_dump({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "mismatch"},
        "spec": {"selector": {"matchLabels": {"app": "other"}},
                 "template": body["spec"]["template"]}}))
    out = cluster.kubectl("apply", "-f", str(manifest), "-n", ns, check=False)
    assert out.returncode == 1
    assert ('spec.template.metadata.labels: Invalid value: map[string]string{"app":"d"}: '
            "`selector` does not match template `labels`") in out.stderr

    with pytest.raises(ApiException) as refused:
        _apps(cluster).patch_namespaced_deployment("d", ns, {"spec": {
            "selector": {"matchLabels": {"app": "d", "tier": "x"}},
            "template": {"metadata": {"labels": {"tier": "x"}}}}})
    assert refused.value.status == 422
    assert ('spec.selector: Invalid value: v1.LabelSelector{MatchLabels:map[string]string{'
            '"app":"d", "tier":"x"}, MatchExpressions:[]v1.LabelSelectorRequirement(nil)}: '
            "field is immutable") in _message(refused.value)

    with pytest.raises(ApiException) as refused:
        _apps(cluster).patch_namespaced_deployment("d", ns, {"spec": {"strategy": {
            "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 0}}}})
    assert refused.value.status == 422
    assert "may not be 0 when `maxSurge` is 0" in _message(refused.value)


# -- Jobs, DaemonSets, Nodes -----------------------------------------------------------


def test_job_runs_to_completion(cluster: Cluster, ns: str) -> None:
    assert cluster.kubectl("create", "job", "hello", "--image=busybox", "-n", ns, "--",
                           "echo", "hi").stdout.strip() == "job.batch/hello created"
    pods = wait_for(lambda: _pods(cluster, ns, "job-name=hello"), what="the job's pod")
    assert len(pods) == 1
    pod = pods[0]
    assert pod.metadata.name.startswith("hello-")
    assert pod.spec.containers[0].command == ["echo", "hi"]
    assert pod.metadata.owner_references[0].kind == "Job"
    assert _table(cluster, "jobs", "-n", ns)[0] == ["NAME", "STATUS", "COMPLETIONS",
                                                    "DURATION", "AGE"]
    _mark(cluster, ns, pod.metadata.name, "Succeeded")
    waited = cluster.kubectl("wait", "--for=condition=Complete", "job/hello", "-n", ns,
                             "--timeout=10s")
    assert "condition met" in waited.stdout
    job = client.BatchV1Api(cluster.api()).read_namespaced_job("hello", ns)
    assert (job.status.succeeded, job.status.active) == (1, None)
    complete = next(c for c in job.status.conditions if c.type == "Complete")
    assert (complete.status, complete.reason) == ("True", "CompletionsReached")
    assert job.status.completion_time is not None
    assert _table(cluster, "jobs", "-n", ns)[1][:3] == ["hello", "Complete", "1/1"]
    assert ("Job", "job-controller", "Completed", "Job completed") in wait_for(
        lambda: _events(cluster, ns), what="events")


def test_finished_job_is_deleted_after_its_ttl(cluster: Cluster, ns: str) -> None:
    batch = client.BatchV1Api(cluster.api())
    batch.create_namespaced_job(ns, {"metadata": {"name": "ttl"}, "spec": {
        "ttlSecondsAfterFinished": 1, "template": {"spec": {
            "restartPolicy": "OnFailure", "containers": [{"name": "c", "image": "c:1"}]}}}})
    pod = wait_for(lambda: _pods(cluster, ns, "job-name=ttl"), what="the job's pod")[0]
    _mark(cluster, ns, pod.metadata.name, "Succeeded")
    wait_for(lambda: not batch.list_namespaced_job(ns).items
             and not _pods(cluster, ns, "job-name=ttl"), timeout=15,
             what="the job and its pod deleted")


def test_suspended_job_has_no_pods_until_resumed(cluster: Cluster, ns: str) -> None:
    batch = client.BatchV1Api(cluster.api())
    batch.create_namespaced_job(ns, {"metadata": {"name": "later"}, "spec": {
        "suspend": True, "template": {"spec": {
            "restartPolicy": "Never", "containers": [{"name": "c", "image": "c:1"}]}}}})
    cond = wait_for(lambda: (batch.read_namespaced_job("later", ns).status.conditions
                             or [None])[0], what="the Suspended condition")
    assert (cond.type, cond.status, cond.reason) == ("Suspended", "True", "JobSuspended")
    assert _table(cluster, "job", "later", "-n", ns)[1][:2] == ["later", "Suspended"]
    assert not _pods(cluster, ns)
    batch.patch_namespaced_job("later", ns, {"spec": {"suspend": False}})
    wait_for(lambda: _pods(cluster, ns, "job-name=later"), what="the job's pod")
    cond = wait_for(lambda: (c := batch.read_namespaced_job("later", ns).status.conditions[0])
                    .status == "False" and c, what="the job resumed")
    assert (cond.reason, cond.message) == ("JobResumed", "Job resumed")


def test_job_fails_after_backoff_limit_and_refuses_restart_always(cluster: Cluster,
                                                                    ns: str) -> None:
    batch = client.BatchV1Api(cluster.api())
    template = {"spec": {"restartPolicy": "Never",
                         "containers": [{"name": "c", "image": "c:1"}]}}
    batch.create_namespaced_job(ns, {"metadata": {"name": "f"},
                                     "spec": {"backoffLimit": 1, "template": template}})
    for _ in range(2):
        pod = wait_for(lambda: [p for p in _pods(cluster, ns, "job-name=f")
                                if p.status.phase == "Pending"], what="a pending pod")[0]
        _mark(cluster, ns, pod.metadata.name, "Failed")
    job = wait_for(lambda: (j := batch.read_namespaced_job("f", ns)).status.conditions and j,
                   what="a finished job")
    failed = {c.type: c.reason for c in job.status.conditions}
    assert failed == {"FailureTarget": "BackoffLimitExceeded", "Failed": "BackoffLimitExceeded"}
    assert job.status.failed == 2
    assert _table(cluster, "job", "f", "-n", ns)[1][:3] == ["f", "Failed", "0/1"]
    warning = next(e for e in _core(cluster).list_namespaced_event(ns).items
                   if e.reason == "BackoffLimitExceeded")
    assert (warning.type, warning.message) == ("Warning",
                                               "Job has reached the specified backoff limit")

    with pytest.raises(ApiException) as refused:
        batch.create_namespaced_job(ns, {"metadata": {"name": "always"}, "spec": {
            "template": {"spec": {"containers": [{"name": "c", "image": "c:1"}]}}}})
    assert refused.value.status == 422
    assert ('spec.template.spec.restartPolicy: Unsupported value: "Always": supported '
            'values: "OnFailure", "Never"') in _message(refused.value)


def test_node_and_daemonset(cluster: Cluster, ns: str) -> None:
    rows = _table(cluster, "nodes")
    assert rows[0] == ["NAME", "STATUS", "ROLES", "AGE", "VERSION"]
    node_name = rows[1][0]
    assert rows[1][1:3] == ["Ready", "control-plane"]
    node = _core(cluster).read_node(node_name)
    assert {a.type for a in node.status.addresses} == {"InternalIP", "Hostname"}
    assert int(node.status.capacity["cpu"]) >= 1 and node.status.allocatable["pods"] == "110"
    assert node.status.node_info.operating_system == "linux"
    ready = next(c for c in node.status.conditions if c.type == "Ready")
    assert (ready.status, ready.reason) == ("True", "KubeletReady")
    lease = client.CoordinationV1Api(cluster.api()).read_namespaced_lease(node_name,
                                                                          "kube-node-lease")
    assert lease.spec.holder_identity == node_name

    _apps(cluster).create_namespaced_daemon_set(ns, {"metadata": {"name": "agent"}, "spec": {
        "selector": {"matchLabels": {"app": "agent"}},
        "template": {"metadata": {"labels": {"app": "agent"}},
                     "spec": {"containers": [{"name": "a", "image": "agent:1"}]}}}})
    out = _rollout(cluster, ns, "daemonset/agent", 1)
    assert 'daemon set "agent" successfully rolled out' in out
    pods = _pods(cluster, ns, "app=agent")
    assert [p.spec.node_name for p in pods] == [node_name]
    rows = _table(cluster, "ds", "-n", ns)
    assert rows[0][:6] == ["NAME", "DESIRED", "CURRENT", "READY", "UP-TO-DATE", "AVAILABLE"]
    assert rows[1][:6] == ["agent", "1", "1", "1", "1", "1"]

    cluster.kubectl("set", "image", "daemonset/agent", "a=agent:2", "-n", ns)
    _rollout(cluster, ns, "daemonset/agent", 1)
    assert [p.spec.containers[0].image for p in _pods(cluster, ns, "app=agent")] == ["agent:2"]
    history = cluster.kubectl("rollout", "history", "daemonset/agent", "-n", ns).stdout
    assert [line.split()[0] for line in history.splitlines()[2:] if line.strip()] == ["1", "2"]
    assert _table(cluster, "controllerrevisions", "-n", ns)[0] == [
        "NAME", "CONTROLLER", "REVISION", "AGE"]
    assert "rolled back" in cluster.kubectl("rollout", "undo", "daemonset/agent",
                                            "-n", ns).stdout
    wait_for(lambda: [p.spec.containers[0].image for p in _pods(cluster, ns, "app=agent")]
             == ["agent:1"], what="the pod of revision 1 back")
    _rollout(cluster, ns, "daemonset/agent", 1)


def test_statefulset_creates_in_order_and_scales_down_from_the_top(cluster: Cluster,
                                                                     ns: str) -> None:
    _apps(cluster).create_namespaced_stateful_set(ns, {"metadata": {"name": "db"}, "spec": {
        "replicas": 2, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}},
        "template": {"metadata": {"labels": {"app": "db"}},
                     "spec": {"containers": [{"name": "db", "image": "db:1"}]}}}})
    first = wait_for(lambda: _pods(cluster, ns, "app=db"), what="the first pod")
    assert [p.metadata.name for p in first] == ["db-0"]
    assert first[0].spec.hostname == "db-0" and first[0].spec.subdomain == "db"
    assert first[0].metadata.labels["statefulset.kubernetes.io/pod-name"] == "db-0"
    out = _rollout(cluster, ns, "statefulset/db", 2)
    assert "partitioned roll out complete: 2 new pods have been updated" in out
    assert sorted(p.metadata.name for p in _pods(cluster, ns, "app=db")) == ["db-0", "db-1"]
    assert _table(cluster, "sts", "-n", ns)[1][:2] == ["db", "2/2"]
    sts = _apps(cluster).read_namespaced_stateful_set("db", ns)
    assert sts.status.current_revision == sts.status.update_revision
    assert {p.metadata.labels["controller-revision-hash"] for p in _pods(
        cluster, ns, "app=db")} == {sts.status.update_revision}
    cluster.kubectl("scale", "statefulset/db", "--replicas=1", "-n", ns)
    wait_for(lambda: [p.metadata.name for p in _pods(cluster, ns, "app=db")] == ["db-0"],
             what="db-1 removed")


# -- garbage collection ------------------------------------------------------------------


def test_deleting_an_owner_deletes_or_orphans_its_dependents(cluster: Cluster,
                                                             ns: str) -> None:
    for name in ("bg", "orphan", "fg"):
        cluster.kubectl("create", "deployment", name, "--image=x:1", "--replicas=2", "-n", ns)
    wait_for(lambda: len(_pods(cluster, ns)) == 6, what="six pods")

    cluster.kubectl("delete", "deployment", "bg", "-n", ns)
    wait_for(lambda: not _pods(cluster, ns, "app=bg"), what="bg's pods gone")
    assert not [rs for rs in _apps(cluster).list_namespaced_replica_set(ns).items
                if rs.metadata.name.startswith("bg-")]

    cluster.kubectl("delete", "deployment", "orphan", "--cascade=orphan", "-n", ns)
    wait_for(lambda: not [d for d in _apps(cluster).list_namespaced_deployment(ns).items
                          if d.metadata.name == "orphan"], what="deployment orphan gone")
    orphans = wait_for(lambda: [rs for rs in _apps(cluster).list_namespaced_replica_set(
        ns).items if rs.metadata.name.startswith("orphan-") and not
        rs.metadata.owner_references], what="the orphaned replica set")
    assert orphans[0].spec.replicas == 2 and len(_pods(cluster, ns, "app=orphan")) == 2
    # The same deployment created again adopts its orphaned replica set and pods.
    orphan_pods = {p.metadata.name for p in _pods(cluster, ns, "app=orphan")}
    cluster.kubectl("create", "deployment", "orphan", "--image=x:1", "--replicas=2", "-n", ns)
    uid = _apps(cluster).read_namespaced_deployment("orphan", ns).metadata.uid
    adopted = wait_for(lambda: [rs for rs in _apps(cluster).list_namespaced_replica_set(
        ns).items if rs.metadata.name.startswith("orphan-") and rs.metadata.owner_references
        and rs.metadata.owner_references[0].uid == uid], what="the adopted replica set")
    assert [rs.metadata.name for rs in adopted] == [orphans[0].metadata.name]
    assert {p.metadata.name for p in _pods(cluster, ns, "app=orphan")} == orphan_pods

    cluster.kubectl("delete", "deployment", "fg", "--cascade=foreground", "-n", ns)
    wait_for(lambda: not _pods(cluster, ns, "app=fg") and not [
        d for d in _apps(cluster).list_namespaced_deployment(ns).items
        if d.metadata.name == "fg"], what="fg and its pods gone")

    status, body = cluster.raw(
        "DELETE", f"/apis/apps/v1/namespaces/{ns}/replicasets/{orphans[0].metadata.name}"
        "?propagationPolicy=Sideways")
    assert status == 422
    assert body["message"] == ('DeleteOptions.meta.k8s.io "" is invalid: propagationPolicy: '
                               'Unsupported value: "Sideways": supported values: "Foreground", '
                               '"Background", "Orphan", "nil"')


def test_an_object_whose_owner_does_not_exist_is_collected(cluster: Cluster, ns: str) -> None:
    core = _core(cluster)
    cm = core.create_namespaced_config_map(ns, {"metadata": {"name": "kept"}})
    core.create_namespaced_config_map(ns, {"metadata": {
        "name": "dangling", "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap",
                                                 "name": "gone", "uid": str(uuid.uuid4())}]}})
    core.create_namespaced_config_map(ns, {"metadata": {
        "name": "two-owners", "ownerReferences": [
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "gone", "uid": "no-such-uid"},
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "kept",
             "uid": cm.metadata.uid}]}})
    wait_for(lambda: "dangling" not in {c.metadata.name for c in
                                        core.list_namespaced_config_map(ns).items},
             what="the dangling dependent deleted")
    survivor = wait_for(lambda: (c := core.read_namespaced_config_map("two-owners", ns))
                        and len(c.metadata.owner_references) == 1 and c,
                        what="the dead owner's reference dropped")
    assert survivor.metadata.owner_references[0].uid == cm.metadata.uid


def test_discovery_lists_the_workload_kinds(cluster: Cluster) -> None:
    out = cluster.kubectl("api-resources", "--api-group=apps").stdout.splitlines()
    shorts = {line.split()[0]: line.split()[1] for line in out[1:]}
    assert shorts == {"controllerrevisions": "apps/v1", "daemonsets": "ds",
                      "deployments": "deploy", "replicasets": "rs", "statefulsets": "sts"}
    assert "jobs" in cluster.kubectl("api-resources", "--api-group=batch").stdout
    status, scale_list = cluster.raw("GET", "/apis/apps/v1")
    assert status == 200
    subresources = {r["name"]: r for r in scale_list["resources"]}
    assert subresources["deployments/scale"]["kind"] == "Scale"
    assert subresources["deployments/scale"]["group"] == "autoscaling"
    assert "deployments/status" in subresources and "daemonsets/scale" not in subresources
