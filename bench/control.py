"""Benchmark the control plane's destination API at cluster scale.

Runs `meshgate cluster serve` and `meshgate control run` as their own
processes. Fills the cluster with Services (ClusterIP, one port; 100 to a
namespace), each with ready, meshed Pods whose EndpointSlices the API server's
endpoints controller derives, then measures, with the proxy's own client (`WatchDiscovery`):

1. the time a new subscriber waits for a snapshot with every service in it,
   one at a time and many at once, and the snapshot's size;
2. propagation: the time from an API write that changes a Service's endpoints
   (a Pod's readiness flipped through the status subresource) returning, to
   each of many subscribers announcing the change; beside it, the time until
   the API server's own EndpointSlice watch shows it, the part of the delay
   that is not the control plane's;
3. the control plane's and the API server's resident memory.

The subscribers and the writer share this process and the machine's cores with
both servers, so the figures include their cost.

    .venv/bin/python bench/control.py [--services 1000] [--endpoints 3]
        [--subscribers 50] [--changes 100] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from kubernetes import client, config

from mesh.control.crds import install_crds
from mesh.discovery.client import WatchDiscovery
from mesh.discovery.index import INBOUND_PORT_ANNOTATION
from mesh.identity import ca
from mesh.identity.bundle import TrustBundle
from mesh.identity.names import Identity, service_identity
from mesh.identity.static import StaticIdentity
from mesh.proxy.discovery import ServiceSpec

DOMAIN = "cluster.local"
SERVER = service_identity(DOMAIN)
MERGE = "application/merge-patch+json"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PER_NAMESPACE = 100
"""Services per namespace: the endpoints controller scans a namespace's Pods per Service."""
SETUP_THREADS = 16
SETUP_TIMEOUT = 300.0
CHANGE_TIMEOUT = 15.0
CHANGE_GAP = 0.1
"""Pause between one change reaching every subscriber and the next write."""


# -- processes -------------------------------------------------------------------------


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    after = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces
    return (int(after[11]) + int(after[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Process:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(name: str, args: list[str], log: Path, ready: str, timeout: float = 60.0
          ) -> tuple[Process, re.Match[str]]:
    """Start ``meshgate <args>`` with its output in ``log``; wait for a line matching
    ``ready``."""
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mesh.cli", "--log-level", "warning",
                                 *args], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    p = Process(name, proc, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if m := re.search(ready, log.read_text(errors="replace")):
            return p, m
        time.sleep(0.05)
    p.stop()
    raise SystemExit(f"{name} did not start:\n{p.tail()}")


# -- identities ------------------------------------------------------------------------


def make_trust(root: Path) -> tuple[Path, StaticIdentity]:
    """An identity directory for the control plane, and a workload identity under it."""
    issuers = ca.IssuerDir(root / "trust")
    now = dt.datetime.now(dt.UTC)
    issuers.init(DOMAIN, anchor_lifetime=dt.timedelta(days=30),
                 issuer_lifetime=dt.timedelta(days=7), now=now)
    issuer = issuers.load_issuer()
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = ca.sign_leaf(issuer, key.public_key(), Identity("default", "bench", DOMAIN),
                        now=now, lifetime=dt.timedelta(hours=2))
    bundle = TrustBundle.from_pem((issuers.path / "trust-bundle.pem").read_bytes())
    workload = StaticIdentity(ca.cert_pem(leaf) + ca.cert_pem(issuer.cert), ca.key_pem(key),
                              bundle)
    return issuers.path, workload


# -- the cluster -----------------------------------------------------------------------


@dataclass
class Svc:
    namespace: str
    name: str
    pods: list[tuple[str, str]]
    """(name, podIP)"""
    vip: str = ""
    ready: list[bool] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.vip}:80"


class ClusterWriter:
    """Writes to the cluster from many threads, one kubernetes ApiClient per thread.

    Responses are read as JSON, not decoded into the client's models, which would
    cost more than the request itself.
    """

    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig
        self._local = threading.local()

    def core(self) -> Any:
        api = getattr(self._local, "core", None)
        if api is None:
            api = client.CoreV1Api(config.new_client_from_config(str(self.kubeconfig)))
            self._local.core = api
        return api

    def namespace(self, name: str) -> None:
        self.core().create_namespace({"metadata": {"name": name}}, _preload_content=False)

    def pod(self, svc: Svc, name: str) -> None:
        self.core().create_namespaced_pod(svc.namespace, {
            "metadata": {"name": name, "labels": {"app": svc.name},
                         "annotations": {INBOUND_PORT_ANNOTATION: "4143"}},
            "spec": {"serviceAccountName": svc.name, "containers": [
                {"name": "app", "image": "bench", "ports": [{"containerPort": 8080}]}]}},
            _preload_content=False)

    def set_ready(self, svc: Svc, index: int, ready: bool) -> None:
        name, ip = svc.pods[index]
        self.core().patch_namespaced_pod_status(name, svc.namespace, {"status": {
            "phase": "Running", "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}},
            _content_type=MERGE, _preload_content=False)

    def service(self, svc: Svc) -> str:
        resp = self.core().create_namespaced_service(svc.namespace, {
            "metadata": {"name": svc.name},
            "spec": {"type": "ClusterIP", "selector": {"app": svc.name},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}},
            _preload_content=False)
        return str(json.loads(resp.data)["spec"]["clusterIP"])

    def ready_slices(self, want: int) -> int:
        """How many benchmark EndpointSlices hold ``want`` ready endpoints."""
        disc: Any = client.DiscoveryV1Api(self.core().api_client)
        resp = disc.list_endpoint_slice_for_all_namespaces(_preload_content=False)
        count = 0
        for s in json.loads(resp.data).get("items") or []:
            if not (s["metadata"].get("labels") or {}).get(SERVICE_NAME_LABEL, "").startswith(
                    "svc-"):
                continue
            ready = [e for e in s.get("endpoints") or []
                     if (e.get("conditions") or {}).get("ready")]
            count += len(ready) == want
        return count


def plan(services: int, endpoints: int) -> list[Svc]:
    out = []
    for i in range(services):
        pods = []
        for j in range(endpoints):
            n = i * endpoints + j
            pods.append((f"svc-{i}-{j}", f"10.244.{n // 250}.{n % 250 + 1}"))
        out.append(Svc(f"bench-{i // PER_NAMESPACE}", f"svc-{i}", pods,
                       ready=[True] * endpoints))
    return out


def populate(writer: ClusterWriter, fleet: list[Svc], endpoints: int) -> dict[str, float]:
    """Namespaces, Pods (created, then made ready), then Services; wait for the slices.

    Pods go first so that each Service's slice is written once with every Pod in
    it, instead of once per Pod. Returns the seconds each phase took.
    """
    timings: dict[str, float] = {}
    with ThreadPoolExecutor(SETUP_THREADS) as pool:

        def phase(name: str, jobs: list[Callable[[], Any]]) -> None:
            t = time.perf_counter()
            for future in [pool.submit(job) for job in jobs]:
                future.result()
            timings[name] = time.perf_counter() - t

        phase("namespaces", [partial(writer.namespace, ns)
                             for ns in dict.fromkeys(s.namespace for s in fleet)])
        phase("pods", [partial(writer.pod, s, name) for s in fleet for name, _ in s.pods])
        phase("pod status", [partial(writer.set_ready, s, j, True)
                             for s in fleet for j in range(len(s.pods))])

        def create(s: Svc) -> None:
            s.vip = writer.service(s)

        phase("services", [partial(create, s) for s in fleet])
    t = time.perf_counter()
    deadline = time.monotonic() + SETUP_TIMEOUT
    while (done := writer.ready_slices(endpoints)) < len(fleet):
        if time.monotonic() > deadline:
            raise SystemExit(f"only {done} of {len(fleet)} EndpointSlices were ready after "
                             f"{SETUP_TIMEOUT:g}s")
        time.sleep(0.5)
    timings["slices"] = time.perf_counter() - t
    return timings


# -- the control plane -----------------------------------------------------------------


async def wait_ready(url: str, ctx: ssl.SSLContext, proc: Process, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.proc.poll() is not None:
                break
            try:
                async with session.get(f"{url}/ready", ssl=ctx,
                                       server_hostname=SERVER.dns_name) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit(f"the control plane was not ready within {timeout:g}s:\n{proc.tail()}")


def subscriber(url: str, workload: StaticIdentity) -> WatchDiscovery:
    return WatchDiscovery(url, context=workload.client_context, server_identity=SERVER,
                          min_backoff=0.1, max_backoff=1.0)


async def raw_snapshot(url: str, ctx: ssl.SSLContext) -> tuple[float, int]:
    """Seconds from the request to the whole first line, and its size in bytes."""
    async with aiohttp.ClientSession() as session:
        t = time.perf_counter()
        async with session.get(f"{url}/v1/destinations", ssl=ctx,
                               server_hostname=SERVER.dns_name) as resp:
            assert resp.status == 200, await resp.text()
            buffer = bytearray()
            while b"\n" not in buffer:
                async with asyncio.timeout(60):
                    chunk = await resp.content.readany()
                if not chunk:
                    raise SystemExit("the destination stream ended before its snapshot")
                buffer += chunk
            elapsed = time.perf_counter() - t
    return elapsed, buffer.index(b"\n") + 1


async def raw_snapshots(url: str, ctx: ssl.SSLContext, concurrent: int, rounds: int
                        ) -> tuple[list[float], int]:
    """`raw_snapshot` by ``concurrent`` readers at once, ``rounds`` times."""
    times: list[float] = []
    size = 0
    for _ in range(rounds):
        got = await asyncio.gather(*(raw_snapshot(url, ctx) for _ in range(concurrent)))
        times += [t for t, _ in got]
        size = got[0][1]
    return times, size


async def connect(url: str, workload: StaticIdentity, count: int, services: int
                  ) -> tuple[list[WatchDiscovery], list[float]]:
    """Start ``count`` subscribers at once; return them with the seconds each took
    to hold every service."""
    clients = [subscriber(url, workload) for _ in range(count)]
    t = time.perf_counter()
    for d in clients:
        d.start()

    async def one(d: WatchDiscovery) -> float:
        if not await d.wait_ready(120.0):
            raise SystemExit(f"no snapshot within 120s: {d.last_error}")
        got = sum(1 for s in d.services() if s.name.startswith("svc-"))
        if got != services:
            raise SystemExit(f"the snapshot held {got} benchmark services, not {services}")
        return time.perf_counter() - t

    try:
        return clients, list(await asyncio.gather(*(one(d) for d in clients)))
    except BaseException:
        await asyncio.gather(*(d.stop() for d in clients))
        raise


async def snapshot_times(url: str, workload: StaticIdentity, concurrent: int, rounds: int,
                         services: int) -> list[float]:
    out: list[float] = []
    for _ in range(rounds):
        clients, times = await connect(url, workload, concurrent, services)
        await asyncio.gather(*(d.stop() for d in clients))
        out += times
    return out


# -- propagation -----------------------------------------------------------------------


@dataclass
class Target:
    """The change in flight: the state every subscriber should announce."""

    namespace: str
    name: str
    address: str
    endpoints: int
    seen: dict[int, float] = field(default_factory=dict)
    """subscriber -> when it announced the change"""
    slice_seen: float | None = None
    """When the API server's EndpointSlice watch showed it."""


class Changes:
    def __init__(self) -> None:
        self.current: Target | None = None

    def announced(self, who: int) -> Callable[[ServiceSpec], None]:
        def callback(svc: ServiceSpec) -> None:
            target = self.current
            if (target is not None and svc.address == target.address
                    and len(svc.endpoints) == target.endpoints and who not in target.seen):
                target.seen[who] = time.perf_counter()

        return callback

    def slice_event(self, obj: dict[str, Any]) -> None:
        target = self.current
        meta = obj.get("metadata") or {}
        if (target is None or target.slice_seen is not None
                or meta.get("namespace") != target.namespace
                or (meta.get("labels") or {}).get(SERVICE_NAME_LABEL) != target.name):
            return
        ready = sum(1 for e in obj.get("endpoints") or []
                    if (e.get("conditions") or {}).get("ready"))
        if ready == target.endpoints:
            target.slice_seen = time.perf_counter()


async def watch_slices(state: Path, changes: Changes, started: asyncio.Event) -> None:
    """Feed the API server's EndpointSlice events to `changes` until cancelled."""
    kc = yaml.safe_load((state / "kubeconfig").read_text())
    base = kc["clusters"][0]["cluster"]["server"]
    ctx = ssl.create_default_context(cafile=str(state / "ca.crt"))
    headers = {"Authorization": f"Bearer {kc['users'][0]['user']['token']}"}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        path = f"{base}/apis/discovery.k8s.io/v1/endpointslices"
        async with session.get(f"{path}?limit=1", ssl=ctx) as resp:
            rv = (await resp.json())["metadata"]["resourceVersion"]
        async with session.get(f"{path}?watch=true&resourceVersion={rv}"
                               "&timeoutSeconds=3600", ssl=ctx) as resp:
            started.set()
            async for line in resp.content:
                changes.slice_event(json.loads(line)["object"])


async def propagation(url: str, workload: StaticIdentity, writer: ClusterWriter,
                      fleet: list[Svc], state: Path, args: argparse.Namespace, *,
                      control_pid: int) -> dict[str, Any]:
    changes = Changes()
    clients, connect_times = await connect(url, workload, args.subscribers, len(fleet))
    started = asyncio.Event()
    slices = asyncio.create_task(watch_slices(state, changes, started))
    latencies: list[float] = []
    slice_latencies: list[float] = []
    missed = 0
    try:
        for i, d in enumerate(clients):
            d.subscribe(changes.announced(i))
        async with asyncio.timeout(30):
            await started.wait()
        stride = max(1, len(fleet) // max(1, args.changes))
        t_run = time.perf_counter()
        for k in range(args.changes):
            svc = fleet[(k * stride + k // len(fleet)) % len(fleet)]
            ready = not svc.ready[0]
            svc.ready[0] = ready
            target = Target(svc.namespace, svc.name, svc.address, sum(svc.ready))
            changes.current = target
            await asyncio.to_thread(writer.set_ready, svc, 0, ready)
            written = time.perf_counter()
            deadline = time.monotonic() + CHANGE_TIMEOUT
            while ((len(target.seen) < len(clients)
                    or (target.slice_seen is None and not slices.done()))
                   and time.monotonic() < deadline):
                await asyncio.sleep(0.002)
            missed += len(clients) - len(target.seen)
            latencies += [t - written for t in target.seen.values()]
            if target.slice_seen is not None:
                slice_latencies.append(target.slice_seen - written)
            await asyncio.sleep(CHANGE_GAP)
        elapsed = time.perf_counter() - t_run
        connected = memory(control_pid)  # while every subscriber is still connected
    finally:
        changes.current = None
        slices.cancel()
        await asyncio.gather(slices, return_exceptions=True)
        await asyncio.gather(*(d.stop() for d in clients))
    return {"latencies": latencies, "slice_latencies": slice_latencies, "missed": missed,
            "connect": connect_times, "seconds": elapsed, "memory": connected}


# -- the run ---------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    return {"count": len(values), "p50_ms": statistics.median(values) * 1000,
            "p99_ms": pct(values, 0.99) * 1000, "min_ms": min(values) * 1000,
            "max_ms": max(values) * 1000}


def ms(s: dict[str, float]) -> str:
    if not s.get("count"):
        return "no samples"
    return f"p50 {s['p50_ms']:,.0f} ms, p99 {s['p99_ms']:,.0f} ms  ({s['count']:.0f} samples)"


def memory(pid: int) -> dict[str, float]:
    rss, hwm = rss_kib(pid)
    return {"rss_mib": rss / 1024, "peak_mib": hwm / 1024}


async def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"services": args.services, "endpoints": args.endpoints,
                           "subscribers": args.subscribers, "changes": args.changes}
    state = tmp / "cluster"
    apiserver, _ = start("API server", ["cluster", "serve", "--name", "bench", "--state-dir",
                                        str(state)], tmp / "apiserver.log", r"kubeconfig:")
    control: Process | None = None
    try:
        kubeconfig = state / "kubeconfig"
        writer = ClusterWriter(kubeconfig)
        t = time.perf_counter()
        await asyncio.to_thread(install_crds, config.new_client_from_config(str(kubeconfig)))
        fleet = plan(args.services, args.endpoints)
        phases = await asyncio.to_thread(populate, writer, fleet, args.endpoints)
        out["setup_s"] = time.perf_counter() - t
        out["setup_phases_s"] = phases
        print(f"setup: {args.services} services, {args.services * args.endpoints} pods in "
              f"{out['setup_s']:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in
                                                     phases.items()) + ")", flush=True)

        identity_dir, workload = make_trust(tmp)
        t = time.perf_counter()
        control, m = start("control plane", [
            "control", "run", "--kubeconfig", str(kubeconfig), "--identity-dir",
            str(identity_dir), "--trust-domain", DOMAIN, "--listen", "127.0.0.1:0",
            "--cluster-name", "bench"], tmp / "control.log", r"serving at (https://\S+)")
        url = m.group(1)
        await wait_ready(url, workload.client_context(), control, 120.0)
        out["control_ready_s"] = time.perf_counter() - t
        out["control_after_setup"] = memory(control.proc.pid)
        print(f"control plane ready in {out['control_ready_s']:.1f} s", flush=True)

        ctx = workload.client_context()
        raw, out["snapshot_bytes"] = await raw_snapshots(url, ctx, 1, 10)
        out["snapshot_raw_1"] = summary(raw)
        out["snapshot_raw_20"] = summary((await raw_snapshots(url, ctx, 20, 3))[0])
        out["snapshot_1"] = summary(await snapshot_times(url, workload, 1, 10,
                                                         args.services))
        out["snapshot_20"] = summary(await snapshot_times(url, workload, 20, 3,
                                                          args.services))
        out["control_after_snapshots"] = memory(control.proc.pid)
        print("snapshots measured", flush=True)

        prop = await propagation(url, workload, writer, fleet, state, args,
                                 control_pid=control.proc.pid)
        out["control_with_subscribers"] = prop["memory"]
        out["subscribe_all"] = summary(prop["connect"])
        out["propagation"] = summary(prop["latencies"])
        out["apiserver_slice"] = summary(prop["slice_latencies"])
        out["missed"] = prop["missed"]
        out["propagation_run_s"] = prop["seconds"]
        out["control_after_runs"] = memory(control.proc.pid)
        out["control_cpu_s"] = cpu_seconds(control.proc.pid)
        out["apiserver"] = memory(apiserver.proc.pid)
    finally:
        if control is not None:
            control.stop()
        apiserver.stop()
    return out


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    n, s = r["services"], r["subscribers"]
    cp = r["control_after_runs"]
    rows = [
        ("cluster", f"{n} services x {r['endpoints']} ready meshed pods"),
        ("setup (CRDs, pods, services)", f"{r['setup_s']:.1f} s  (" + ", ".join(
            f"{k} {v:.1f} s" for k, v in r["setup_phases_s"].items()) + ")"),
        ("control plane start to /ready", f"{r['control_ready_s']:.1f} s"),
        ("snapshot size", f"{r['snapshot_bytes'] / 1024:,.0f} KiB ({n} services)"),
        ("snapshot read (raw mTLS), 1", ms(r["snapshot_raw_1"])),
        ("snapshot read (raw mTLS), 20 at once", ms(r["snapshot_raw_20"])),
        ("snapshot applied (WatchDiscovery), 1", ms(r["snapshot_1"])),
        ("  20 at once (clients share 1 core)", ms(r["snapshot_20"])),
        (f"  {s} at once (clients share 1 core)", ms(r["subscribe_all"])),
        ("API server slice updated", ms(r["apiserver_slice"]) + "  (part of the below)"),
        (f"propagation to {s} subscribers", ms(r["propagation"]) + "  (goal: low seconds)"),
        ("  changes, missed deliveries", f"{r['changes']} changes over "
         f"{r['propagation_run_s']:.0f} s, {r['missed']} (change, subscriber) missed"),
        ("control plane RSS after setup", f"{r['control_after_setup']['rss_mib']:.0f} MiB"),
        (f"control plane RSS, {s} subscribed", f"{r['control_with_subscribers']['rss_mib']:.0f}"
         " MiB"),
        ("control plane RSS after runs", f"{cp['rss_mib']:.0f} MiB (peak {cp['peak_mib']:.0f}"
         " MiB)  (goal: well under Linkerd's ~200 MB)"),
        ("control plane CPU, whole run", f"{r['control_cpu_s']:.1f} s"),
        ("API server RSS", f"{r['apiserver']['rss_mib']:.0f} MiB (peak "
         f"{r['apiserver']['peak_mib']:.0f} MiB)"),
    ]
    width = max(len(k) for k, _ in rows) + 2
    print()
    for k, v in rows:
        print(f"{k:<{width}}{v}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=3, help="ready pods per service")
    parser.add_argument("--subscribers", type=int, default=50)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if min(args.services, args.endpoints, args.subscribers, args.changes) < 1:
        parser.error("--services, --endpoints, --subscribers and --changes must be >= 1")
    with tempfile.TemporaryDirectory(prefix="meshgate-bench-") as tmp:
        result = asyncio.run(measure(args, Path(tmp)))
    report(result, args)


if __name__ == "__main__":
    main()
