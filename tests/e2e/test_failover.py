"""Failover across three clusters under steady load, as a user sees it: east's `web`
is annotated to fail over to west, then central; a client pod in east sends a GET
every 20 ms (and a POST now and then) while east's web dies, west is partitioned
off the WAN, both come back, and west flaps.

    client (east) -> east's proxy -> web (east) | west gateway -> web | central gateway -> web

One scenario (`moves`) drives the first three phases with one load running
through them, because each phase starts from where the one before left the
traffic; the tests then judge its record from separate angles (where traffic
went, failed GETs, POSTs, `failover status`). The flapping test stands alone:
it makes its own starting point and puts the clusters back as it found them.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.cluster import wait_for
from tests.e2e.clusters import DEMO_APP, Clusters, Topology, clusters, value
from tests.e2e.pod_scripts import LOAD

EAST, WEST, CENTRAL = "foeast", "fowest", "focentral"
TOPOLOGY = Topology(wan="mg-foe2ewan", wan_cidr="172.31.249.0/24", cidrs={
    EAST: ("10.210.0.0/16", "10.211.0.0/16"), WEST: ("10.212.0.0/16", "10.213.0.0/16"),
    CENTRAL: ("10.214.0.0/16", "10.215.0.0/16")})
WEB = "web.default.svc.cluster.local"
PODS = {cluster: f"web-{cluster}" for cluster in (EAST, WEST, CENTRAL)}
HOLD_DOWN_S = 2.0
STEADY = 25
"""Answers in a row from one pod (half a second of load) that say traffic settled there."""
RUN = 5
"""Answers in a row from one pod that say it serves (probes come one a second)."""

EXPORTED = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default, labels: {mirror.meshgate.io/exported: "true"}}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""

FAILING_OVER = f"""
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
  annotations:
    failover.meshgate.io/clusters: "{WEST},{CENTRAL}"
    failover.meshgate.io/policy: "failback={HOLD_DOWN_S:g}s"
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
"""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clusters]:
    with clusters(tmp_path_factory.mktemp("fo"), TOPOLOGY) as c:
        for cluster in (EAST, WEST, CENTRAL):
            c.up(cluster)
        for exporting in (WEST, CENTRAL):
            # Probed every second, so that `failover status` follows a partition quickly.
            c.link(EAST, exporting, probe_period="1s")
            c.kubectl(exporting, "apply", "-f", "-", input=EXPORTED)
        c.kubectl(EAST, "apply", "-f", "-", input=FAILING_OVER)
        for cluster in PODS:
            start_web(c, cluster)
        c.run_pod(EAST, "client", "sleep", "900", sa="frontend")
        wait_for(lambda: serving(c).startswith(f"group 0 ({EAST}"), timeout=30,
                 interval=0.3, what="failover status to show every group and east serving")
        yield c


def start_web(c: Clusters, cluster: str) -> None:
    c.run_pod(cluster, PODS[cluster], *DEMO_APP, sa="web", labels=("app=web",), port=8080)


def status(c: Clusters) -> str:
    return c.meshgate("failover", "status", "--kubeconfig", str(c.kubeconfig(EAST)),
                      check=False).stdout


def serving(c: Clusters) -> str:
    """What `failover status` says serves east's web: ``group N (cluster...``."""
    lines = [line.strip() for line in status(c).splitlines()
             if line.strip().startswith("serving: ")]
    assert len(lines) == 1, lines
    return lines[0].removeprefix("serving: ")


@dataclass
class Load:
    """The client's steady load (pod_scripts.LOAD), read as it goes."""

    proc: subprocess.Popen[str]
    start: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    reader: threading.Thread | None = None

    @classmethod
    def begin(cls, c: Clusters, *, seconds: float, post_every: int = 10) -> Load:
        load = cls(c.start_in_pod(EAST, "client", LOAD, WEB, "0.02", str(seconds),
                                  str(int(seconds / 0.02)), str(post_every)))
        assert load.proc.stdout is not None
        first = json.loads(load.proc.stdout.readline() or "{}")
        assert "start" in first, f"the load did not start: {first}"
        load.start = first["start"]
        load.reader = threading.Thread(target=load._read, daemon=True)
        load.reader.start()
        return load

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            record = json.loads(line)
            with self.lock:
                self.records.append(record)

    def now(self) -> float:
        """The load's own time: seconds since it started."""
        return time.monotonic() - self.start

    def answers(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.records if "n" in r]

    def settled_on(self, pod: str, since: float) -> bool:
        """The last `STEADY` answers, all started after `since`, came from `pod`."""
        last = [r for r in self.answers() if r["t"] >= since][-STEADY:]
        if self.proc.poll() is not None and not last:
            raise AssertionError("the load ended early")
        return len(last) == STEADY and all(r.get("pod") == pod for r in last)

    def wait_settled(self, pod: str, since: float, *, timeout: float, what: str) -> float:
        """Wait until traffic settled on `pod`; the load time it did."""
        wait_for(lambda: self.settled_on(pod, since), timeout=timeout, interval=0.1,
                 what=what)
        return self.now()

    def stop(self) -> list[dict[str, Any]]:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
        self.proc.wait(30)
        if self.reader is not None:
            self.reader.join(10)
        with self.lock:
            assert self.records and "done" in self.records[-1], self.records[-3:]
        return self.answers()


def posts_served(c: Clusters, answered: list[dict[str, Any]]) -> Counter[str]:
    """How many times each POST id reached an app, counted at the apps. Their output
    reaches run-pod's log through the kubelet's log stream a moment after they write
    it, so this waits (bounded) until every POST answered 200 has shown up."""
    def count() -> Counter[str]:
        served: Counter[str] = Counter()
        for cluster, pod in PODS.items():
            log = c.log_of(cluster, pod)
            if log.exists():
                served.update(line.split()[-1] for line in log.read_text().splitlines()
                              if line.startswith("served POST "))
        return served

    ok = {r["id"] for r in answered if r["method"] == "POST" and r["status"] == 200}
    deadline = time.monotonic() + 10
    while not ok <= set(served := count()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return served


def switches(answers: list[dict[str, Any]]) -> list[tuple[float, str, str]]:
    """Each change of the pod that serves: (time, from, to). A group that does not
    serve gets a probe a second, which its pod answers when it can: runs of fewer
    than `RUN` answers from one pod are probes, not moves."""
    runs: list[tuple[float, str, int]] = []
    for r in answers:
        pod = r.get("pod")
        if pod is None:
            continue
        if runs and runs[-1][1] == pod:
            runs[-1] = (runs[-1][0], pod, runs[-1][2] + 1)
        else:
            runs.append((r["t"], pod, 1))
    serving = [(t, pod) for t, pod, n in runs if n >= RUN]
    out = []
    for (_, last), (t, pod) in itertools.pairwise(serving):
        if pod != last:
            out.append((t, last, pod))
    return out


@dataclass
class Scenario:
    """What the three moves left behind, for the tests to judge."""

    answers: list[dict[str, Any]]
    phases: dict[str, tuple[float, float]]
    """Phase -> (load time it began, load time traffic settled)."""
    statuses: dict[str, str]
    """Phase -> what `failover status` said serves once traffic settled."""
    served: Counter[str]
    metrics: str
    east_first: float
    """When east answered first after it came back (its first successful probe)."""


@pytest.fixture(scope="module")
def moves(mesh: Clusters) -> Scenario:
    c = mesh
    load = Load.begin(c, seconds=100)
    phases: dict[str, tuple[float, float]] = {}
    statuses: dict[str, str] = {}

    def phase(name: str, act: Callable[[], None], pod: str, group: str, *,
              timeout: float = 20) -> None:
        began = load.now()
        act()
        settled = load.wait_settled(pod, began, timeout=timeout,
                                    what=f"{name}: traffic to settle on {pod}")
        phases[name] = (began, settled)
        statuses[name] = wait_for(lambda: (s := serving(c)).startswith(group) and s,
                                  timeout=20, interval=0.3,
                                  what=f"{name}: failover status to show {group} serving")

    try:
        phase("steady", lambda: None, PODS[EAST], f"group 0 ({EAST}")
        phase("east down", lambda: c.stop_pod(EAST, PODS[EAST]), PODS[WEST],
              f"group 1 ({WEST}")
        phase("west partitioned", lambda: c.partition(WEST), PODS[CENTRAL],
              f"group 2 ({CENTRAL}")

        def back() -> None:
            c.heal(WEST)
            start_web(c, EAST)

        phase("both back", back, PODS[EAST], f"group 0 ({EAST}", timeout=40)
    finally:
        answers = load.stop()
        (c.base / "moves.jsonl").write_text("".join(json.dumps(r) + "\n" for r in answers))
        if WEST in c.partitioned:
            c.heal(WEST)
        if (EAST, PODS[EAST]) not in c.pods:
            start_web(c, EAST)
    began = phases["both back"][0]
    east_first = min(r["t"] for r in answers if r["t"] >= began and r.get("pod") == PODS[EAST])
    return Scenario(answers, phases, statuses, posts_served(c, answers),
                    c.metrics(EAST, "client"),
                    east_first)


def test_traffic_follows_the_priority_groups(moves: Scenario) -> None:
    """East serves, then west once east's web is gone, then central once west is
    partitioned, then east again: one move each, no bouncing between groups."""
    moved = switches(moves.answers)
    order = [to for _, _, to in moved]
    assert order[:2] == [PODS[WEST], PODS[CENTRAL]], moved
    # Healed, west may serve again until east is back: it is the better of the two.
    assert order[2:] in ([PODS[EAST]], [PODS[WEST], PODS[EAST]]), moved
    for name, (began, settled) in moves.phases.items():
        print(f"{name}: began at {began:.2f}s, settled {settled - began:.2f}s later")


def test_traffic_returns_to_east_only_after_its_hold_down(moves: Scenario) -> None:
    answers = [r for r in moves.answers if r["t"] >= moves.east_first]
    # From its first answer (the probe that began its hold-down) until it serves,
    # east answers only probes; it serves from the first of a run of STEADY answers.
    serves_at = next(r["t"] for i, r in enumerate(answers)
                     if all(a.get("pod") == PODS[EAST] for a in answers[i:i + STEADY]))
    assert serves_at - moves.east_first >= HOLD_DOWN_S - 0.1, (moves.east_first, serves_at)
    assert value(moves.metrics, "outbound_failover_events_total", to_cluster=EAST,
                 direction="failback") >= 1


def test_no_get_fails_during_any_move(moves: Scenario) -> None:
    gets = [r for r in moves.answers if r["method"] == "GET"]
    failed = [r for r in gets if r["status"] != 200]
    assert not failed, f"{len(failed)} of {len(gets)} GETs failed: {failed[:10]}"
    slowest = max(gets, key=lambda r: r["took"])
    print(f"{len(gets)} GETs, slowest {slowest['took']:.3f}s at {slowest['t']:.2f}s")


def test_posts_are_never_replayed_and_failed_ones_name_their_group(moves: Scenario) -> None:
    posts = [r for r in moves.answers if r["method"] == "POST"]
    assert posts and moves.served, "no POST was sent or served"
    twice = {i: n for i, n in moves.served.items() if n > 1}
    assert not twice, f"POSTs served more than once: {twice}"
    for r in posts:
        if r["status"] == 200:
            assert moves.served[r["id"]] == 1, r
        else:
            assert r["status"] in (502, 503), r
            assert "was not sent to another group" in r["error"] or \
                "no healthy endpoint" in r["error"], r
            assert any(f"group {g}" in r["error"] or f"cluster {g}" in r["error"]
                       or g in r["error"] for g in (EAST, WEST, CENTRAL)), r
    failed = sum(r["status"] != 200 for r in posts)
    counted = value(moves.metrics, "outbound_failover_unreplayed_total")
    print(f"{len(posts)} POSTs, {failed} answered with an error, {counted} counted unreplayed")
    assert counted <= failed


def test_failover_status_shows_the_serving_group_of_each_phase(moves: Scenario) -> None:
    assert moves.statuses["steady"].startswith(f"group 0 ({EAST}, local)")
    assert moves.statuses["east down"].startswith(f"group 1 ({WEST})")
    assert moves.statuses["west partitioned"].startswith(f"group 2 ({CENTRAL})")
    assert moves.statuses["both back"].startswith(f"group 0 ({EAST}, local)")


FLAPS = 5
PARTITION_S = 2.0
"""How long each partition lasts: longer than the 1 s connect timeout plus TCP's first
SYN retransmission (1 s), so that a probe sent just after the partition began fails
rather than connecting late, once healed (a partition of one second let such a probe
succeed, and west's recovery went on through it)."""
HEAL_S = 1.0
"""How long west is healed in between: less than its shortest hold-down (2 s)."""


def test_a_flapping_group_does_not_take_traffic_back(mesh: Clusters) -> None:
    """With east down and central up, west is partitioned and healed over and over:
    traffic leaves west once and stays on central, whose hold-down keeps growing."""
    c = mesh
    load = Load.begin(c, seconds=60, post_every=0)
    try:
        began = load.now()
        c.stop_pod(EAST, PODS[EAST])
        load.wait_settled(PODS[WEST], began, timeout=20, what="traffic to settle on west")
        before = c.metrics(EAST, "client")
        flapping = load.now()
        pace = time.monotonic()
        for _ in range(FLAPS):
            for change, lasts in ((c.partition, PARTITION_S), (c.heal, HEAL_S)):
                change(WEST)
                # The flap's period: a pace the test sets, not a wait for a condition.
                pace += lasts
                time.sleep(max(0.0, pace - time.monotonic()))
        flapped = load.now()
        after = c.metrics(EAST, "client")
    finally:
        c.heal(WEST)
        answers = load.stop()
        (c.base / "flaps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in answers))
        if (EAST, PODS[EAST]) not in c.pods:
            start_web(c, EAST)
    during = [r for r in answers if flapping <= r["t"] <= flapped]
    moved = switches(during)
    print(f"{len(during)} answers while west flapped {FLAPS} times; switches: {moved}")
    assert len(moved) <= 3, moved
    assert not [r for r in during if r["method"] == "GET" and r["status"] != 200], \
        [r for r in during if r["status"] != 200][:10]
    # No failback to west while it flapped: the hold-down held.
    back = ("outbound_failover_events_total", {"to_cluster": WEST, "direction": "failback"})
    assert value(after, back[0], **back[1]) == value(before, back[0], **back[1])
    assert value(after, "outbound_failover_group", cluster=CENTRAL) == 1
