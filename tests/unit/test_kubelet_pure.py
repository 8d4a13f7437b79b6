"""The kubelet's pure decisions: restart back-off, what a container runs, a Pod's
phase, the kubectl columns, and the grace period of a Pod's delete."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from localcluster import podgrace
from localcluster.kubelet.backoff import Backoff
from localcluster.kubelet.images import MESHGATE_IMAGE, expand, is_meshgate, runnable
from localcluster.kubelet.status import ContainerView, Role, phase
from localcluster.podprint import pod_row


def test_backoff_is_immediate_then_doubles_to_five_minutes_and_resets() -> None:
    b = Backoff()
    waits = [b.after_exit(started=t, finished=t + 1) for t in range(0, 1000, 10)][:7]
    assert waits == [0, 10, 20, 40, 80, 160, 300]
    assert b.after_exit(started=0, finished=1) == 300
    assert b.after_exit(started=0, finished=600) == 0  # ran ten minutes: forgotten
    assert b.after_exit(started=0, finished=1) == 10


@pytest.mark.parametrize("image,ours", [
    (MESHGATE_IMAGE, True), (f"{MESHGATE_IMAGE}:v1.2", True),
    (f"{MESHGATE_IMAGE}@sha256:abc", True), ("ghcr.io/meshgate/other", False),
    ("nginx", False), ("localhost:5000/x", False)])
def test_meshgate_image(image: str, ours: bool) -> None:
    assert is_meshgate(image) is ours


def test_what_a_container_runs() -> None:
    env = {"PORT": "8080"}
    assert runnable({"command": ["srv"], "args": ["--port=$(PORT)", "$$(PORT)", "$(NONE)"]},
                    env).argv == ("srv", "--port=8080", "$(PORT)", "$(NONE)")
    ours = runnable({"image": f"{MESHGATE_IMAGE}:1", "args": ["control", "run"]}, env)
    assert ours is not None and ours.meshgate and ours.argv[-2:] == ("control", "run")
    assert runnable({"image": "nginx"}, env) is None
    assert expand("a$(X)b", {"X": "1"}) == "a1b"
    # meshgate's image naming its own Python (deploy/mirror.yaml): the local interpreter.
    mirror = runnable({"image": MESHGATE_IMAGE, "command": ["python", "-m", "x"],
                       "args": ["--port=$(PORT)"]}, env)
    assert mirror is not None and mirror.meshgate
    assert mirror.argv == (sys.executable, "-m", "x", "--port=8080")
    other = runnable({"image": "python:3.11", "command": ["python", "-m", "x"]}, env)
    assert other is not None and other.argv == ("python", "-m", "x") and not other.meshgate


def _view(state: dict[str, Any], last: dict[str, Any] | None = None) -> ContainerView:
    return ContainerView("c", "i", Role.MAIN, state=state, last_state=last or {})


RUNNING = {"running": {}}
DONE = {"terminated": {"exitCode": 0}}
FAILED = {"terminated": {"exitCode": 1}}
WAITING = {"waiting": {"reason": "ImageNotRunnable"}}


def test_phase_as_kube() -> None:
    assert phase("Always", False, False, [_view(RUNNING)]) == "Pending"
    assert phase("Never", False, True, []) == "Failed"
    assert phase("Always", True, False, [_view(RUNNING), _view(WAITING)]) == "Pending"
    assert phase("Always", True, False, [_view(RUNNING)]) == "Running"
    assert phase("Always", True, False, [_view({"waiting": {}}, FAILED)]
                 ) == "Running"
    assert phase("Never", True, False, [_view(DONE)]) == "Succeeded"
    assert phase("Never", True, False, [_view(DONE), _view(FAILED)]) == "Failed"
    assert phase("OnFailure", True, False, [_view(FAILED)]) == "Running"


def _pod(status: dict[str, Any], *, inits: int = 0, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "p"}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "spec": {
        "containers": [{"name": "c"}],
        "initContainers": [{"name": f"i{n}"} for n in range(inits)]}, "status": status}


def test_kubectl_columns() -> None:
    crash = _pod({"phase": "Running", "containerStatuses": [{
        "name": "c", "restartCount": 4, "ready": False,
        "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]})
    assert pod_row(crash) == pod_row(crash).__class__("0/1", "CrashLoopBackOff", 4)
    assert pod_row(crash).restarts_text(lambda at: "x") == "4"
    crash["status"]["containerStatuses"][0]["lastState"] = {
        "terminated": {"finishedAt": "2026-12-06T06:00:00Z"}}
    assert pod_row(crash).restarts_text(lambda at: f"<{at}>") == (
        "4 (<2026-12-06T06:00:00Z> ago)")
    init = _pod({"phase": "Pending", "initContainerStatuses": [
        {"name": "i0", "state": {"terminated": {"exitCode": 0}}},
        {"name": "i1", "state": {"running": {}}}]}, inits=2)
    assert pod_row(init).status == "Init:1/2"
    failed_init = _pod({"phase": "Pending", "initContainerStatuses": [
        {"name": "i0", "state": {"terminated": {"exitCode": 2}}}]}, inits=1)
    assert pod_row(failed_init).status == "Init:ExitCode:2"
    running = _pod({"phase": "Running", "containerStatuses": [
        {"name": "c", "ready": True, "state": {"running": {}}}]}, deleting=True)
    assert pod_row(running) == pod_row(running).__class__("1/1", "Terminating", 0)


def test_grace_period_of_a_pod_delete() -> None:
    bound = {"metadata": {}, "spec": {"nodeName": "n", "terminationGracePeriodSeconds": 7}}
    assert podgrace.grace_period(bound, {}) == 7
    assert podgrace.grace_period(bound, {"gracePeriodSeconds": 2}) == 2
    assert podgrace.grace_period(bound, {"gracePeriodSeconds": -5}) == 1
    assert podgrace.grace_period({"metadata": {}, "spec": {}}, {}) == 0
    assert podgrace.grace_period({**bound, "status": {"phase": "Succeeded"}}, {}) == 0
    obj: dict[str, Any] = {"metadata": {}}
    assert podgrace.mark(obj, 30, 1000.0)
    assert obj["metadata"]["deletionGracePeriodSeconds"] == 30
    assert not podgrace.mark(obj, 40, 1001.0)  # never lengthened
    assert podgrace.mark(obj, 0, 1002.0) and obj["metadata"]["deletionGracePeriodSeconds"] == 0


def test_cri_log_lines_as_kubectl_shows_them() -> None:
    from localcluster.kubelet.logs import _line

    raw = "2026-12-06T06:00:00.123456789Z stdout F hello world"
    assert _line(raw, False) == "hello world\n"
    assert _line(raw, True) == "2026-12-06T06:00:00.123456789Z hello world\n"
    assert _line("2026-12-06T06:00:00.1Z stderr P part", False) == "part"


def test_which_container_logs_and_exec_name() -> None:
    from localcluster.errors import ApiError
    from localcluster.kubelet.logs import choose_container

    pod = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}, {"name": "b"}],
                                               "initContainers": [{"name": "i"}]}}
    assert choose_container(pod, "i") == "i"
    with pytest.raises(ApiError) as e:
        choose_container(pod, "")
    assert e.value.message == ("a container name must be specified for pod p, choose one of: "
                               "[a b] or one of the init containers: [i]")
    with pytest.raises(ApiError) as e:
        choose_container(pod, "z")
    assert e.value.code == 400 and e.value.message == "container z is not valid for pod p"


def test_exec_status_carries_the_exit_code() -> None:
    from localcluster.kubelet.execstream import status

    assert status(0, ["true"]) == {"metadata": {}, "status": "Success"}
    failed = status(3, ["sh", "-c", "exit 3"])
    assert failed["reason"] == "NonZeroExitCode"
    assert failed["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]


def test_volume_mounts_wrap_the_command() -> None:
    from localcluster.kubelet.volumes import Volumes

    assert Volumes.wrap([], ["sleep", "1"], sh="/bin/sh", mount="/bin/mount") == ["sleep", "1"]
    argv = Volumes.wrap([("/src", "/dst", True), ("/a", "/b", False)], ["sleep", "1"],
                        sh="/bin/sh", mount="/bin/mount")
    assert argv[:2] == ["/bin/sh", "-c"]
    assert argv[3:] == ["meshgate-volumes", "/bin/mount", "/src", "/dst", "ro", "/a", "/b",
                        "rw", "--", "sleep", "1"]


def test_a_mount_that_would_hide_another_mounts_source_goes_last() -> None:
    from localcluster.kubelet.volumes import mount_order

    state = "/tmp/state/pods/p/volumes"
    token = (f"{state}/kube-api-access", "/var/run/secrets/kubernetes.io/serviceaccount", True)
    tmp = (f"{state}/tmp", "/tmp", False)
    inside = (f"{state}/cache", "/tmp/cache", False)
    config = (f"{state}/config", "/etc/app", True)
    # /tmp would cover the state directory, and so the token's source: it goes after
    # it, and what is mounted inside /tmp after /tmp.
    assert mount_order([tmp, inside, token, config]) == [token, config, tmp, inside]
    assert mount_order([token, config]) == [token, config]
    assert mount_order([(f"{state}/x", "/tmpx", False), token]) == [
        (f"{state}/x", "/tmpx", False), token]



def test_gratuitous_arp_frame() -> None:
    from ipaddress import IPv4Address

    from localcluster.kubelet.garp import frame

    mac = bytes.fromhex("02aabbccddee")
    f = frame(mac, IPv4Address("10.244.0.7"))
    assert f[:6] == b"\xff" * 6 and f[6:12] == mac and f[12:14] == b"\x08\x06"
    assert len(f) == 42
    arp = f[14:]
    assert arp[6:8] == b"\x00\x01"  # a request
    assert arp[8:14] == mac and arp[14:18] == arp[24:28] == bytes([10, 244, 0, 7])
