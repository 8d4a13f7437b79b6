"""What is left of Pods when their kubelet could not stop them (it was killed):
every process still inside a Pod's network namespace is killed before the
namespace goes, so that `cluster down` leaves nothing running."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path

from localcluster import netns
from localcluster.namespaces import namespace_path

log = logging.getLogger(__name__)


def processes_in(netns_name: str, proc: Path = Path("/proc")) -> list[int]:
    """Processes whose network namespace is `netns_name`."""
    try:
        target = os.stat(namespace_path(netns_name))
    except OSError:
        return []
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            st = os.stat(entry / "ns" / "net")
            if (st.st_ino, st.st_dev) == (target.st_ino, target.st_dev):
                found.append(int(entry.name))
    return found


def kill_pod_processes(net: netns.ClusterNetwork) -> None:
    """SIGKILL every process in any of the cluster's Pod namespaces."""
    for pod in netns.list_pods(net):
        for pid in processes_in(pod.netns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                log.info("left-over pod process killed pod=%s pid=%d", pod.name, pid)
