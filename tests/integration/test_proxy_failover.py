"""Failover on loopback: a proxy whose discovery file puts a service's endpoints in
two priority groups (east, then west; plain HTTP apps, as unmeshed endpoints) keeps
answering a bounded load of GETs while east's app is killed, moves traffic to west at
once, and takes it back only after the failback hold-down once east returns. POSTs
during the move succeed or fail with the cause named, and are never replayed."""

from __future__ import annotations

import http.client
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.cluster import spawn, stop_process
from tests.meshproxy import DOMAIN, ProxyProcess, Trust, free_port, services_file, start_proxy

HOLD_DOWN_S = 3.0
SERVICE = f"shop.default.svc.{DOMAIN}"

APP = """
import http.server, sys
name, port = sys.argv[1], int(sys.argv[2])
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def _answer(self):
        body = name.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self._answer()
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        print("POST", self.headers["X-Order"], flush=True)
        self._answer()
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
server.daemon_threads = True
print("serving", flush=True)
server.serve_forever()
"""


@dataclass
class App:
    name: str
    port: int
    proc: subprocess.Popen[str] | None = None
    posts: list[str] = field(default_factory=list)
    """Orders received by earlier runs of the app."""
    output: list[str] = field(default_factory=list)

    def start(self) -> None:
        self.proc, self.output, _, _ = spawn(
            [sys.executable, "-c", APP, self.name, str(self.port)],
            lambda line: line.startswith("serving"), what=f"app {self.name}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.posts += self.orders()
        self.proc, self.output = None, []

    def orders(self) -> list[str]:
        return [line.split()[1] for line in list(self.output) if line.startswith("POST ")]


@dataclass
class Answer:
    at: float
    """When the request was sent."""
    method: str
    status: int
    origin: str
    """The app that answered, or the proxy's l5d-proxy-error."""
    latency: float


class Load:
    """GETs from two clients and POSTs from a third, until stopped or bounded."""

    def __init__(self, address: tuple[str, int], *, limit: int = 20_000,
                 duration_s: float = 60.0) -> None:
        self.address, self.limit, self.deadline = address, limit, time.monotonic() + duration_s
        self.answers: list[Answer] = []
        self.stopped = threading.Event()
        self._orders = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(m,), daemon=True)
                        for m in ("GET", "GET", "POST")]
        for t in self.threads:
            t.start()

    def _next_order(self) -> str:
        with self._lock:
            self._orders += 1
            return str(self._orders)

    def _run(self, method: str) -> None:
        conn = http.client.HTTPConnection(*self.address, timeout=10)
        while not self.stopped.is_set() and len(self.answers) < self.limit and \
                time.monotonic() < self.deadline:
            started = time.monotonic()
            try:
                if method == "GET":
                    conn.request("GET", "/who")
                else:
                    conn.request("POST", "/orders", body=b"{}",
                                 headers={"X-Order": self._next_order()})
                r = conn.getresponse()
                body = r.read().decode()
                origin = body if r.status == 200 else r.getheader("l5d-proxy-error", "")
                status = r.status
            except (OSError, http.client.HTTPException) as e:
                status, origin = 0, repr(e)
            now = time.monotonic()
            self.answers.append(Answer(started, method, status, origin, now - started))
            if status != 200:
                conn.close()
                conn = http.client.HTTPConnection(*self.address, timeout=10)
            if method == "POST":
                time.sleep(0.01)
        conn.close()

    def stop(self) -> list[Answer]:
        self.stopped.set()
        for t in self.threads:
            t.join(15)
        return self.answers

    def wait(self, seconds: float) -> None:
        time.sleep(seconds)  # the load runs meanwhile: this is the time it is measured over


@pytest.fixture()
def mesh(tmp_path: Path) -> Iterator[tuple[ProxyProcess, dict[str, App], tuple[str, int]]]:
    trust = Trust.create(tmp_path)
    apps = {name: App(name, free_port()) for name in ("east", "west")}
    for app in apps.values():
        app.start()
    address = ("127.0.2.30", free_port())
    discovery = services_file(tmp_path / "services.yaml", {
        "name": SERVICE, "address": f"{address[0]}:{address[1]}",
        "endpoints": [{"address": f"127.0.0.1:{app.port}", "targetPort": app.port,
                       "priority": priority, "cluster": app.name}
                      for priority, app in enumerate(apps.values())]})
    client = start_proxy(tmp_path, "client", {
        "identity": trust.workload("default", "client"), "discovery": str(discovery),
        "outbound": {"listen": f"127.0.0.1:{free_port()}", "requestTimeout": "5s",
                     "connectTimeout": "1s", "failbackHoldDown": f"{HOLD_DOWN_S:g}s"}})
    try:
        yield client, apps, address
    finally:
        client.stop()
        for app in apps.values():
            if app.proc is not None:
                stop_process(app.proc)


def test_gets_move_to_the_next_group_at_once_and_come_back_after_the_hold_down(
        mesh: tuple[ProxyProcess, dict[str, App], tuple[str, int]]) -> None:
    client, apps, address = mesh
    east = apps["east"]
    load = Load(address)
    load.wait(1.0)
    killing = time.monotonic()
    east.kill()
    killed = time.monotonic()
    load.wait(3.0)
    restarted = time.monotonic()
    east.start()
    load.wait(HOLD_DOWN_S + 4.0)
    answers = load.stop()

    gets = [a for a in answers if a.method == "GET"]
    assert len(gets) > 200, "the load did not run"
    assert [a for a in gets if a.status != 200] == []
    before = [a for a in gets if a.at + a.latency < killing]
    assert before and {a.origin for a in before} == {"east"}
    # Moved at once: the first answer after the kill comes from west within a second,
    # and no GET waited a second for its answer.
    during = [a for a in gets if killed <= a.at < restarted]
    assert {a.origin for a in during} == {"west"}
    assert during[0].at + during[0].latency - killed < 1.0
    assert max(a.latency for a in during) < 1.0
    # Back only after the hold-down: meanwhile east answers only probes, one a second.
    held = [a for a in gets if restarted <= a.at < restarted + HOLD_DOWN_S]
    assert sum(a.origin == "east" for a in held) <= HOLD_DOWN_S + 1
    assert sum(a.origin == "west" for a in held) > 50
    last = [a for a in gets if a.at >= restarted + HOLD_DOWN_S + 2.0]
    assert last and {a.origin for a in last} == {"east"}

    posts = [a for a in answers if a.method == "POST"]
    failed = [a for a in posts if a.status != 200]
    assert all(a.status in (502, 503) and "east" in a.origin for a in failed), failed
    received = east.posts + east.orders() + apps["west"].orders()
    assert len(received) == len(set(received)), "an order was replayed"
    assert len([a for a in posts if a.status == 200]) <= len(received)

    def metric(name: str, **labels: str) -> float:
        return client.metric(name, dst_service=SERVICE, **labels)

    assert metric("outbound_failover_events_total", from_cluster="east", to_cluster="west",
                  direction="failover") == 1
    assert metric("outbound_failover_events_total", from_cluster="west", to_cluster="east",
                  direction="failback", cause="recovered") == 1
    assert metric("outbound_failover_group", cluster="east") == 1
    assert metric("outbound_failover_group", cluster="west") == 0
    assert metric("outbound_failover_retries_total", to_cluster="west") >= 1
    assert metric("outbound_failover_group_seconds_total", cluster="west") > 2.0
    assert metric("outbound_failover_unreplayed_total") == len(failed), failed
