"""The data-plane half of bench/multicluster.py: a call through the multicluster
gateway against a same-cluster call, in one run on 127.0.0.1.

    wrk -> caller proxy ----------------mTLS----------------> target proxy -> nginx
    wrk -> caller proxy --mTLS--> meshgate gateway --mTLS--> target proxy -> nginx

nginx serves a 2-byte body with one worker, as in bench/dataplane.py, whose
certificates, processes, nginx and wrk this module uses. The target proxy
trusts the gateway to name the caller (``inbound.trustedGateways``). The
gateway (`meshgate gateway run`) reads an embedded API server (`meshgate
cluster serve`) holding the exported Service ``nginx`` and one ready Pod at
127.0.0.1 whose inbound-port annotation names the target proxy. Each path has
its own caller proxy with static discovery for two services, one HTTP-aware
and one opaque: the same-cluster caller's endpoint is the target proxy; the
other's is the gateway, with the gateway's identity and the exported Service's
name as ``authorityOverride``, as a mirror's endpoints are.

For each mode (HTTP-aware, opaque) and load, the two paths run one after the
other: wrk keep-alive at 16 and 64 connections (req/s, p50, p99 and the
ratio gateway / same-cluster), then a fixed offered load (wrk at 16
connections, each waiting 16/rate s after every response: ``rate`` req/s less
the latency). Per run: each proxy's CPU microseconds per request (utime+stime
over the run / requests) and RSS after it, and the callers the target proxy
counted in the run (``request_total`` for HTTP, ``tcp_open_total`` for opaque,
by ``client_id``): through the gateway it must be the caller, not the gateway.
The gateway's RSS is also taken once it is ready, before any traffic.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from dataplane import (
    DOMAIN,
    SERVICE_HOST,
    START_TIMEOUT,
    BenchError,
    Certs,
    Proc,
    Procs,
    Workload,
    cpu_seconds,
    free_port,
    issue_workload,
    make_certs,
    rss_kb,
    run_wrk,
    start_nginx,
    wait_log,
)
from kubernetes import client, config
from prometheus_client.parser import text_string_to_metric_families

from mesh.control.crds import install_crds
from mesh.discovery.index import INBOUND_PORT_ANNOTATION
from mesh.identity import ca
from mesh.identity.names import Identity

PATHS = ("same-cluster", "gateway")
MODES = ("http", "opaque")
LOADS = (("c=16", 16), ("c=64", 64), ("fixed", 16))
"""(name, wrk connections); "fixed" paces each connection to the offered rate."""
SERVICE = "nginx"
SERVICE_PORT = 80
REMOTE_NAME = f"{SERVICE}.default.svc.{DOMAIN}"
"""The exported Service's name in its own cluster: the mirror endpoints' authorityOverride."""
EXPORTED = {"mirror.meshgate.io/exported": "true"}
GATEWAY = Identity("multicluster", "gateway", DOMAIN)
TARGET_SA = "server"
"""The target Pod's ServiceAccount: the gateway dials it as server.default...."""
CALLER_METRIC = {"http": "request_total", "opaque": "tcp_open_total"}


@dataclass
class Run:
    path: str
    mode: str
    load: str
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    cpu_us_per_req: dict[str, float | None] = field(default_factory=dict)
    rss_kb: dict[str, int | None] = field(default_factory=dict)
    target_saw: dict[str, int] = field(default_factory=dict)
    """client_id -> requests (HTTP) or connections (opaque) the target counted in the run."""


@dataclass
class Mesh:
    """The running processes and the URL wrk drives for each (path, mode)."""

    target: Proc
    target_admin: str
    gateway: Proc
    callers: dict[str, Proc]
    urls: dict[tuple[str, str], str]

    def procs_of(self, path: str) -> dict[str, Proc]:
        on_path = {"caller": self.callers[path], "target": self.target}
        return on_path | {"gateway": self.gateway} if path == "gateway" else on_path


# -- setting up ---------------------------------------------------------------------------

def _identity(certs: Certs, w: Workload) -> dict[str, str]:
    return {"name": w.name, "trustBundle": str(certs.bundle), "certFile": str(w.cert),
            "keyFile": str(w.key)}


def _start_proxy(root: Path, procs: Procs, name: str, conf: dict[str, Any]) -> Proc:
    conf.setdefault("outbound", {"listen": f"127.0.0.1:{free_port()}"})
    conf.setdefault("admin", {"listen": f"127.0.0.1:{free_port()}"})
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(conf))
    proc = procs.start(name, [sys.executable, "-m", "mesh.cli", "proxy", "run", "--config",
                              str(path)])
    wait_log(proc, " ready (pid")
    return proc


def start_cluster(root: Path, procs: Procs) -> Path:
    """An embedded API server (`meshgate cluster serve`); its kubeconfig."""
    state = root / "west"
    proc = procs.start("cluster", [sys.executable, "-m", "mesh.cli", "cluster", "serve",
                                   "--name", "west", "--state-dir", str(state)])
    wait_log(proc, "kubeconfig: ", timeout=60)
    return state / "kubeconfig"


def export_nginx(kubeconfig: Path, nginx_port: int, inbound_port: int) -> None:
    """The exported Service and its one ready Pod at 127.0.0.1 behind the target proxy."""
    api = config.new_client_from_config(str(kubeconfig))
    install_crds(api)  # the gateway reads the policy resources before it is ready
    core: Any = client.CoreV1Api(api)
    core.create_namespaced_service("default", {
        "metadata": {"name": SERVICE, "labels": EXPORTED},
        "spec": {"selector": {"app": SERVICE},
                 "ports": [{"port": SERVICE_PORT, "targetPort": nginx_port}]}})
    core.create_namespaced_pod("default", {
        "metadata": {"name": f"{SERVICE}-1", "labels": {"app": SERVICE},
                     "annotations": {INBOUND_PORT_ANNOTATION: str(inbound_port)}},
        "spec": {"serviceAccountName": TARGET_SA,
                 "containers": [{"name": "app", "image": "nginx",
                                 "ports": [{"containerPort": nginx_port}]}]}})
    core.patch_namespaced_pod_status(f"{SERVICE}-1", "default", {"status": {
        "phase": "Running", "podIP": "127.0.0.1",
        "conditions": [{"type": "Ready", "status": "True"}]}},
        _content_type="application/merge-patch+json")
    slices: Any = client.DiscoveryV1Api(api)
    deadline = time.monotonic() + START_TIMEOUT
    while not any(s.endpoints for s in slices.list_namespaced_endpoint_slice(
            "default", label_selector=f"kubernetes.io/service-name={SERVICE}").items):
        if time.monotonic() > deadline:
            raise BenchError(f"no EndpointSlice for {SERVICE} after {START_TIMEOUT:.0f} s")
        time.sleep(0.1)


def start_gateway(root: Path, procs: Procs, certs: Certs, kubeconfig: Path) -> tuple[Proc, int]:
    """`meshgate gateway run`, once /ready answers; the process and its listening port."""
    issuer = ca.IssuerDir(root / "trust").load_issuer()
    workload = issue_workload(root, issuer, GATEWAY, now=dt.datetime.now(dt.UTC))
    port, admin = free_port(), f"127.0.0.1:{free_port()}"
    path = root / "gateway.yaml"
    path.write_text(yaml.safe_dump({
        "identity": _identity(certs, workload), "kubeconfig": str(kubeconfig),
        "listen": f"127.0.0.1:{port}", "admin": admin}))
    proc = procs.start("gateway", [sys.executable, "-m", "mesh.cli", "gateway", "run",
                                   "--config", str(path)])
    wait_log(proc, " listening on ")
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with urllib.request.urlopen(f"http://{admin}/ready", timeout=5) as resp:
                if resp.status == 200:
                    return proc, port
        except OSError as e:
            if time.monotonic() > deadline:
                raise BenchError(f"the gateway is not ready: {e}\n{proc.tail()}") from e
        time.sleep(0.1)


def start_caller(root: Path, procs: Procs, certs: Certs, path: str,
                 endpoint: dict[str, Any]) -> tuple[Proc, dict[str, str]]:
    """A caller proxy whose two services (HTTP-aware, opaque) go to `endpoint`."""
    ports = {mode: free_port(SERVICE_HOST) for mode in MODES}
    discovery = {"services": [
        {"name": f"{SERVICE}-{path}-{mode}.default.svc.{DOMAIN}",
         "address": f"{SERVICE_HOST}:{ports[mode]}", "opaque": mode == "opaque",
         "endpoints": [endpoint]} for mode in MODES]}
    services = root / f"caller-{path}-services.yaml"
    services.write_text(yaml.safe_dump(discovery))
    proc = _start_proxy(root, procs, f"caller-{path}", {
        "identity": _identity(certs, certs.client), "discovery": str(services),
        "inbound": {"listen": f"127.0.0.1:{free_port()}", "authorized": ["*"]}})
    return proc, {mode: f"http://{SERVICE_HOST}:{ports[mode]}/" for mode in MODES}


def start_mesh(root: Path, procs: Procs, paths: tuple[str, ...] = PATHS) -> Mesh:
    """nginx, the target proxy, the API server, the gateway and a caller for each of
    `paths`."""
    certs = make_certs(root)
    nginx_port = start_nginx(root, procs)
    inbound, target_admin = free_port(), f"127.0.0.1:{free_port()}"
    target = _start_proxy(root, procs, "target", {
        "identity": _identity(certs, certs.server), "admin": {"listen": target_admin},
        "inbound": {"listen": f"127.0.0.1:{inbound}", "authorized": ["*"],
                    "trustedGateways": [GATEWAY.dns_name]}})
    kubeconfig = start_cluster(root, procs)
    export_nginx(kubeconfig, nginx_port, inbound)
    gateway, gateway_port = start_gateway(root, procs, certs, kubeconfig)
    endpoints = {
        "same-cluster": {"address": f"127.0.0.1:{inbound}", "targetPort": nginx_port,
                         "identity": certs.server.name},
        # as a mirror's endpoint: the gateway, told the Service's name over there
        "gateway": {"address": f"127.0.0.1:{gateway_port}", "targetPort": SERVICE_PORT,
                    "identity": GATEWAY.dns_name, "authorityOverride": REMOTE_NAME},
    }
    callers: dict[str, Proc] = {}
    urls: dict[tuple[str, str], str] = {}
    for path in paths:
        callers[path], by_mode = start_caller(root, procs, certs, path, endpoints[path])
        urls |= {(path, mode): url for mode, url in by_mode.items()}
    return Mesh(target, f"http://{target_admin}", gateway, callers, urls)


def smoke_test(url: str) -> None:
    """One request, which must come back with nginx's 'ok'."""
    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if (body := resp.read()) == b"ok":
                    return
                raise BenchError(f"{url} answered {body[:100]!r}, not 'ok'")
        except OSError as e:
            if time.monotonic() > deadline:
                raise BenchError(f"GET {url} fails: {e}") from e
            time.sleep(0.2)


# -- measuring ----------------------------------------------------------------------------

def inbound_by_caller(admin: str, sample: str) -> dict[str, float]:
    """The target proxy's inbound `sample` counter summed by client_id."""
    with urllib.request.urlopen(f"{admin}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and s.labels.get("direction") == "inbound":
                who = s.labels.get("client_id", "")
                out[who] = out.get(who, 0.0) + s.value
    return out


def pacing_script(root: Path, rate: float, connections: int) -> Path:
    """A wrk script that waits connections/rate between each connection's requests."""
    ms = max(1, round(connections * 1000 / rate))
    script = root / f"pace-{ms}ms.lua"
    script.write_text(f"function delay()\n  return {ms}\nend\n")
    return script


def measure(procs: Procs, mesh: Mesh, path: str, mode: str, load: str, connections: int,
            duration: float, script: Path | None) -> Run:
    on_path = mesh.procs_of(path)
    metric = CALLER_METRIC[mode]
    saw_before = inbound_by_caller(mesh.target_admin, metric)
    cpu_before = {role: cpu_seconds(p.pid) for role, p in on_path.items()}
    wrk = run_wrk(procs, mesh.urls[(path, mode)], connections, duration, close=False,
                  script=script)
    cpu: dict[str, float | None] = {}
    for role, p in on_path.items():
        if not p.alive():
            raise BenchError(f"{p.name} died during the run:\n{p.tail()}")
        start, end = cpu_before[role], cpu_seconds(p.pid)
        cpu[role] = (round((end - start) * 1e6 / wrk.requests, 1)
                     if start is not None and end is not None and wrk.requests else None)
    saw_after = inbound_by_caller(mesh.target_admin, metric)
    saw = {who: round(n - saw_before.get(who, 0.0)) for who, n in saw_after.items()}
    return Run(path, mode, load, connections, wrk.rps, wrk.p50_ms, wrk.p99_ms, wrk.requests,
               wrk.errors, cpu, {role: rss_kb(p.pid) for role, p in on_path.items()},
               {who: n for who, n in saw.items() if n > 0})


@dataclass
class Result:
    runs: list[Run]
    gateway_idle_rss_kb: int | None
    """The gateway's RSS once ready, before any traffic."""


def bench(root: Path, procs: Procs, *, duration: float, rate: float,
          warmup: float = 1.0) -> Result:
    """Start everything, run every (mode, load, path), stop everything."""
    mesh = start_mesh(root, procs)
    try:
        idle_rss = rss_kb(mesh.gateway.pid)
        for url in mesh.urls.values():
            smoke_test(url)
            run_wrk(procs, url, 16, warmup, close=False)
        runs = []
        for mode in MODES:
            for load, connections in LOADS:
                script = pacing_script(root, rate, connections) if load == "fixed" else None
                for path in PATHS:
                    r = measure(procs, mesh, path, mode, load, connections, duration, script)
                    print(f"  {mode:6} {load:5} {path:12} {r.rps:8.0f} req/s  "
                          f"p50 {r.p50_ms:.3f} ms  p99 {r.p99_ms:.3f} ms"
                          + (f"  ({r.errors} errors)" if r.errors else ""), flush=True)
                    runs.append(r)
        return Result(runs, idle_rss)
    finally:
        procs.stop_all()


# -- reporting ----------------------------------------------------------------------------

def ratios(runs: list[Run]) -> list[dict[str, Any]]:
    """Gateway path / same-cluster path for each (mode, load) measured on both."""
    by = {(r.path, r.mode, r.load): r for r in runs}
    out = []
    for mode in MODES:
        for load, _ in LOADS:
            g, s = by.get(("gateway", mode, load)), by.get(("same-cluster", mode, load))
            if g is None or s is None or not (s.rps and s.p50_ms and s.p99_ms):
                continue
            out.append({"mode": mode, "load": load, "rps": round(g.rps / s.rps, 2),
                        "p50": round(g.p50_ms / s.p50_ms, 2),
                        "p99": round(g.p99_ms / s.p99_ms, 2)})
    return out


def _short(identity: str) -> str:
    """client.default.serviceaccount.identity... -> default/client."""
    sa, ns = identity.split(".")[:2]
    return f"{ns}/{sa}" if identity.count(".") > 2 else identity or "-"


def _fmt(value: float | int | None, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def print_table(result: Result) -> None:
    runs = result.runs
    header = ("mode", "load", "path", "req/s", "p50 ms", "p99 ms",
              "CPU us/req caller/gw/target", "RSS MiB gw", "target saw")
    rows = [header]
    for r in runs:
        cpu = "/".join(_fmt(r.cpu_us_per_req.get(role), ".1f")
                       for role in ("caller", "gateway", "target"))
        gw_rss = r.rss_kb.get("gateway")
        rows.append((r.mode, r.load, r.path, f"{r.rps:.0f}", f"{r.p50_ms:.3f}",
                     f"{r.p99_ms:.3f}", cpu, _fmt(None if gw_rss is None else gw_rss / 1024,
                                                  ".0f"),
                     ", ".join(f"{_short(who)} {n}" for who, n in sorted(r.target_saw.items()))
                     or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    print("\ngateway path / same-cluster path:")
    for q in ratios(runs):
        print(f"  {q['mode']:6} {q['load']:5}  req/s x{q['rps']:.2f}  p50 x{q['p50']:.2f}  "
              f"p99 x{q['p99']:.2f}")
    idle = result.gateway_idle_rss_kb
    idle_mib = _fmt(None if idle is None else idle / 1024, ".0f")
    print(f"\ngateway RSS once ready, before any traffic: {idle_mib} MiB")
    seen = callers_through_gateway(runs)
    print("\ncallers the target counted on the gateway path: "
          f"{', '.join(_short(who) for who in seen) or 'none'}; the gateway's own identity "
          f"{'WAS' if GATEWAY.dns_name in seen else 'was not'} among them")


def callers_through_gateway(runs: list[Run]) -> list[str]:
    return sorted({who for r in runs if r.path == "gateway" for who in r.target_saw})


def to_json(result: Result, *, duration: float, rate: float) -> dict[str, Any]:
    runs = result.runs
    return {"duration_s": duration, "offered_rate": rate,
            "gateway_idle_rss_kb": result.gateway_idle_rss_kb, "runs": [asdict(r) for r in runs],
            "ratios": ratios(runs), "callers_through_gateway": callers_through_gateway(runs)}
