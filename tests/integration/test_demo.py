"""`make demo` starts east and west; kubectl can use both; Ctrl-C stops them."""

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


def test_demo_starts_two_clusters_kubectl_can_use(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "localcluster.demo", "--state-dir",
                             str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("Ctrl-C" in s for s in seen):
            try:
                seen.append(lines.get(timeout=0.5))
            except queue.Empty:
                assert proc.poll() is None, "".join(seen)
        text = "".join(seen)
        kubeconfigs = re.findall(r"kubeconfig: (\S+)", text)
        assert [Path(k).parent.name for k in kubeconfigs] == ["east", "west"], text
        assert text.count("try:        kubectl --kubeconfig") == 2
        kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent))
        assert kubectl
        for kc in kubeconfigs:
            out = subprocess.run([kubectl, "--kubeconfig", kc, "get", "namespaces"],
                                 capture_output=True, text=True, timeout=30)
            assert out.returncode == 0 and "kube-system" in out.stdout, out.stderr
        east = subprocess.run([kubectl, "--kubeconfig", kubeconfigs[0], "get", "svc",
                               "kubernetes", "-o", "jsonpath={.spec.clusterIP}"],
                              capture_output=True, text=True, timeout=30).stdout
        west = subprocess.run([kubectl, "--kubeconfig", kubeconfigs[1], "get", "svc",
                               "kubernetes", "-o", "jsonpath={.spec.clusterIP}"],
                              capture_output=True, text=True, timeout=30).stdout
        assert east == "10.96.0.1" and west == "10.112.0.1"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
