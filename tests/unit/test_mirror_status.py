"""A Link's status: Ready from the other conditions, transition times that move
only when a status does, and the list of mirrors."""

from __future__ import annotations

from mirror.mirrors import REMOTE_FQ_NAME_ANNOTATION
from mirror.status import Condition, ConditionType, link_status, ready

OK = {
    ConditionType.CREDENTIALS_VALID: Condition(ConditionType.CREDENTIALS_VALID, True, "Verified",
                                               "fine"),
    ConditionType.REMOTE_REACHABLE: Condition(ConditionType.REMOTE_REACHABLE, True, "Reachable",
                                              "fine"),
    ConditionType.GATEWAY_ALIVE: Condition(ConditionType.GATEWAY_ALIVE, True, "ProbeSucceeded",
                                           "fine"),
}


def test_ready_needs_every_other_condition() -> None:
    assert ready(OK).status is True
    bad = {**OK, ConditionType.CREDENTIALS_VALID: Condition(
        ConditionType.CREDENTIALS_VALID, False, "SecretNotFound", "Secret meshgate/x is gone")}
    r = ready(bad)
    assert (r.status, r.reason, r.message) == (False, "SecretNotFound",
                                               "Secret meshgate/x is gone")
    pending = {k: v for k, v in OK.items() if k is not ConditionType.GATEWAY_ALIVE}
    assert ready(pending).reason == "Pending"
    assert ready(OK, spec_error="spec.gatewayPort: bad").reason == "InvalidSpec"


def test_transition_times_move_only_with_the_status() -> None:
    mirror = {"metadata": {"name": "web-west", "namespace": "shop", "annotations": {
        REMOTE_FQ_NAME_ANNOTATION: "web.shop.svc.cluster.local"}}}
    first = link_status(OK, [mirror], previous=None, generation=3, now="2024-01-01T00:00:00Z")
    assert first["mirroredServiceCount"] == 1
    assert first["mirroredServices"] == [{"name": "web-west", "namespace": "shop",
                                          "remoteName": "web", "remoteNamespace": "shop"}]
    assert first["observedGeneration"] == 3
    assert [c["type"] for c in first["conditions"]] == [
        "Ready", "CredentialsValid", "RemoteReachable", "GatewayAlive"]
    down = {**OK, ConditionType.GATEWAY_ALIVE: Condition(
        ConditionType.GATEWAY_ALIVE, False, "ProbeFailed", "no answer")}
    second = link_status(down, [mirror], previous=first, generation=3,
                         now="2024-01-01T00:01:00Z")
    times = {c["type"]: c["lastTransitionTime"] for c in second["conditions"]}
    assert times == {"Ready": "2024-01-01T00:01:00Z", "CredentialsValid": "2024-01-01T00:00:00Z",
                     "RemoteReachable": "2024-01-01T00:00:00Z",
                     "GatewayAlive": "2024-01-01T00:01:00Z"}
    assert link_status(down, [mirror], previous=second, generation=3,
                       now="2024-01-01T00:02:00Z") == second
