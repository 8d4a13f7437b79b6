"""Benchmark multicluster: the service mirror's convergence and update propagation,
and a call through the gateway against a same-cluster call.

The mirror part runs two embedded API servers (`meshgate cluster serve`: west
exports, east imports) and one mirror controller (`meshgate mirror run`) as their own
processes, links them with the real `meshgate multicluster link` credential,
and answers the gateway's probe on loopback. Then it measures:

1. convergence: N exported Services are created in west (from 16 threads,
   100 to a namespace); the time from the first create to every mirror being
   present in east, and to every mirror's EndpointSlice, and each Service's own
   create-returned -> mirror-seen delay;
2. update propagation, one change at a time: a label changed on one remote
   Service (the patch returning) until east's watch shows the mirror with it;
3. a burst: the same label changed on all N at once, until every mirror shows it;
4. the controller's resident memory at the end.

East is watched from this process (one watch on mirror Services, one on their
EndpointSlices; a watch that starts late still reports what exists), so the
figures include a watch's delivery, as any client of the mirrors would see
them. Everything shares the machine's cores.

The data-plane part (bench/gatewaypath.py) runs nginx behind a target proxy
and drives it with wrk through a caller proxy straight to the target
(same-cluster) and through a caller proxy whose endpoint is `meshgate gateway
run` (as a mirror's is), HTTP-aware and opaque: req/s, p50 and p99 at 16 and
64 connections and their ratios, each process's CPU per request and RSS at a
fixed offered load, and the caller identity the target saw.

    .venv/bin/python bench/multicluster.py [--services 1000] [--changes 100]
        [--duration 10] [--rate 1000] [--skip-mirror] [--skip-dataplane]
        [--json FILE]

Missing Debian packages (wrk, nginx) are installed with apt-get.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import gatewaypath
import urllib3
import yaml
from control import ClusterWriter
from dataplane import Proc, Procs, ensure_packages, raise_nofile, rss_kb, wait_log
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from mirror.crds import install_crds
from mirror.link import GROUP, PLURAL, VERSION

EXPORTED = "mirror.meshgate.io/exported"
MIRRORED = "mirror.meshgate.io/mirrored-service"
CLUSTER = "mirror.meshgate.io/cluster-name"
SERVICE_NAME = "kubernetes.io/service-name"
PER_NAMESPACE = 100
THREADS = 16
TIMEOUT = 600.0
CHANGE_TIMEOUT = 15.0
REVISION = "bench-rev"


# -- processes -------------------------------------------------------------------------

def start(procs: Procs, name: str, args: list[str], ready: str) -> Proc:
    """``meshgate <args>`` with its output in its log, once the log shows `ready`."""
    proc = procs.start(name, [sys.executable, "-m", "mesh.cli", "--log-level", "warning",
                              *args])
    wait_log(proc, ready, timeout=60)
    return proc


class _Ready(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


# -- watching east ---------------------------------------------------------------------

@dataclass
class Seen:
    """When each mirror (and its slice) was first seen, and when each label value was."""

    mirrors: dict[str, float] = field(default_factory=dict)
    slices: dict[str, float] = field(default_factory=dict)
    revisions: dict[tuple[str, str], float] = field(default_factory=dict)
    lock: threading.Condition = field(default_factory=threading.Condition)

    def wait(self, what: str, done: Callable[[], bool], timeout: float) -> None:
        with self.lock:
            if not self.lock.wait_for(done, timeout=timeout):
                raise SystemExit(f"timed out after {timeout:g}s waiting for {what}")


def _follow(stop: threading.Event, list_fn: Callable[..., Any], selector: str,
            handle: Callable[[Any], None]) -> None:
    """Watch until `stop`, resuming where the watch was; after a failure, a new watch
    (which lists again; first-seen times are kept)."""
    w = watch.Watch()
    while not stop.is_set():
        try:
            for event in w.stream(list_fn, label_selector=selector,
                                  resource_version=w.resource_version, timeout_seconds=60):
                handle(event["object"])
        except (ApiException, urllib3.exceptions.HTTPError):
            if stop.is_set():
                return
            w = watch.Watch()


def watch_east(kubeconfig: Path, seen: Seen, stop: threading.Event) -> list[threading.Thread]:
    """Two watches on east, from now on: mirror Services and mirror EndpointSlices."""
    selector = f"{MIRRORED}=true,{CLUSTER}=west"
    api = config.new_client_from_config(str(kubeconfig))

    def service(obj: Any) -> None:
        meta = obj.metadata
        key, now = f"{meta.namespace}/{meta.name}", time.monotonic()
        with seen.lock:
            seen.mirrors.setdefault(key, now)
            rev = (meta.labels or {}).get(REVISION)
            if rev is not None:
                seen.revisions.setdefault((key, rev), now)
            seen.lock.notify_all()

    def endpoint_slice(obj: Any) -> None:
        if not obj.endpoints:
            return
        key = f"{obj.metadata.namespace}/{obj.metadata.labels[SERVICE_NAME]}"
        with seen.lock:
            seen.slices.setdefault(key, time.monotonic())
            seen.lock.notify_all()

    targets = [(client.CoreV1Api(api).list_service_for_all_namespaces, service),
               (client.DiscoveryV1Api(api).list_endpoint_slice_for_all_namespaces,
                endpoint_slice)]
    threads = [threading.Thread(target=_follow, args=(stop, fn, selector, handle), daemon=True)
               for fn, handle in targets]
    for t in threads:
        t.start()
    return threads


# -- the run ---------------------------------------------------------------------------

class West(ClusterWriter):
    """Writes exported Services to west from many threads."""

    def create(self, ns: str, name: str) -> float:
        self.core().create_namespaced_service(ns, {
            "metadata": {"name": name, "labels": {EXPORTED: "true"}},
            "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80}]}},
            _preload_content=False)
        return time.monotonic()

    def relabel(self, ns: str, name: str, rev: str) -> float:
        self.core().patch_namespaced_service(name, ns, {"metadata": {"labels": {
            REVISION: rev}}}, _preload_content=False)
        return time.monotonic()


def link(west: Path, east: Path, probe_port: int) -> None:
    out = subprocess.run([sys.executable, "-m", "mesh.cli", "multicluster", "link",
                          "--kubeconfig", str(west), "--cluster-name", "west",
                          "--gateway-address", "127.0.0.1", "--probe-port", str(probe_port)],
                         capture_output=True, text=True, check=True)
    secret, link_doc = yaml.safe_load_all(out.stdout)
    api = config.new_client_from_config(str(east))
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": "meshgate"}})
    core.create_namespaced_secret("meshgate", secret)
    link_doc["spec"]["probeSpec"]["period"] = "1s"
    client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, "meshgate",
                                                                 PLURAL, link_doc)
    assert base64.b64decode(secret["data"]["kubeconfig"])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q * len(ordered)) - 1))]


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    procs = Procs(tmp)
    probe = ThreadingHTTPServer(("127.0.0.1", 0), _Ready)
    threading.Thread(target=probe.serve_forever, daemon=True).start()
    stop = threading.Event()
    try:
        kubeconfigs = {}
        for name, cidr in (("west", "10.97.0.0/16"), ("east", "10.96.0.0/16")):
            start(procs, name, ["cluster", "serve", "--name", name, "--state-dir",
                                str(tmp / name), "--service-cidr", cidr], "kubeconfig: ")
            kubeconfigs[name] = tmp / name / "kubeconfig"
        west, east = kubeconfigs["west"], kubeconfigs["east"]
        install_crds(config.new_client_from_config(str(east)))
        link(west, east, probe.server_address[1])
        controller = start(procs, "mirror", ["mirror", "run", "--kubeconfig", str(east),
                                             "--link", "west", "--metrics-listen",
                                             "127.0.0.1:0"], "metrics at http://")
        seen = Seen()
        watch_east(east, seen, stop)
        writer = West(west)
        names = [(f"bench-{i // PER_NAMESPACE:03d}", f"svc-{i:05d}")
                 for i in range(args.services)]
        core = writer.core()
        for ns in sorted({ns for ns, _ in names}):
            core.create_namespace({"metadata": {"name": ns}}, _preload_content=False)

        # 1. convergence
        print(f"creating {args.services} exported services in west ...", flush=True)
        t0 = time.monotonic()
        with ThreadPoolExecutor(THREADS) as pool:
            created = dict(zip(names, pool.map(lambda k: writer.create(*k), names),
                               strict=True))
        t_created = time.monotonic()
        keys = {(ns, name): f"{ns}/{name}-west" for ns, name in names}
        seen.wait("every mirror", lambda: all(k in seen.mirrors for k in keys.values()),
                  TIMEOUT)
        seen.wait("every mirror's EndpointSlice",
                  lambda: all(k in seen.slices for k in keys.values()), TIMEOUT)
        t_mirrors = max(seen.mirrors[k] for k in keys.values())
        t_slices = max(seen.slices[k] for k in keys.values())
        each = [(seen.mirrors[keys[k]] - created[k]) * 1000 for k in names]

        # 2. one change at a time
        print(f"changing {args.changes} services one at a time ...", flush=True)
        one: list[float] = []
        for i in range(args.changes):
            k = names[i * len(names) // args.changes]
            rev = f"one-{i}"
            written = writer.relabel(*k, rev)
            seen.wait(f"change {rev}", lambda k=k, rev=rev: (keys[k], rev) in seen.revisions,
                      CHANGE_TIMEOUT)
            one.append((seen.revisions[(keys[k], rev)] - written) * 1000)

        # 3. a burst
        print(f"changing all {args.services} at once ...", flush=True)
        t_burst = time.monotonic()
        with ThreadPoolExecutor(THREADS) as pool:
            burst_written = dict(zip(names, pool.map(lambda k: writer.relabel(*k, "burst"),
                                                     names), strict=True))
        seen.wait("the burst", lambda: all((k, "burst") in seen.revisions
                                           for k in keys.values()), TIMEOUT)
        burst = [(seen.revisions[(keys[k], "burst")] - burst_written[k]) * 1000 for k in names]
        t_burst_done = max(seen.revisions[(k, "burst")] for k in keys.values())
        return {
            "services": args.services,
            "create_s": t_created - t0,
            "mirrors_s": t_mirrors - t0,
            "slices_s": t_slices - t0,
            "create_to_mirror_ms": {"p50": pct(each, 0.5), "p99": pct(each, 0.99)},
            "changes": args.changes,
            "update_ms": {"p50": pct(one, 0.5), "p99": pct(one, 0.99),
                          "mean": statistics.fmean(one)},
            "burst_s": t_burst_done - t_burst,
            "burst_update_ms": {"p50": pct(burst, 0.5), "p99": pct(burst, 0.99)},
            "controller_rss_mib": (rss_kb(controller.pid) or 0) / 1024,
        }
    finally:
        stop.set()
        procs.stop_all()
        probe.shutdown()


def report(r: dict[str, Any]) -> None:
    n = r["services"]
    rows = [
        (f"create {n:,} exported services in west (16 writers)", f"{r['create_s']:.1f} s"),
        (f"first create -> all {n:,} mirrors in east", f"{r['mirrors_s']:.1f} s"),
        ("first create -> all their EndpointSlices", f"{r['slices_s']:.1f} s"),
        ("one service: create -> mirror, p50 / p99",
         f"{r['create_to_mirror_ms']['p50']:.0f} / {r['create_to_mirror_ms']['p99']:.0f} ms"),
        (f"update propagation, {r['changes']} one at a time, p50 / p99",
         f"{r['update_ms']['p50']:.0f} / {r['update_ms']['p99']:.0f} ms"),
        (f"relabel all {n:,} at once -> all mirrors updated", f"{r['burst_s']:.1f} s"),
        ("  per service in that burst, p50 / p99",
         f"{r['burst_update_ms']['p50']:.0f} / {r['burst_update_ms']['p99']:.0f} ms"),
        ("mirror controller RSS at the end", f"{r['controller_rss_mib']:.0f} MiB"),
    ]
    width = max(len(a) for a, _ in rows)
    print("\nmirror controller (two embedded API servers on loopback)")
    for what, value in rows:
        print(f"  {what.ljust(width)}  {value:>14}")


def bench_dataplane(args: argparse.Namespace) -> gatewaypath.Result:
    ensure_packages(("wrk", "nginx"))
    raise_nofile()
    root = Path(tempfile.mkdtemp(prefix="mc-bench-dataplane-"))
    print(f"gateway path vs same-cluster: {args.duration:g} s per run, fixed load "
          f"{args.rate:g} req/s offered ...", flush=True)
    try:
        return gatewaypath.bench(root, Procs(root), duration=args.duration, rate=args.rate)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds per wrk run (default 10)")
    parser.add_argument("--rate", type=float, default=1000.0,
                        help="offered req/s of the fixed-load runs (default 1000)")
    parser.add_argument("--skip-mirror", action="store_true",
                        help="leave out mirror convergence")
    parser.add_argument("--skip-dataplane", action="store_true",
                        help="leave out the gateway path against the same-cluster path")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    result: dict[str, Any] = {}
    if not args.skip_mirror:
        with tempfile.TemporaryDirectory(prefix="mc-bench-") as tmp:
            result["mirror"] = measure(args, Path(tmp))
        report(result["mirror"])
    if not args.skip_dataplane:
        dataplane = bench_dataplane(args)
        result["dataplane"] = gatewaypath.to_json(dataplane, duration=args.duration,
                                                     rate=args.rate)
        print("\ngateway path vs same-cluster path (nginx behind a target proxy, "
              "127.0.0.1)")
        gatewaypath.print_table(dataplane)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
