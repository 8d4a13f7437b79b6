"""Benchmark the embedded cluster's kubelet: `meshgate cluster up` (needs root),
N Pods created at once (each `sleep`), the time until all are Running and Ready,
the API server process's memory and CPU (it hosts the kubelet) while they run
and while idle, then the time from deleting them all until all are gone.

    sudo .venv/bin/python bench/kubelet.py [--pods 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from apiserver import Client, rss_kib

NAME = "mgbenchkubelet"
IDLE_WINDOW = 10.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pod(i: int) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"p{i}"},
            "spec": {"terminationGracePeriodSeconds": 5, "containers": [
                {"name": "c", "image": "busybox", "command": ["sleep", "3600"]}]}}


async def measure(state: Path, pods: int) -> None:
    pid = int((state / "run" / "apiserver.pid").read_text())
    c = Client(state)
    try:
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        await asyncio.gather(*(c.request("POST", "/api/v1/namespaces/default/pods", pod(i))
                               for i in range(pods)))
        while True:
            items = (await c.request("GET", "/api/v1/namespaces/default/pods"))["items"]
            ready = sum(1 for p in items if any(
                cond["type"] == "Ready" and cond["status"] == "True"
                for cond in (p.get("status") or {}).get("conditions") or []))
            if ready == pods:
                break
            await asyncio.sleep(0.2)
        to_ready = time.perf_counter() - t0
        start_cpu = cpu_seconds(pid) - cpu0
        rss, hwm = rss_kib(pid)
        cpu1 = cpu_seconds(pid)
        await asyncio.sleep(IDLE_WINDOW)
        idle = (cpu_seconds(pid) - cpu1) / IDLE_WINDOW
        t1 = time.perf_counter()
        await asyncio.gather(*(c.request("DELETE", f"/api/v1/namespaces/default/pods/p{i}")
                               for i in range(pods)))
        while (await c.request("GET", "/api/v1/namespaces/default/pods"))["items"]:
            await asyncio.sleep(0.2)
        gone = time.perf_counter() - t1
    finally:
        await c.session.close()
    print(f"kubelet: {pods} pods Running+Ready  {to_ready:.1f} s "
          f"(API server + kubelet CPU {start_cpu:.1f} s)")
    print(f"kubelet: server RSS with {pods} pods  {rss / 1024:.0f} MiB (peak {hwm / 1024:.0f} MiB)")
    print(f"kubelet: idle CPU with {pods} pods    {idle * 100:.1f} % of one core")
    print(f"kubelet: delete {pods} pods, all gone  {gone:.1f} s")


def run(pods: int) -> None:
    if os.geteuid() != 0:
        print("kubelet: skipped (network namespaces need root)")
        return
    with tempfile.TemporaryDirectory(prefix="meshgate-bench-kubelet-") as tmp:
        env = {**os.environ, "MESHGATE_RUN_DIR": f"{tmp}/run"}
        state = Path(tmp) / "state"
        meshgate = [sys.executable, "-m", "mesh.cli", "--log-level", "warning", "cluster"]
        subprocess.run([*meshgate, "up", "--name", NAME, "--state-dir", str(state),
                        "--pod-cidr", "10.219.0.0/16", "--service-cidr", "10.220.0.0/16"],
                       env=env, check=True, capture_output=True)
        try:
            asyncio.run(measure(state, pods))
        finally:
            subprocess.run([*meshgate, "down", "--name", NAME], env=env, check=False,
                           capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", type=int, default=50)
    run(parser.parse_args().pods)


if __name__ == "__main__":
    main()
