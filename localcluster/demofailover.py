"""The failover scene of `make demo`: east's ``web`` fails over to west, then to
central, and comes back, under a steady load from east's client.

East's web Service is annotated ``failover.meshgate.io/clusters: "west,central"``
and ``failover.meshgate.io/policy: "failback=3s"``: its endpoints come in three
priority groups, east's own pods, then west's and central's mirrors (each that
cluster's gateway). East's own pods serve first, so to show west failing over to
central the scene stops east's web pods before west's, then starts them again in
reverse:

  1. every web pod up: east answers;
  2. east's web pods stopped: west answers;
  3. west's web pod stopped too: central answers;
  4. west's web pod started again: west answers once its group has been healthy
     for the failback hold-down;
  5. east's web pods started again: east answers.

Throughout, the client pod GETs web every 50 ms (`_LOAD`, which ends when its
stdin closes, or after `LOAD_BOUND_S`) and the scene records each answer's pod
and status. Per phase it prints which pods and clusters answered, the GETs that
failed with the cause the proxy gave (a failed GET is shown, never hidden), the
changes of serving group the client's proxy counted
(``outbound_failover_events_total``) and `meshgate failover status`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client.parser import text_string_to_metric_families

from localcluster.demosteps import kubectl, wait_until
from localcluster.pods import in_pod, in_pod_argv
from localcluster.rootless import meshgate_argv
from localcluster.up import ClusterSpec
from mesh.errors import MeshError

WEB = "web.default.svc.cluster.local"
WEB_PODS = {"east": ("web-1", "web-2"), "west": ("west-web-1",),
            "central": ("central-web-1",)}
ORDER = ("west", "central")
FAILBACK = "3s"
INTERVAL_S = 0.05
LOAD_BOUND_S = 300.0
"""The load ends by itself after this long, whatever happens to the demo."""
STEADY = 5
"""Answers in a row from the cluster a phase expects that end its wait."""
_ADMIN = "http://127.0.0.1:4191"
_LOAD = """
import sys, threading, time, urllib.error, urllib.request
url, interval, bound = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
end = next_at = time.monotonic()
end += bound
while not stop.is_set() and time.monotonic() < end:
    sent = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            status, said = answer.status, answer.read().decode()
    except urllib.error.HTTPError as e:
        status, said = e.code, e.headers.get("l5d-proxy-error") or e.reason
    except OSError as e:
        status, said = 0, f"{type(e).__name__}: {e}"
    took = (time.monotonic() - sent) * 1000
    print(status, f"{took:.0f}", " ".join(str(said).split()), flush=True)
    next_at += interval
    stop.wait(max(0.0, next_at - time.monotonic()))
"""
_GET = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())"


class WebPods(Protocol):
    """What the scene asks of the demo: start a web pod, stop some."""

    def start_web(self, cluster: str, pod: str) -> None: ...
    def stop_pods(self, pods: Sequence[str]) -> None: ...


@dataclass(frozen=True)
class Answer:
    """One GET of the load: when it was sent (this host's monotonic clock), its status
    (0: no HTTP answer), how long it took, and what it said (the body, or the cause)."""

    sent: float
    status: int
    ms: float
    said: str

    @property
    def pod(self) -> str:
        found = re.match(r"hello from (\S+) in ", self.said)
        return found.group(1) if found and self.status == 200 else ""

    @property
    def cluster(self) -> str:
        return next((c for c, pods in WEB_PODS.items() if self.pod in pods), "")


@dataclass(frozen=True)
class Phase:
    title: str
    expect: str
    """The cluster that should answer once the change has taken effect."""
    stop: str = ""
    start: str = ""
    """The cluster whose web pods this phase stops, or starts."""


PHASES = (
    Phase("every web pod up", "east"),
    Phase("east's web pods stopped", "west", stop="east"),
    Phase("west's web pod stopped too", "central", stop="west"),
    Phase("west's web pod started again", "west", start="west"),
    Phase("east's web pods started again", "east", start="east"),
)


class Load:
    """The client pod's steady GETs, each answer recorded as it arrives."""

    def __init__(self, argv: list[str]) -> None:
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, name="load", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            got = time.monotonic()
            status, ms, said = [*line.rstrip("\n").split(" ", 2), "", ""][:3]
            if not (status.isdigit() and ms.isdigit()):
                said, status, ms = line.strip(), "0", "0"  # the load itself failed
            with self._lock:
                self.answers.append(Answer(got - int(ms) / 1000, int(status), int(ms), said))

    def since(self, start: float, end: float = float("inf")) -> list[Answer]:
        with self._lock:
            return [a for a in self.answers if start <= a.sent < end]

    def stop(self) -> None:
        """Close the load's stdin (it ends after the GET in flight) and read the rest."""
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            self._proc.stdin.close()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(5)


class FailoverScene:
    """The scene, played against east's client pod and the demo's web pods."""

    def __init__(self, east: ClusterSpec, pods: WebPods) -> None:
        self.east = east
        self.pods = pods
        self.events: dict[tuple[str, str, str, str], float] = {}
        self.retries = 0.0

    def play(self) -> None:
        self.annotate()
        load = Load(in_pod_argv(self.east, "default", "client", [
            sys.executable, "-c", _LOAD, f"http://{WEB}/", str(INTERVAL_S),
            str(LOAD_BOUND_S)]))
        print(f"\nthe client pod in east GETs http://{WEB}/ every {INTERVAL_S * 1000:.0f} ms "
              "from now to the end of the scene, recording who answered; east's own pods "
              "serve first, so east's are stopped before west's to show west failing over "
              "to central, then both come back in reverse", flush=True)
        try:
            self.metrics_delta()
            started = time.monotonic()
            for n, phase in enumerate(PHASES, 1):
                started = self.run_phase(n, phase, load, started)
        finally:
            load.stop()
        self.summary(load.answers)

    def annotate(self) -> None:
        """Annotate east's web Service and wait for the client's proxy to see its groups."""
        args = ["annotate", "--overwrite", "service", "web",
                f"failover.meshgate.io/clusters={','.join(ORDER)}",
                f"failover.meshgate.io/policy=failback={FAILBACK}"]
        print(f"\nfailover: east's web fails over to west, then central:\n"
              f"  kubectl --kubeconfig {self.east.kubeconfig} {' '.join(args)}", flush=True)
        kubectl(self.east.kubeconfig, *args)
        wait_until(lambda: len(self.groups()) == 1 + len(ORDER),
                   "the client's proxy to see web in three priority groups")
        print("the client's proxy now has web in priority groups (its /endpoints):")
        for priority, (cluster, addresses) in sorted(self.groups().items()):
            print(f"  {priority} {cluster}: {', '.join(sorted(addresses))}")

    def groups(self) -> dict[int, tuple[str, list[str]]]:
        """The client proxy's endpoints of web by priority: (cluster, addresses)."""
        page = self.admin("/endpoints")
        found: dict[int, tuple[str, list[str]]] = {}
        for svc in json.loads(page or "[]"):
            if svc.get("name") != WEB or svc.get("failbackSeconds") is None:
                continue
            for ep in svc["endpoints"]:
                _, addresses = found.setdefault(ep.get("priority", 0),
                                                (ep.get("cluster") or "?", []))
                addresses.append(ep["address"])
        return found

    def run_phase(self, n: int, phase: Phase, load: Load, started: float) -> float:
        """Make the phase's change, wait for its cluster to answer, report; returns the
        time the phase ended, the next one's start."""
        print(f"\nfailover phase {n}/{len(PHASES)}: {phase.title}; {phase.expect} should "
              "answer", flush=True)
        changed, what = self.change(phase)
        problem = ""
        try:
            wait_until(lambda: self.steady(load.since(started), phase.expect),
                       f"{phase.expect} to answer web", timeout=45)
        except MeshError as e:
            problem = str(e)
        control = self.status()
        ended = time.monotonic()
        answers = load.since(started, ended)
        self.report(answers, ended - started)
        first = next((a for a in answers if a.sent >= changed and a.cluster == phase.expect),
                     None)
        if what and first is not None:
            print(f"  {phase.expect} answered from {first.sent - changed:.1f}s after {what}")
        serving = self.report_proxy()
        if control and serving and control != serving:
            print(f"  the control plane still has {control} healthy: it sees {control}'s "
                  f"gateway alive, not the pods behind it; the client's proxy found the "
                  f"failures itself and serves {serving}")
        last = answers[-STEADY:]
        print(f"  now answering: {_counts(Counter(a.cluster or 'failed' for a in last))} "
              f"(the last {len(last)} GETs)", flush=True)
        if problem:
            raise MeshError(f"failover phase {n} ({phase.title}): {problem}")
        return ended

    def change(self, phase: Phase) -> tuple[float, str]:
        """Stop or start the phase's web pods: when the change took effect, and what it
        was (the stop's start, or the first pod started being ready)."""
        began = time.monotonic()
        if phase.stop:
            print(f"  stopping {', '.join(WEB_PODS[phase.stop])} in {phase.stop}", flush=True)
            self.pods.stop_pods(WEB_PODS[phase.stop])
            return began, "the stop began"
        ready: tuple[float, str] | None = None
        for pod in WEB_PODS[phase.start] if phase.start else ():
            self.pods.start_web(phase.start, pod)
            ready = ready or (time.monotonic(), f"{pod} was ready (failback hold-down "
                                                f"{FAILBACK})")
        return ready or (began, "")

    @staticmethod
    def steady(answers: list[Answer], cluster: str) -> bool:
        last = answers[-STEADY:]
        return len(last) == STEADY and all(a.cluster == cluster for a in last)

    @staticmethod
    def report(answers: list[Answer], seconds: float) -> None:
        pods = Counter(a.pod for a in answers if a.pod)
        clusters = Counter(a.cluster for a in answers if a.cluster)
        failed = [a for a in answers if a.status != 200]
        slowest = max((a.ms for a in answers), default=0)
        print(f"  {len(answers)} GETs in {seconds:.1f}s (the slowest took {slowest:.0f} ms), "
              f"answered by cluster: {_counts(clusters)}; by pod: {_counts(pods)}")
        print(f"  failed GETs: {len(failed)}")
        for a in failed[:5]:
            print(f"    status {a.status} after {a.ms:.0f} ms: {a.said}")

    def report_proxy(self) -> str:
        """Print the client proxy's serving group, its failover events and retries since
        the last report; the serving group's cluster."""
        moved, retried = self.metrics_delta()
        serving = self.serving()
        print(f"  the client's proxy: serving {serving or '?'}; GETs it retried into "
              f"another group: {retried:.0f}")
        for (came, went, direction, cause), count in moved.items():
            print(f"  event: {direction} {came} -> {went} (cause {cause}): {count:.0f}")
        if not moved:
            print("  event: none")
        return serving

    def metrics_delta(self) -> tuple[dict[tuple[str, str, str, str], float], float]:
        """The client proxy's failover events and retries since the last call."""
        events: dict[tuple[str, str, str, str], float] = {}
        retries = 0.0
        for family in text_string_to_metric_families(self.admin("/metrics")):
            for s in family.samples:
                if s.labels.get("dst_service") != WEB:
                    continue
                if s.name == "outbound_failover_events_total":
                    key = (s.labels["from_cluster"], s.labels["to_cluster"],
                           s.labels["direction"], s.labels["cause"])
                    events[key] = events.get(key, 0.0) + s.value
                elif s.name == "outbound_failover_retries_total":
                    retries += s.value
        moved = {k: v - self.events.get(k, 0.0) for k, v in events.items()
                 if v > self.events.get(k, 0.0)}
        retried = retries - self.retries
        self.events, self.retries = events, retries
        return moved, retried

    def serving(self) -> str:
        for family in text_string_to_metric_families(self.admin("/metrics")):
            for s in family.samples:
                if s.name == "outbound_failover_group" and \
                        s.labels.get("dst_service") == WEB and s.value == 1:
                    return s.labels["cluster"]
        return ""

    def admin(self, path: str) -> str:
        page = in_pod(self.east, "default", "client", [sys.executable, "-c", _GET,
                                                       f"{_ADMIN}{path}"])
        if page.returncode != 0:
            raise MeshError(f"the client proxy's admin {path}: {page.stderr.strip()}")
        return page.stdout

    def status(self) -> str:
        """Print `meshgate failover status` for web; the cluster it says serves."""
        argv = ["failover", "status", "--kubeconfig", str(self.east.kubeconfig),
                "--service", "default/web", "--cluster-name", self.east.name]
        print(f"  meshgate {' '.join(argv)}", flush=True)
        proc = subprocess.run(meshgate_argv(argv), capture_output=True, text=True,
                              timeout=60, check=False)
        for line in (proc.stdout + proc.stderr).splitlines():
            print(f"    {line}")
        serving = re.search(r"^\s*serving: group \d+ \((\w+)", proc.stdout, re.M)
        return serving.group(1) if serving else ""

    def summary(self, answers: list[Answer]) -> None:
        failed = [a for a in answers if a.status != 200]
        clusters = Counter(a.cluster for a in answers if a.cluster)
        print(f"\nfailover scene: {len(answers)} GETs, {len(failed)} failed; answered by "
              f"cluster: {_counts(clusters)}")
        total: Counter[str] = Counter()
        for (came, went, direction, _), count in self.events.items():
            total[f"{direction} {came} -> {went}"] += int(count)
        print(f"  the client proxy's failover events: {_counts(total) or 'none'}; GETs "
              f"retried into another group: {self.retries:.0f}")
        if failed:
            print("  failed GETs (GET is idempotent, so the proxy should have retried them "
                  "into another group; the cause each got):")
            for cause, count in Counter(f"status {a.status}: {a.said}" for a in failed).items():
                print(f"    {count} x {cause}")


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{key} {count}" for key, count in counter.most_common())
