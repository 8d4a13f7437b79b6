"""`make demo`: two embedded clusters, east and west, side by side, until Ctrl-C.

Later capabilities extend this walk-through (linking, a VM, failover); for now
it starts both API servers and says how to reach each with kubectl.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from localcluster.server import ClusterConfig, ClusterServer

CLUSTERS = (("east", "10.96.0.0/16"), ("west", "10.112.0.0/16"))


async def run(state_dir: Path) -> None:
    servers = [ClusterServer(ClusterConfig(name=name, state_dir=state_dir / name,
                                           service_cidr=cidr)) for name, cidr in CLUSTERS]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for server in servers:
            await server.start()
        print("meshgate demo: two embedded clusters are up.\n")
        for server in servers:
            kc = server.kubeconfig.resolve()
            print(f"  {server.config.name:5} {server.url}  (services {server.config.service_cidr})")
            print(f"        kubeconfig: {kc}")
            print(f"        try:        kubectl --kubeconfig {kc} get namespaces\n")
        print("kubectl is in .venv/bin. Press Ctrl-C to stop; state stays in "
              f"{state_dir.resolve()}.", flush=True)
        await stop.wait()
    finally:
        for server in servers:
            await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--state-dir", type=Path, default=Path("demo-state"))
    args = parser.parse_args()
    asyncio.run(run(args.state_dir))


if __name__ == "__main__":
    main()
