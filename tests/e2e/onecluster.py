"""A cluster of `cluster up` as one e2e module sees it: its state directory's
kubeconfig, and meshgate and kubectl run against it (a failed command is an
AssertionError with its output). Modules add what they need on top."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.clusters import KUBECTL


@dataclass
class OneCluster:
    base: Path
    env: dict[str, str]

    @property
    def kubeconfig(self) -> Path:
        return self.base / "state" / "kubeconfig"

    def run(self, argv: list[str], *, input: str | None = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(argv, env=self.env, capture_output=True, text=True,
                              input=input, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv[:4])} ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def meshgate(self, *args: str, input: str | None = None, check: bool = True
                 ) -> subprocess.CompletedProcess[str]:
        return self.run([sys.executable, "-m", "mesh.cli", *args], input=input, check=check)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.run([KUBECTL, "--kubeconfig", str(self.kubeconfig), *args], input=input,
                        check=check, timeout=timeout)
