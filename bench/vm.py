"""Benchmark VM mesh expansion: how soon a joining VM is in the mesh, what the path
through the gateway costs against pod to pod, and what the agent costs the VM.

One multicluster cluster (`meshgate cluster up --multicluster` on a WAN of its own)
with the `web` pod and the `client` pod, and one VM on that WAN running its own app
on loopback, as tests/e2e/test_vm.py sets them up, except that the apps (web's and
the VM's) are nginx as bench/dataplane.py runs it, not the demo app, which answers
no faster than every ~40 ms (see `Rig.nginx` in bench/vmrig.py).
Everything runs in namespaces that this run makes and removes on exit, on failure
and on Ctrl-C or SIGTERM alike; the host's namespace is never changed.

1. Time to first call. `meshgate vm join --foreground` starts (with a token minted
   just before, not counted) and, from then on, a curl is started every
   ``--poll`` seconds on each path until one answers 200:
   - join_to_vm_call_ms: the VM calls http://web.default.svc.cluster.local/
     (VM proxy -> WAN -> gateway -> web's proxy -> app);
   - join_to_pod_call_ms: the client pod calls http://legacy.default.svc.cluster.local/
     (client's proxy -> node -> WAN -> VM proxy -> the VM's app);
   - join_to_joined_ms: `vm join` prints ``joined:`` (its first Ready heartbeat).
   The time is when the first successful curl returned. Then the agent stops, `vm
   leave` undoes the join, legacy's endpoint turns not ready, and it starts again
   with a new token: ``--joins`` times; min / median / max.
2. Latency and throughput, on the last join: ``wrk -t1 -c<connections>
   -d<duration>s`` from inside the VM to web, from inside the client pod to the
   same URL (two proxies, no gateway), and from the client pod to legacy (the
   VM); req/s, p50, p99 and the ratios to pod -> web.
3. What the agent costs: the VmRSS of the agent (the `vm join` process) and its
   proxy child, and their CPU (utime + stime, as % of one core) over ``--idle``
   seconds without traffic and over ``--load-seconds`` at a fixed ``--rate`` of
   VM -> web requests (paced over 4 keep-alive connections by a Python client in
   the VM), with CPU microseconds per request; RSS again after the wrk runs.

    .venv/bin/python bench/vm.py [--joins 3] [--duration 10] [--connections 8]
        [--rate 200] [--json FILE]

The agent's heartbeat is the `vm join` default unless ``--heartbeat`` is given.
Missing Debian packages (wrk, nginx) are installed with apt-get; curl must be there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataplane import BenchError, WrkResult, cpu_seconds, ensure_packages, parse_wrk, rss_kb
from vmrig import (
    CLUSTER,
    LEGACY,
    VM,
    WAN,
    WEB,
    Rig,
    loadavg,
    ours,
    preflight,
    run_dir,
    sigterm_as_interrupt,
    uninterrupted,
    wait_until,
)

from localcluster import vms

FIRST_CALL_TIMEOUT = 120.0
IN_FLIGHT = 8
"""Curls of one path running at once while polling: a lookup that hangs (the VM's
own resolvers before the join) does not hold up the next attempt."""

PACED = """
import http.client, json, sys, threading, time
host, rate, seconds, start, conns = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), \\
    float(sys.argv[4]), int(sys.argv[5])
total = {"ok": 0, "errors": 0, "late": 0}
lock = threading.Lock()

def run(first):
    conn = http.client.HTTPConnection(host, 80, timeout=5)
    ok = errors = late = 0
    for i in range(first, int(rate * seconds), conns):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        elif delay < -0.01:
            late += 1
        try:
            conn.request("GET", "/")
            r = conn.getresponse()
            r.read()
            ok += r.status == 200
            errors += r.status != 200
        except (OSError, http.client.HTTPException):
            errors += 1
            conn.close()
            conn = http.client.HTTPConnection(host, 80, timeout=5)
    with lock:
        total["ok"] += ok
        total["errors"] += errors
        total["late"] += late

threads = [threading.Thread(target=run, args=(k,)) for k in range(conns)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(total))
"""
"""GET / on argv[1] at argv[2] req/s for argv[3] s from monotonic time argv[4] (the clock
is the machine's, the same in every namespace), request i on keep-alive connection
i mod argv[5]; prints the counts as JSON (late: sent more than 10 ms after its time)."""
PACED_CONNECTIONS = 4


# -- 1. time to first call --------------------------------------------------------------

def curl(url: str) -> list[str]:
    return ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2", url]


@dataclass
class Probe:
    """One path polled until a call succeeds: a new attempt every interval, up to
    IN_FLIGHT at once, each a curl bounded by its --max-time."""

    name: str
    call: Callable[[], subprocess.CompletedProcess[str]]
    pool: ThreadPoolExecutor = field(init=False)
    running: list[Future[float | None]] = field(default_factory=list)
    done_ms: float | None = None

    def __post_init__(self) -> None:
        self.pool = ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix=self.name)

    def attempt(self, since: float) -> float | None:
        """ms from `since` to this call's 200, or None."""
        try:
            proc = self.call()
        except subprocess.TimeoutExpired:
            return None
        ok = proc.returncode == 0 and proc.stdout.strip() == "200"
        return (time.monotonic() - since) * 1000 if ok else None

    def launch(self, since: float) -> None:
        if self.done_ms is None and len(self.running) < IN_FLIGHT:
            self.running.append(self.pool.submit(self.attempt, since))

    def reap(self) -> None:
        for future in [f for f in self.running if f.done()]:
            self.running.remove(future)
            ms = future.result()
            if ms is not None and (self.done_ms is None or ms < self.done_ms):
                self.done_ms = ms

    def close(self) -> None:
        """Wait for the attempts still running (each ends within curl's --max-time)."""
        self.pool.shutdown(wait=True, cancel_futures=True)


def time_one_join(rig: Rig, interval: float, heartbeat: str | None) -> dict[str, float]:
    line = rig.token()
    probes = [Probe("vm_call", lambda: rig.in_vm(curl(WEB), timeout=10)),
              Probe("pod_call", lambda: rig.in_client(curl(LEGACY), timeout=10))]
    joined_ms: float | None = None
    started = time.monotonic()
    agent = rig.start_join(line, heartbeat)
    next_launch = started
    try:
        while any(p.done_ms is None for p in probes) or joined_ms is None:
            now = time.monotonic()
            if now - started > FIRST_CALL_TIMEOUT:
                missing = [p.name for p in probes if p.done_ms is None]
                raise BenchError(f"no successful {', '.join(missing) or 'joined:'} within "
                                 f"{FIRST_CALL_TIMEOUT:g} s of vm join:\n{rig.agent_output()}")
            if agent.poll() is not None:
                raise BenchError(f"vm join exited {agent.returncode}:\n{rig.agent_output()}")
            if now >= next_launch:
                for p in probes:
                    p.launch(started)
                if joined_ms is None and "joined:" in rig.agent_output():
                    joined_ms = (now - started) * 1000
                next_launch += interval
            for p in probes:
                p.reap()
            time.sleep(0.005)
    finally:
        for p in probes:
            p.close()
    assert probes[0].done_ms is not None and probes[1].done_ms is not None
    return {"join_to_vm_call_ms": round(probes[0].done_ms, 1),
            "join_to_pod_call_ms": round(probes[1].done_ms, 1),
            "join_to_joined_ms": round(joined_ms, 1)}


def time_joins(rig: Rig, args: argparse.Namespace) -> list[dict[str, float]]:
    runs = []
    for i in range(args.joins):
        if i:
            rig.leave()
            wait_until(lambda: not rig.ready_endpoints(), 60,
                       "legacy's endpoint to turn not ready after vm leave")
        run = time_one_join(rig, args.poll, args.heartbeat)
        print(f"  join {i + 1}: VM -> web {run['join_to_vm_call_ms']:.0f} ms, client pod -> "
              f"VM {run['join_to_pod_call_ms']:.0f} ms, joined: printed "
              f"{run['join_to_joined_ms']:.0f} ms", flush=True)
        runs.append(run)
    return runs


# -- 2. wrk -----------------------------------------------------------------------------

PATHS = {"vm": ("VM -> web", "VM proxy, WAN, gateway, web's proxy", WEB),
         "pod": ("pod -> web", "client's proxy, web's proxy", WEB),
         "pod_to_vm": ("pod -> VM", "client's proxy, node, WAN, VM proxy", LEGACY)}
"""key -> (path, what it crosses, URL); the key prefixes the figures' names."""


def run_wrk(rig: Rig, key: str, connections: int, duration: float) -> WrkResult:
    url = PATHS[key][2]
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
            url]
    run = rig.in_vm if key == "vm" else rig.in_client
    proc = run(argv, timeout=duration + 30)
    if proc.returncode != 0:
        raise BenchError(f"wrk to {url} ({key}) exited {proc.returncode}:\n{proc.stdout}"
                         f"{proc.stderr}")
    return parse_wrk(proc.stdout)


def bench_paths(rig: Rig, args: argparse.Namespace) -> dict[str, WrkResult]:
    results = {}
    for key in PATHS:
        if args.warmup > 0:
            run_wrk(rig, key, args.connections, args.warmup)
        r = results[key] = run_wrk(rig, key, args.connections, args.duration)
        print(f"  {PATHS[key][0]:10} {r.rps:8.0f} req/s  p50 {r.p50_ms:.3f} ms  "
              f"p99 {r.p99_ms:.3f} ms" + (f"  ({r.errors} errors)" if r.errors else ""),
              flush=True)
    return results


# -- 3. what the agent costs ------------------------------------------------------------

def proxy_child(agent: int) -> int:
    """The pid of the agent's `meshgate proxy run` child."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if ppid == agent and b"proxy" in argv and b"run" in argv:
                return int(entry.name)
    raise BenchError(f"the agent (pid {agent}) has no `meshgate proxy run` child")


@dataclass
class Cost:
    """The agent's and its proxy's memory and CPU over one window."""

    what: str
    seconds: float
    agent_rss_kb: int | None
    proxy_rss_kb: int | None
    agent_cpu_pct: float | None = None
    proxy_cpu_pct: float | None = None
    requests: int = 0
    errors: int = 0
    cpu_us_per_req: float | None = None


def cost(what: str, pids: tuple[int, int], work: Callable[[], tuple[int, int]], *,
         start: float | None = None) -> Cost:
    """Run `work` (-> requests, errors); the agent's and the proxy's CPU from `start`
    (now if None) to its end, and their RSS then."""
    if start is not None:
        time.sleep(max(0.0, start - time.monotonic()))
    t0 = time.monotonic()
    before = [cpu_seconds(p) for p in pids]
    requests, errors = work()
    wall = time.monotonic() - t0
    after = [cpu_seconds(p) for p in pids]
    used = [None if b is None or a is None else a - b
            for b, a in zip(before, after, strict=True)]
    pct = [None if u is None else round(u / wall * 100, 2) for u in used]
    total = sum(u for u in used if u is not None)
    return Cost(what, round(wall, 2), rss_kb(pids[0]), rss_kb(pids[1]), pct[0], pct[1],
                requests, errors,
                round(total * 1e6 / requests, 1) if requests and None not in used else None)


def bench_cost(rig: Rig, args: argparse.Namespace) -> list[Cost]:
    assert rig.agent is not None
    pids = (rig.agent.pid, proxy_child(rig.agent.pid))
    time.sleep(args.settle)

    def idle() -> tuple[int, int]:
        time.sleep(args.idle)
        return 0, 0

    costs = [cost(f"idle {args.idle:g} s", pids, idle)]
    # The client starts now and waits for `start`, so that its interpreter's start-up
    # is out of the window.
    start = time.monotonic() + 1.0
    client = subprocess.Popen(vms.exec_argv(VM, [
        sys.executable, "-c", PACED, WEB.split("/")[2], str(args.rate),
        str(args.load_seconds), str(start), str(PACED_CONNECTIONS)]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def paced() -> tuple[int, int]:
        out, err = client.communicate(timeout=args.load_seconds + 30)
        if client.returncode != 0:
            raise BenchError(f"the paced client exited {client.returncode}: {err}")
        counts = json.loads(out)
        if counts["late"] > args.rate * args.load_seconds / 10:
            print(f"  note: {counts['late']} requests left late (the rate is not held)")
        return int(counts["ok"]), int(counts["errors"])

    try:
        costs.append(cost(f"{args.rate:g} req/s VM -> web, {args.load_seconds:g} s", pids,
                          paced, start=start))
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    return costs


def rss_now(rig: Rig, what: str) -> Cost:
    assert rig.agent is not None
    agent = rig.agent.pid
    return Cost(what, 0.0, rss_kb(agent), rss_kb(proxy_child(agent)))


# -- reporting --------------------------------------------------------------------------

JOIN_FIGURES = {"join_to_vm_call_ms": "VM -> web answers 200",
                "join_to_pod_call_ms": "client pod -> legacy (the VM) answers 200",
                "join_to_joined_ms": "`vm join` prints joined:"}


def figures(joins: list[dict[str, float]], paths: dict[str, WrkResult],
            costs: list[Cost], after_wrk: Cost) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in JOIN_FIGURES:
        values = [j[name] for j in joins]
        out[name] = round(statistics.median(values), 1)
        out[f"{name}_min"], out[f"{name}_max"] = min(values), max(values)
    for key, r in paths.items():
        out |= {f"{key}_rps": r.rps, f"{key}_p50_ms": r.p50_ms, f"{key}_p99_ms": r.p99_ms,
                f"{key}_requests": r.requests, f"{key}_errors": r.errors}
    pod = paths["pod"]
    for key in ("vm", "pod_to_vm"):
        r = paths[key]
        out[f"{key}_over_pod_rps"] = round(r.rps / pod.rps, 3) if pod.rps else None
        out[f"{key}_over_pod_p50"] = round(r.p50_ms / pod.p50_ms, 3) if pod.p50_ms else None
        out[f"{key}_over_pod_p99"] = round(r.p99_ms / pod.p99_ms, 3) if pod.p99_ms else None
    idle, load = costs
    out |= {"agent_rss_kb": idle.agent_rss_kb, "proxy_rss_kb": idle.proxy_rss_kb,
            "total_rss_kb": _sum(idle.agent_rss_kb, idle.proxy_rss_kb),
            "agent_cpu_idle_pct": idle.agent_cpu_pct, "proxy_cpu_idle_pct": idle.proxy_cpu_pct,
            "agent_rss_load_kb": load.agent_rss_kb, "proxy_rss_load_kb": load.proxy_rss_kb,
            "agent_cpu_pct": load.agent_cpu_pct, "proxy_cpu_pct": load.proxy_cpu_pct,
            "load_requests": load.requests, "load_errors": load.errors,
            "cpu_us_per_req": load.cpu_us_per_req,
            "agent_rss_after_wrk_kb": after_wrk.agent_rss_kb,
            "proxy_rss_after_wrk_kb": after_wrk.proxy_rss_kb}
    return out


def _sum(*values: int | None) -> int | None:
    return None if None in values else sum(v for v in values if v is not None)


def _fmt(value: float | int | None, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


def report(f: dict[str, Any], args: argparse.Namespace, paths: dict[str, WrkResult],
           costs: list[Cost]) -> None:
    print(f"\ntime to first call from the start of `vm join` ({args.joins} joins, a new "
          f"attempt every {args.poll * 1000:g} ms)\n")
    table(("until", "min ms", "median ms", "max ms"),
          [(what, f"{f[f'{k}_min']:.0f}", f"{f[k]:.0f}", f"{f[f'{k}_max']:.0f}")
           for k, what in JOIN_FIGURES.items()])
    print(f"\nwrk -t1 -c{args.connections} {args.duration:g} s per path (nginx behind "
          "each)\n")
    table(("path", "through", "req/s", "p50 ms", "p99 ms", "errors"),
          [(PATHS[k][0], PATHS[k][1], f"{r.rps:.0f}", f"{r.p50_ms:.3f}", f"{r.p99_ms:.3f}",
            str(r.errors)) for k, r in paths.items()])
    print()
    for key in ("vm", "pod_to_vm"):
        print(f"  {PATHS[key][0]} / pod -> web: req/s x{_fmt(f[f'{key}_over_pod_rps'], '.2f')}"
              f", p50 x{_fmt(f[f'{key}_over_pod_p50'], '.2f')}, p99 "
              f"x{_fmt(f[f'{key}_over_pod_p99'], '.2f')}")
    print("\nthe VM's agent and its proxy (CPU: % of one core; per request: both)\n")
    rows = [(c.what, _fmt(c.agent_rss_kb), _fmt(c.proxy_rss_kb),
             _fmt(_sum(c.agent_rss_kb, c.proxy_rss_kb)), _fmt(c.agent_cpu_pct, ".2f"),
             _fmt(c.proxy_cpu_pct, ".2f"), _fmt(c.cpu_us_per_req, ".0f"),
             f"{c.requests} ({c.errors} errors)" if c.requests or c.errors else "-")
            for c in costs]
    rows.append(("after the wrk runs", _fmt(f["agent_rss_after_wrk_kb"]),
                 _fmt(f["proxy_rss_after_wrk_kb"]),
                 _fmt(_sum(f["agent_rss_after_wrk_kb"], f["proxy_rss_after_wrk_kb"])),
                 "-", "-", "-", "-"))
    table(("window", "agent RSS KB", "proxy RSS KB", "sum KB", "agent CPU %", "proxy CPU %",
           "CPU us/req", "requests"), rows)


# -- main -------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--joins", type=int, default=3, help="joins timed (default 3)")
    parser.add_argument("--poll", type=float, default=0.1,
                        help="seconds between attempts while timing a join (default 0.1)")
    parser.add_argument("--heartbeat", help="`vm join --heartbeat` (default: join's own)")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds per wrk run (default 10)")
    parser.add_argument("--connections", type=int, default=8,
                        help="wrk connections (default 8)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="seconds of unreported wrk load before each path (0: none)")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds after the last join before the idle window (default 2)")
    parser.add_argument("--idle", type=float, default=10.0,
                        help="seconds of the idle window (default 10)")
    parser.add_argument("--rate", type=float, default=200.0,
                        help="req/s of the fixed load, VM -> web (default 200)")
    parser.add_argument("--load-seconds", type=float, default=10.0,
                        help="seconds of the fixed load (default 10)")
    parser.add_argument("--json", type=Path, help="write every figure to FILE")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args(argv)
    if min(args.joins, args.connections) < 1 or min(args.poll, args.duration, args.idle,
                                                    args.rate, args.load_seconds) <= 0:
        parser.error("--joins, --connections, --poll, --duration, --idle, --rate and "
                     "--load-seconds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not preflight("bench/vm.py", ours(), CLUSTER):
        return 2
    if shutil.which("curl") is None:
        print("bench/vm.py calls with curl: install it (apt-get install curl)", file=sys.stderr)
        return 2
    ensure_packages(("wrk", "nginx"))
    base = run_dir("meshgate-vmbench-")
    rig = Rig(base)
    owner = os.getpid()
    print(f"vm bench: cluster {CLUSTER} + VM {VM} on WAN {WAN}; {args.joins} joins, wrk "
          f"-c{args.connections} {args.duration:g} s, {args.rate:g} req/s for "
          f"{args.load_seconds:g} s; temp dir {base}", flush=True)
    load_start = loadavg()
    print(f"load average at start: {load_start} (other work on the machine skews the "
          "figures)", flush=True)
    try:
        with sigterm_as_interrupt(owner):
            t0 = time.monotonic()
            rig.up()
            print(f"cluster, pods and VM up in {time.monotonic() - t0:.1f} s", flush=True)
            print("time to first call:", flush=True)
            joins = time_joins(rig, args)
            print("agent cost:", flush=True)
            costs = bench_cost(rig, args)
            print("wrk:", flush=True)
            paths = bench_paths(rig, args)
            after_wrk = rss_now(rig, "after the wrk runs")
    except KeyboardInterrupt:
        print("interrupted; removing the cluster and the VM", file=sys.stderr)
        return 130
    except (BenchError, vms.VmError, subprocess.TimeoutExpired) as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        if os.getpid() != owner:  # a forked helper that got this far: not its to undo
            os._exit(1)
        with uninterrupted():
            failures = rig.down()
        for failure in failures:
            print(f"cleanup: {failure}", file=sys.stderr)
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    found = figures(joins, paths, costs, after_wrk)
    found |= {"joins": joins, "load_average_start": load_start,
              "load_average_end": loadavg(), "connections": args.connections,
              "duration_s": args.duration, "rate": args.rate, "load_seconds": args.load_seconds,
              "idle_s": args.idle, "heartbeat": args.heartbeat or "vm join's default"}
    print(f"\nload average at end: {loadavg()}")
    report(found, args, paths, costs)
    if args.json:
        args.json.write_text(json.dumps(found, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
