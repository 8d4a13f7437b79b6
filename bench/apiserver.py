"""Benchmark the embedded API server against the limit it is built on.

Runs `meshgate cluster serve` as its own process and, in the same run, the
same number of single-row SQLite transactions with the server's durability
settings (WAL, synchronous=FULL): the ceiling for durable creates on this
machine. Prints creates/s and the ratio to that ceiling, the time to list
every Service, watch delivery latency (p50/p99) to concurrent watchers, and
the server's resident memory.

    .venv/bin/python bench/apiserver.py [--services 5000] [--watchers 100] [--kubelet]

With `--kubelet` (root: Pods get network namespaces) it also runs `meshgate cluster
up` and measures, with the pinned kubectl as a user would run it, the time from
`kubectl apply` of a Deployment of 10 replicas to `kubectl rollout status` returning,
and from `kubectl delete` to the last Pod gone; then the kubelet's RSS and CPU (it runs
in the API server's process) with 50 Pods running, over an idle minute.

With `--control-planes` (root) it times `meshgate cluster up --multicluster`, which
installs meshgate's manifests for the kubelet to run as Deployments: from the command's
start to its return, and to the control plane's /ready answering; then the resident
memory of the control plane's and the gateway's Pods.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml


def service(i: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"svc-{i}", "labels": {"app": f"app-{i % 50}", "bench": "yes"}},
            "spec": {"selector": {"app": f"app-{i % 50}"},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080},
                               {"name": "metrics", "port": 9090}]}}


def sqlite_ceiling(n: int, directory: Path) -> float:
    """Single-row durable transactions per second, as the server's store commits them."""
    db = sqlite3.connect(directory / "ceiling.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE objects (k TEXT PRIMARY KEY, rv INTEGER, data TEXT)")
    body = json.dumps(service(0))
    start = time.perf_counter()
    for i in range(n):
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO objects VALUES (?, ?, ?)", (f"svc-{i}", i, body))
        db.execute("COMMIT")
    elapsed = time.perf_counter() - start
    db.close()
    return n / elapsed


def rss_kib(pid: int) -> tuple[int, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def start_server(state: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mesh.cli", "--log-level", "warning", "cluster", "serve",
         "--name", "bench", "--state-dir", str(state)],
        stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        if line.startswith("kubeconfig:"):
            return proc
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit("the server did not start")


class Client:
    def __init__(self, state: Path) -> None:
        kc = yaml.safe_load((state / "kubeconfig").read_text())
        self.base = kc["clusters"][0]["cluster"]["server"]
        token = kc["users"][0]["user"]["token"]
        self.ssl = ssl.create_default_context(cafile=str(state / "ca.crt"))
        self.session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {token}"},
            connector=aiohttp.TCPConnector(ssl=self.ssl, limit=200))

    async def request(self, method: str, path: str, body: Any = None,
                      content_type: str = "application/json") -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        async with self.session.request(method, self.base + path, data=data,
                                        headers={"Content-Type": content_type}) as resp:
            out: dict[str, Any] = await resp.json()
            if resp.status >= 300:
                raise RuntimeError(f"{method} {path}: {resp.status} {out.get('message')}")
            return out


async def create_all(c: Client, n: int, concurrency: int) -> float:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            await c.request("POST", "/api/v1/namespaces/bench/services", service(i))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - start)


async def watch_fanout(c: Client, watchers: int, updates: int) -> list[float]:
    """Latency from sending each update to each watcher receiving it, in ms."""
    rv = (await c.request("GET", "/api/v1/namespaces/bench/services?limit=1"))[
        "metadata"]["resourceVersion"]
    sent: dict[str, float] = {}
    latencies: list[float] = []
    ready = asyncio.Semaphore(0)

    async def watcher() -> None:
        url = (f"{c.base}/api/v1/namespaces/bench/services?watch=true&resourceVersion={rv}"
               f"&fieldSelector=metadata.name%3Dsvc-0&timeoutSeconds=120")
        seen = 0
        async with c.session.get(url) as resp:
            ready.release()
            async for line in resp.content:
                now = time.perf_counter()
                ev = json.loads(line)
                marker = ev["object"]["metadata"].get("annotations", {}).get("bench/marker")
                if marker in sent:
                    latencies.append((now - sent[marker]) * 1000)
                    seen += 1
                    if seen == updates:
                        return

    tasks = [asyncio.create_task(watcher()) for _ in range(watchers)]
    for _ in range(watchers):
        await ready.acquire()
    for u in range(updates):
        marker = f"u{u}"
        sent[marker] = time.perf_counter()
        await c.request("PATCH", "/api/v1/namespaces/bench/services/svc-0",
                        {"metadata": {"annotations": {"bench/marker": marker}}},
                        "application/merge-patch+json")
        await asyncio.sleep(0.01)
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    return latencies


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


async def run(args: argparse.Namespace, state: Path, pid: int) -> None:
    c = Client(state)
    try:
        await c.request("POST", "/api/v1/namespaces", {"metadata": {"name": "bench"}})
        rate = await create_all(c, args.services, args.concurrency)
        t = time.perf_counter()
        listed = await c.request("GET", "/api/v1/namespaces/bench/services")
        list_s = time.perf_counter() - t
        assert len(listed["items"]) == args.services
        latencies = await watch_fanout(c, args.watchers, args.updates)
    finally:
        await c.session.close()
    rss, hwm = rss_kib(pid)
    ceiling = sqlite_ceiling(args.services, state)
    print(f"services created          {args.services} ({args.concurrency} concurrent clients)")
    print(f"creates/s                 {rate:,.0f}")
    print(f"sqlite durable tx/s       {ceiling:,.0f}  (limit: WAL, synchronous=FULL, 1 row/tx)")
    print(f"ratio to limit            {rate / ceiling:.2f}x  (goal >= 0.25x)")
    print(f"list {args.services} services     {list_s * 1000:,.0f} ms")
    print(f"watch delivery            {len(latencies)} deliveries to {args.watchers} watchers: "
          f"p50 {statistics.median(latencies):.1f} ms, p99 {pct(latencies, 0.99):.1f} ms")
    print(f"server RSS                {rss / 1024:.0f} MiB (peak {hwm / 1024:.0f} MiB)")


DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: sleeper, namespace: default}
spec:
  replicas: 10
  selector: {matchLabels: {app: sleeper}}
  template:
    metadata: {labels: {app: sleeper}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - {name: sleep, image: busybox, command: [sleep, "86400"]}
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def kubelet_bench(idle_s: float) -> None:
    """Deployment rollout and deletion through the embedded kubelet, and its cost."""
    kubectl = str(Path(sys.executable).parent / "kubectl")
    with tempfile.TemporaryDirectory(prefix="meshgate-bench-kubelet-") as tmp:
        base = Path(tmp)
        env = {**os.environ, "MESHGATE_RUN_DIR": str(base / "run")}
        meshgate = [sys.executable, "-m", "mesh.cli"]
        state = base / "state"
        subprocess.run([*meshgate, "cluster", "up", "--name", "mgbench", "--state-dir",
                        str(state), "--pod-cidr", "10.219.0.0/16", "--service-cidr",
                        "10.220.0.0/16"], env=env, check=True, capture_output=True)
        try:
            kc = ["--kubeconfig", str(state / "kubeconfig")]

            def k(*argv: str, stdin: str | None = None) -> str:
                return subprocess.run([kubectl, *kc, *argv], input=stdin, check=True,
                                      capture_output=True, text=True, timeout=300).stdout

            def pods() -> int:
                return len(k("get", "pods", "-l", "app=sleeper", "-o", "name").split())

            pid = int((state / "run" / "apiserver.pid").read_text())
            rss0, _ = rss_kib(pid)
            t = time.monotonic()
            k("apply", "-f", "-", stdin=DEPLOYMENT)
            k("rollout", "status", "deployment/sleeper", "--timeout=300s")
            rollout_s = time.monotonic() - t
            t = time.monotonic()
            k("delete", "deployment", "sleeper", "--wait=false")
            deadline = t + 300
            while pods():
                if time.monotonic() > deadline:
                    raise SystemExit("the Deployment's Pods were not gone 300 s after delete")
                time.sleep(0.1)  # a poll: each round is a kubectl call
            delete_s = time.monotonic() - t
            k("apply", "-f", "-", stdin=DEPLOYMENT.replace("replicas: 10", "replicas: 50"))
            t = time.monotonic()
            k("rollout", "status", "deployment/sleeper", "--timeout=600s")
            rollout50_s = time.monotonic() - t
            cpu, t = cpu_seconds(pid), time.monotonic()
            time.sleep(idle_s)
            idle_cpu = (cpu_seconds(pid) - cpu) / (time.monotonic() - t)
            rss50, _ = rss_kib(pid)
            k("delete", "deployment", "sleeper")
        finally:
            subprocess.run([*meshgate, "cluster", "down", "--name", "mgbench"], env=env,
                           capture_output=True)
    print(f"10 replicas: apply to rollout status  {rollout_s:.1f} s")
    print(f"10 replicas: delete to all Pods gone  {delete_s:.1f} s")
    print(f"50 replicas: apply to rollout status  {rollout50_s:.1f} s")
    print(f"API server + kubelet RSS              {rss0 / 1024:.0f} MiB idle, "
          f"{rss50 / 1024:.0f} MiB with 50 Pods ({(rss50 - rss0) / 50:.0f} KiB a Pod)")
    print(f"API server + kubelet CPU, 50 Pods     {idle_cpu * 100:.1f} % of a core over "
          f"{idle_s:.0f} s with nothing changing")


READY = """
import ssl, sys, time, urllib.request
ctx = ssl.create_default_context()
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    try:
        if urllib.request.urlopen(sys.argv[1], context=ctx, timeout=2).status == 200:
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.05)
sys.exit(1)
"""


def tree_rss_kib(pids: list[int]) -> int:
    """VmRSS of `pids` and of their descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo, seen = 0, list(pids), set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            total += rss_kib(pid)[0]
        except (OSError, KeyError):
            continue
        todo += children.get(pid, [])
    return total


def pod_pids(cluster: str, deployment: str) -> list[int]:
    """The processes in the network namespace of `deployment`'s Pod."""
    from pyroute2 import netns

    from localcluster.kubelet.reap import processes_in

    prefix = f"mg-{cluster}-pod-meshgate-{deployment}-"
    return [pid for n in netns.listnetns() if n.startswith(prefix) for pid in processes_in(n)]


def control_plane_bench() -> None:
    """`cluster up --multicluster` to a ready control plane."""
    rows = []
    for mode, cluster, wan in (("manifests", "mgbenchm", "mg-benchmwan"),):
        with tempfile.TemporaryDirectory(prefix="meshgate-bench-cp-") as tmp:
            base = Path(tmp)
            env = {**os.environ, "MESHGATE_RUN_DIR": str(base / "run")}
            meshgate = [sys.executable, "-m", "mesh.cli"]
            state = base / "state"
            t = time.monotonic()
            subprocess.run([*meshgate, "cluster", "up", "--name", cluster, "--state-dir",
                            str(state), "--pod-cidr", "10.219.0.0/16", "--service-cidr",
                            "10.220.0.0/16", "--multicluster", "--wan", wan, "--wan-cidr",
                            "172.31.237.0/24"], env=env,
                           check=True, capture_output=True, timeout=600)
            up_s = time.monotonic() - t
            try:
                kubectl = str(Path(sys.executable).parent / "kubectl")
                address = subprocess.run(
                    [kubectl, "--kubeconfig", str(state / "kubeconfig"), "-n", "meshgate",
                     "get", "pods", "-l", "app.kubernetes.io/name=meshgate-control", "-o",
                     "jsonpath={.items[0].status.podIP}"], check=True, text=True,
                    capture_output=True).stdout
                control = pod_pids(cluster, "meshgate-control")
                gateway = pod_pids(cluster, "meshgate-gateway")
                subprocess.run([*meshgate, "cluster", "exec", "--name", cluster, "--",
                                sys.executable, "-c", READY, f"https://{address}:8086/ready"],
                               env=env, check=True, capture_output=True, timeout=600)
                ready_s = time.monotonic() - t
                time.sleep(5)  # settled: certificates issued, informers synced
                rows.append((mode, up_s, ready_s, tree_rss_kib(control),
                             tree_rss_kib(gateway)))
            finally:
                subprocess.run([*meshgate, "cluster", "down", "--name", cluster], env=env,
                               capture_output=True)
    print("control plane   cluster up returns   /ready answers   control RSS   gateway RSS")
    for mode, up_s, ready_s, control_kib, gateway_kib in rows:
        print(f"{mode:<15} {up_s:>14.1f} s {ready_s:>14.1f} s {control_kib / 1024:>9.0f} MiB "
              f"{gateway_kib / 1024:>9.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=5000)
    parser.add_argument("--watchers", type=int, default=100)
    parser.add_argument("--updates", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--kubelet", action="store_true",
                        help="also run Deployments through the kubelet (needs root)")
    parser.add_argument("--idle", type=float, default=60.0,
                        help="seconds over which the kubelet's idle CPU is measured")
    parser.add_argument("--control-planes", action="store_true",
                        help="only time `cluster up` to a ready control plane (needs root)")
    args = parser.parse_args()
    if args.control_planes:
        control_plane_bench()
        return
    with tempfile.TemporaryDirectory(prefix="meshgate-bench-") as tmp:
        state = Path(tmp) / "cluster"
        proc = start_server(state)
        try:
            asyncio.run(run(args, state, proc.pid))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    if args.kubelet:
        kubelet_bench(args.idle)


if __name__ == "__main__":
    main()
