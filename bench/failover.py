"""Benchmark failover: how soon a client's proxy moves to the next priority group when
the serving one fails, what the move costs its requests, and how soon traffic returns.

Three multicluster clusters on a WAN of their own (bench/failoverrig.py): east
serves ``web`` locally and fails over to west, then central (the Service's
``failover.meshgate.io/clusters``, with ``failover.meshgate.io/policy:
"failback=<--failback>"``). A client in east's ``client`` pod sends a bounded,
steady load through its proxy to http://web.default.svc.cluster.local/:
``--rate`` GETs and ``--post-rate`` POSTs a second, paced on a schedule (open
loop: a request's latency counts from when it was due), each recorded with its
time, status and origin (the cluster whose pod answered). Then, one at a time,
each fault, held ``--duration`` seconds, then undone:

- pods killed: east's web pods are stopped (SIGTERM to each pod, as a kubelet stops
  one) while east serves (-> west), then started again (recovery: the first is Ready);
- gateway killed: with east's web pods stopped again so that west serves, west's
  gateway process is killed (SIGKILL; -> central), then started again by `cluster up`
  (recovery: `cluster up` returned, the gateway listening);
- partition: west is cut off the WAN while it serves (-> central), then healed;
- 5 % loss and 30 ms latency on west's WAN link while it serves (tc netem,
  localcluster.wanlink.set_link), then cleared; on a kernel without netem these
  are reported as not measured.

Per fault: ``failover_s``, from the fault to the first answer from the next group;
``failback_s``, from the recovery to the first answer from the better group once
traffic is back there for good (the proxy's probes of it, answered before, do not
count; it includes the failback hold-down by design; ``hold_down_s`` is the one the
client's proxy logged for that recovery, which doubles for a group that falls
again within a minute); ``failed_idempotent`` (GETs) and ``failed_other`` (POSTs):
requests due from the fault until traffic is back and steady that did not answer
200; ``p99_ms``: p99 latency of the requests due from the fault to 2 s after the
failover (to the end of the fault when traffic did not move). Goals: failover
within 1 s, no failed idempotent request.

    .venv/bin/python bench/failover.py [--duration 8] [--rate 40] [--post-rate 4]
        [--failback 3s] [--json FILE] [--keep]

Everything runs in namespaces that this run makes and removes on exit, on failure
and on Ctrl-C or SIGTERM alike; the host's namespace is never changed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from dataplane import BenchError
from failoverrig import CENTRAL, CLIENT, EAST, WAN, WEB_HOST, WEB_PODS, WEST, Rig, ours
from vmrig import loadavg, preflight, run_dir, sigterm_as_interrupt, uninterrupted, wait_until

from localcluster import netns, wanlink
from localcluster.pods import in_pod
from localcluster.up import ClusterError, find
from mesh.errors import MeshError

NO_NETEM = "not measured: the kernel has no netem (CONFIG_NET_SCH_NETEM)"
GOAL_FAILOVER_S = 1.0
WINDOW_AFTER_FAILOVER_S = 2.0
STEADY = 10
"""Answers in a row from one group that say it serves."""
WORKERS = 64
REQUEST_TIMEOUT_S = 15.0
"""Longer than the proxy's own request timeout (10 s), so that its answer is seen."""

LOAD = """
import http.client, json, queue, sys, threading, time
host, get_rate, post_rate = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
workers, timeout = int(sys.argv[4]), float(sys.argv[5])
rate = get_rate + post_rate
every = round(rate / post_rate) if post_rate > 0 else 0
jobs, lock, stopping = queue.Queue(), threading.Lock(), threading.Event()

def work():
    conn = None
    while (job := jobs.get()) is not None:
        i, method, due = job
        conn = conn or http.client.HTTPConnection(host, 80, timeout=timeout)
        rec = {"m": method, "t": due, "w": round(time.monotonic() - due, 4)}
        try:
            conn.request(method, "/", body=b"x" * 64 if method == "POST" else None)
            r = conn.getresponse()
            body = r.read().decode(errors="replace").split()
            rec["s"] = r.status
            rec["o"] = body[-1] if r.status == 200 and body else ""
            if r.getheader("l5d-proxy-error"):
                rec["e"] = r.getheader("l5d-proxy-error")
            if r.will_close:
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException) as e:
            rec["s"], rec["e"] = 0, f"{type(e).__name__}: {e}"
            conn.close()
            conn = None
        rec["end"] = time.monotonic()
        with lock:
            sys.stdout.write(json.dumps(rec) + "\\n")
            sys.stdout.flush()

threads = [threading.Thread(target=work) for _ in range(workers)]
for t in threads:
    t.start()
threading.Thread(target=lambda: (sys.stdin.read(), stopping.set()), daemon=True).start()
start, i = time.monotonic() + 0.2, 0
while not stopping.wait(max(0.0, start + i / rate - time.monotonic())):
    jobs.put((i, "POST" if every and i % every == every - 1 else "GET", start + i / rate))
    i += 1
for t in threads:
    jobs.put(None)
for t in threads:
    t.join()
"""
"""argv: host, GET/s, POST/s, workers, timeout. Request i is due at start + i/rate
(every rate/post_rate-th a POST) and is sent by the next free worker, each with its
own keep-alive connection; one JSON line per request (t: when due, w: how late it
left, s: status or 0, o: the pod that answered, e: the error or l5d-proxy-error, end:
when it ended; the clock is the machine's monotonic one, the same in every
namespace). It ends when its stdin closes, once the requests sent are done."""

ORIGIN = {pod: cluster for cluster, pods in WEB_PODS.items() for pod in pods}


@dataclass(frozen=True)
class Request:
    method: str
    due: float
    end: float
    status: int
    origin: str
    """The cluster whose pod answered ('' if none did)."""
    error: str

    @property
    def ok(self) -> bool:
        return self.status == 200 and bool(self.origin)

    @property
    def latency_ms(self) -> float:
        return (self.end - self.due) * 1000


@dataclass
class Requests:
    """The load's output file, read as it grows."""

    path: Path
    done: list[Request] = field(default_factory=list)
    _offset: int = 0

    def poll(self) -> list[Request]:
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.splitlines():
            r = json.loads(line)
            self.done.append(Request(r["m"], r["t"], r["end"], r["s"],
                                     ORIGIN.get(r.get("o", ""), ""), r.get("e", "")))
        return self.done

    def first_answer(self, origin: str, after: float) -> float | None:
        """When the first answer from `origin` that ended after `after` ended."""
        ends = [r.end for r in self.poll() if r.ok and r.origin == origin and r.end > after]
        return min(ends) if ends else None

    def returned(self, origin: str, after: float, until: float) -> float | None:
        """When traffic came back to `origin`: the first of its answers, ended between
        `after` and `until`, after which no other group answered. (The proxy's probes
        of a group that is not serving are answered by it too, before it serves.)"""
        answers = [r for r in self.poll() if r.ok and after < r.end <= until]
        last_other = max((r.end for r in answers if r.origin != origin), default=after)
        back = [r.end for r in answers if r.origin == origin and r.end > last_other]
        return min(back) if back else None

    def serving(self, origin: str, since: float) -> bool:
        """The last STEADY answers, all ended after `since`, all from `origin`."""
        last = [r for r in self.poll() if r.end > since][-STEADY:]
        return len(last) == STEADY and all(r.ok and r.origin == origin for r in last)


# -- faults -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Fault:
    name: str
    serving: str
    """The group serving when the fault comes, and to which traffic should return."""
    next: str
    inject: Callable[[], None]
    recover: Callable[[], float | None]
    """Undo the fault; when it was undone (None: when `recover` returned)."""
    setup: Callable[[], None] | None = None
    needs_netem: bool = False


@dataclass
class Result:
    fault: str
    failover_s: float | None = None
    failback_s: float | None = None
    hold_down_s: float | None = None
    failed_idempotent: int | None = None
    failed_other: int | None = None
    p99_ms: float | None = None
    requests: int | None = None
    moved_to: str | None = None
    proxy_causes: list[str] = field(default_factory=list)
    """What the client's proxy logged as each move's cause."""
    errors: dict[str, int] = field(default_factory=dict)
    """The failed requests' errors (the proxy's l5d-proxy-error, or the client's)."""
    skipped: str | None = None


def faults(rig: Rig) -> list[Fault]:
    def netem(**values: float) -> Callable[[], None]:
        return lambda: rig.set_link(WEST, **values)

    def undone(action: Callable[[], None]) -> Callable[[], float | None]:
        def recover() -> float | None:
            action()
            return None
        return recover

    return [
        Fault("pods killed", EAST, WEST, lambda: rig.stop_web(EAST),
              lambda: rig.start_web(EAST)),
        Fault("gateway killed", WEST, CENTRAL, lambda: rig.kill_gateway(WEST),
              undone(lambda: rig.cluster_up(WEST)), setup=lambda: rig.stop_web(EAST)),
        Fault("partition", WEST, CENTRAL, lambda: rig.partition(WEST),
              undone(lambda: rig.heal(WEST))),
        Fault("5 % loss", WEST, CENTRAL, netem(loss_pct=5.0), undone(netem(loss_pct=0.0)),
              needs_netem=True),
        Fault("30 ms WAN latency", WEST, CENTRAL, netem(delay_ms=30.0),
              undone(netem(delay_ms=0.0)), needs_netem=True),
    ]


_RECOVERING = re.compile(r"failover group recovering service=\S+ group=(\S+) "
                         r"hold_down=([\d.]+)s")
_MOVED = re.compile(r"failover service=\S+ from=(\S+) to=(\S+) direction=(\S+) cause=(\S+)")


def proxy_log_since(rig: Rig, offset: int) -> str:
    with open(rig.client_proxy_log(), "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def group_names(cluster: str) -> tuple[str, ...]:
    """What the proxy may call the group of `cluster`'s endpoints."""
    return (cluster, "local") if cluster == EAST else (cluster,)


def run_fault(rig: Rig, requests: Requests, fault: Fault, args: argparse.Namespace
              ) -> tuple[Result, tuple[float, float]]:
    """Inject, hold, recover, wait until traffic is back and steady; the figures and the
    window (fault, steady again) they were taken over."""
    print(f"{fault.name}:", flush=True)
    if fault.setup is not None:
        fault.setup()
    since = time.monotonic()
    wait_until(lambda: requests.serving(fault.serving, since), 90,
               f"{fault.serving} to serve before the fault", interval=0.2)
    log_offset = rig.client_proxy_log().stat().st_size
    fault_at = time.monotonic()
    try:
        fault.inject()
    except wanlink.NetemUnavailableError:
        if not fault.needs_netem:
            raise
        print(f"  {NO_NETEM}", flush=True)
        return Result(fault.name, skipped=NO_NETEM), (fault_at, fault_at)
    time.sleep(max(0.0, fault_at + args.duration - time.monotonic()))
    moved_at = requests.first_answer(fault.next, fault_at)
    recovered = fault.recover()
    recovered_at = recovered if recovered is not None else time.monotonic()
    wait_until(lambda: requests.serving(fault.serving, recovered_at), args.failback_timeout,
               f"traffic to return to {fault.serving} after the recovery", interval=0.2)
    ended_at = time.monotonic()
    back_at = (None if moved_at is None else
               requests.returned(fault.serving, recovered_at, ended_at))
    result = figures(fault, requests.poll(), fault_at, moved_at, recovered_at, back_at,
                     ended_at, args.duration)
    log = proxy_log_since(rig, log_offset)
    holds = [float(h) for g, h in _RECOVERING.findall(log) if g in group_names(fault.serving)]
    result.hold_down_s = holds[-1] if holds else None
    result.proxy_causes = [f"{frm}->{to} {direction} ({cause})"
                           for frm, to, direction, cause in _MOVED.findall(log)]
    print(f"  failover {_fmt(result.failover_s, '.3f')} s to {result.moved_to or '-'}, "
          f"failback {_fmt(result.failback_s, '.3f')} s (hold-down "
          f"{_fmt(result.hold_down_s, 'g')} s), failed {result.failed_idempotent} GET / "
          f"{result.failed_other} POST of {result.requests}, p99 {result.p99_ms:.1f} ms",
          flush=True)
    for line in result.proxy_causes:
        print(f"  proxy: {line}", flush=True)
    return result, (fault_at, ended_at)


def figures(fault: Fault, done: list[Request], fault_at: float, moved_at: float | None,
            recovered_at: float, back_at: float | None, ended_at: float,
            duration: float) -> Result:
    during = [r for r in done if fault_at <= r.due < ended_at]
    window_end = (moved_at + WINDOW_AFTER_FAILOVER_S if moved_at is not None
                  else fault_at + duration)
    latencies = sorted(r.latency_ms for r in done if fault_at <= r.due <= window_end)
    failed = [r for r in during if not r.ok]
    errors: dict[str, int] = {}
    for r in failed:
        what = f"{r.method} {r.status or 'no answer'}: {r.error or '-'}"
        errors[what] = errors.get(what, 0) + 1
    return Result(
        fault.name,
        failover_s=None if moved_at is None else round(moved_at - fault_at, 3),
        failback_s=None if back_at is None else round(back_at - recovered_at, 3),
        failed_idempotent=sum(r.method == "GET" for r in failed),
        failed_other=sum(r.method != "GET" for r in failed),
        p99_ms=round(percentile(latencies, 99), 1) if latencies else None,
        requests=len(during), moved_to=fault.next if moved_at is not None else None,
        errors=errors)


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest rank."""
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


# -- the run ----------------------------------------------------------------------------

def run(rig: Rig, args: argparse.Namespace, out: IO[bytes], err: IO[bytes],
        requests: Requests) -> tuple[list[Result], dict[str, int], str]:
    """Start the load, make each fault; the results, the failures outside the faults
    (while setting one up), and the client proxy's failover metrics."""
    rig.start_load(LOAD, [WEB_HOST, str(args.rate), str(args.post_rate), str(WORKERS),
                          str(REQUEST_TIMEOUT_S)], out, err)
    started = time.monotonic()
    wait_until(lambda: requests.serving(EAST, started), 60, f"{EAST} to serve the load",
               interval=0.2)
    results, windows = [], []
    for fault in faults(rig):
        result, window = run_fault(rig, requests, fault, args)
        results.append(result)
        windows.append(window)
    load = rig.load
    assert load is not None and load.stdin is not None
    load.stdin.close()
    load.wait(REQUEST_TIMEOUT_S + 10)
    outside: dict[str, int] = {}
    for r in requests.poll():
        if not r.ok and not any(a <= r.due < b for a, b in windows):
            what = f"{r.method} {r.status or 'no answer'}: {r.error or '-'}"
            outside[what] = outside.get(what, 0) + 1
    page = in_pod(find(EAST), "default", CLIENT, [sys.executable, "-c", METRICS]).stdout
    metrics = "\n".join(line for line in page.splitlines()
                        if line.startswith("outbound_failover_"))
    return results, outside, metrics


METRICS = ("import urllib.request; "
           "print(urllib.request.urlopen('http://127.0.0.1:4191/metrics').read().decode())")


# -- reporting --------------------------------------------------------------------------

def _fmt(value: float | int | None, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


def report(results: list[Result], args: argparse.Namespace) -> None:
    """Print the table and the goal check."""
    print(f"\n{args.rate:g} GET/s + {args.post_rate:g} POST/s from {EAST}'s client; each "
          f"fault held {args.duration:g} s; failback policy {args.failback}\n")
    rows = []
    for r in results:
        if r.skipped:
            rows.append((r.fault, r.skipped, "", "", "", "", "", ""))
            continue
        rows.append((r.fault, _fmt(r.failover_s, ".3f"), r.moved_to or "did not move",
                     _fmt(r.failback_s, ".3f"), _fmt(r.hold_down_s, "g"),
                     f"{r.failed_idempotent} / {r.failed_other}", _fmt(r.p99_ms, ".1f"),
                     str(r.requests)))
    table(("fault", "failover s", "to", "failback s", "hold-down s", "failed GET / POST",
           "p99 ms", "requests"), rows)
    missed = []
    print(f"\ngoals: failover <= {GOAL_FAILOVER_S:g} s, 0 failed idempotent requests")
    for r in results:
        if r.skipped:
            print(f"  {r.fault}: {r.skipped}")
            continue
        checks = []
        if r.moved_to is None:
            checks.append("traffic did not move")
        elif r.failover_s is not None and r.failover_s > GOAL_FAILOVER_S:
            checks.append(f"MISSED failover {r.failover_s:.3f} s > {GOAL_FAILOVER_S:g} s")
        if r.failed_idempotent:
            checks.append(f"MISSED {r.failed_idempotent} failed idempotent requests")
        if any(c.startswith("MISSED") for c in checks):
            missed.append(r.fault)
        print(f"  {r.fault}: {'; '.join(checks) or 'ok'}")
        for what, n in sorted(r.errors.items(), key=lambda kv: -kv[1]):
            print(f"    failed {n} x {what}")
    print(f"goals {'missed by: ' + ', '.join(missed) if missed else 'met'}")


# -- main -------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=8.0,
                        help="seconds each fault is held before it is undone (default 8)")
    parser.add_argument("--rate", type=float, default=40.0, help="GETs a second (default 40)")
    parser.add_argument("--post-rate", type=float, default=4.0,
                        help="POSTs a second (default 4)")
    parser.add_argument("--failback", default="3s",
                        help="east's web failover.meshgate.io/policy failback (default 3s)")
    parser.add_argument("--failback-timeout", type=float, default=120.0,
                        help="seconds to wait for traffic to return (default 120)")
    parser.add_argument("--json", type=Path, help="write one object per fault to FILE")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args(argv)
    if min(args.duration, args.rate, args.failback_timeout) <= 0 or args.post_rate < 0:
        parser.error("--duration, --rate and --failback-timeout must be positive, "
                     "--post-rate not negative")
    if args.duration < WINDOW_AFTER_FAILOVER_S + GOAL_FAILOVER_S:
        parser.error(f"--duration must be at least {WINDOW_AFTER_FAILOVER_S + 1:g} s")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not preflight("bench/failover.py", ours(), "NAME"):
        return 2
    base = run_dir("meshgate-fobench-")
    rig = Rig(base, args.failback)
    owner = os.getpid()
    print(f"failover bench: clusters {EAST}, {WEST}, {CENTRAL} on WAN {WAN}; temp dir {base}",
          flush=True)
    load_start = loadavg()
    print(f"load average at start: {load_start} (other work on the machine skews the "
          "figures)", flush=True)
    requests = Requests(base / "load.jsonl")
    try:
        with sigterm_as_interrupt(owner), open(requests.path, "wb") as out, \
                open(base / "load.err", "wb") as err:
            t0 = time.monotonic()
            rig.up()
            print(f"clusters, links and pods up in {time.monotonic() - t0:.1f} s", flush=True)
            results, outside, metrics = run(rig, args, out, err, requests)
    except KeyboardInterrupt:
        print("interrupted; removing the clusters", file=sys.stderr)
        return 130
    except (BenchError, MeshError, ClusterError, netns.TopologyError,
            subprocess.TimeoutExpired) as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        if os.getpid() != owner:  # a forked helper that got this far: not its to undo
            os._exit(1)
        if rig.client_proxy_log().exists():
            shutil.copyfile(rig.client_proxy_log(), base / "client-proxy.log")
        with uninterrupted():
            failures = rig.down()
        for failure in failures:
            print(f"cleanup: {failure}", file=sys.stderr)
        if args.keep:
            print(f"kept {base} (load.jsonl: every request; client-proxy.log)")
        else:
            shutil.rmtree(base, ignore_errors=True)
    load_end = loadavg()
    print(f"\nload average at start: {load_start}, at end: {load_end}")
    report(results, args)
    if outside:
        print("\nfailed while setting a fault up (not counted above):")
        for what, n in outside.items():
            print(f"  {n} x {what}")
    print("\nthe client proxy's failover metrics at the end:")
    for line in metrics.splitlines():
        print(f"  {line}")
    if args.json:
        keys = ("fault", "failover_s", "failback_s", "hold_down_s", "failed_idempotent",
                "failed_other", "p99_ms")
        objs: list[dict[str, Any]] = []
        for r in results:
            obj = {k: asdict(r)[k] for k in keys}
            obj |= {"skipped": r.skipped} if r.skipped else {
                "moved_to": r.moved_to, "requests": r.requests, "errors": r.errors,
                "proxy_moves": r.proxy_causes}
            objs.append(obj)
        args.json.write_text(json.dumps(objs, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
