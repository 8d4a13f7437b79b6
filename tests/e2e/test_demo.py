"""`make demo`: two linked clusters in network namespaces, web called by name from a
client pod in east, in east and in west (through west's gateway), the serving pods
and the verified caller identities shown, kubectl usable, and Ctrl-C removing
everything."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pyroute2 import netns


def test_demo_shows_two_linked_clusters_and_cleans_up(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MESHGATE_RUN_DIR": str(tmp_path / "run")}
    proc = subprocess.Popen([sys.executable, "-m", "localcluster.demo", "--state-dir",
                             str(tmp_path / "state")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any("Ctrl-C" in s for s in seen):
            try:
                seen.append(lines.get(timeout=0.5))
            except queue.Empty:
                assert proc.poll() is None, "".join(seen)
        text = "".join(seen)
        answers = re.findall(r"hello from (web-\d) in default", text)
        assert len(answers) == 10, text
        assert ("web-1: client.default.serviceaccount.identity.meshgate.cluster.local"
                in text or "web-2: client.default.serviceaccount.identity.meshgate."
                "cluster.local" in text), text
        # East calls west's web by its mirror's name; west's pod saw east's client.
        assert len(re.findall(r"hello from west-web-1 in default", text)) == 5, text
        assert ("west-web-1 in west: client.default.serviceaccount.identity.meshgate."
                "cluster.local  5" in text), text
        assert "east imports west: gateway 172.30.0.2, gateway alive True" in text, text
        assert "west imports east: gateway 172.30.0.1, gateway alive True" in text, text
        # Both clusters' link reports: gateways from the host, check on each node.
        assert re.search(r"^\s+west\s+True\s", text, re.M), text
        assert re.search(r"^\s+east\s+True\s", text, re.M), text
        assert text.count("every check passed") == 2, text
        kubeconfig = re.search(r"kubectl --kubeconfig (\S+) get", text)
        assert kubeconfig, text
        kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent))
        assert kubectl
        out = subprocess.run([kubectl, "--kubeconfig", kubeconfig.group(1), "get", "pods"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and "web-1" in out.stdout and "client" in out.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    assert code == 0, "".join(seen)
    assert not [n for n in netns.listnetns()
                if n.startswith(("mg-east-", "mg-west-")) or n == "mg-wan"]
