"""What both parts of `make demo` (localcluster.demo, localcluster.demovm) do: run a
step whose failure ends the demo, wait for a condition, call kubectl, and read from a
proxy's metrics page the client identities it verified."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from mesh.errors import MeshError


def run_step(argv: Sequence[str], what: str, *, timeout: float = 60) -> str:
    """The standard output of `argv`, or a MeshError naming `what` and its last error line."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          check=False)
    if proc.returncode != 0:
        raise MeshError(f"{what}: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}")
    return proc.stdout


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise MeshError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def kubectl(kubeconfig: Path, *args: str, input: str | None = None,
            check: bool = True) -> str:
    """kubectl from this interpreter's bin directory (where `make tools` puts it), else PATH."""
    local = Path(sys.executable).parent / "kubectl"
    proc = subprocess.run([str(local) if local.exists() else "kubectl", "--kubeconfig",
                           str(kubeconfig), *args], capture_output=True, text=True,
                          input=input, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise MeshError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def verified_callers(page: str) -> dict[str, float]:
    """Inbound requests by the client identity the proxy verified, from its metrics page
    (`request_total{direction="inbound"}` summed over its other labels)."""
    seen: dict[str, float] = {}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name == "request_total" and sample.labels.get("direction") == "inbound":
                who = sample.labels.get("client_id") or "(no identity)"
                seen[who] = seen.get(who, 0) + sample.value
    return seen
