"""`meshgate cluster serve` refuses bad input with one actionable line and exit 2."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh.cli", "cluster", "serve", *args],
                          capture_output=True, text=True, timeout=60)


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = _serve("--name", "x", "--state-dir", str(tmp_path), "--listen",
                      f"127.0.0.1:{port}")
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_state_dir_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    proc = _serve("--name", "x", "--state-dir", str(f))
    assert proc.returncode == 2
    assert f"state directory {f}" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--service-cidr", "10.96.0.0/33", "--service-cidr"),
    ("--listen", "127.0.0.1:http", "port must be a number"),
    ("--watch-history", "0", "greater than zero"),
])
def test_bad_flags(tmp_path: Path, flag: str, value: str, says: str) -> None:
    proc = _serve("--name", "x", "--state-dir", str(tmp_path), flag, value)
    assert proc.returncode == 2
    assert says in proc.stderr and "Traceback" not in proc.stderr


def test_corrupt_store_is_reported(tmp_path: Path) -> None:
    (tmp_path / "cluster.db").write_bytes(b"this is not a database" * 100)
    proc = _serve("--name", "x", "--state-dir", str(tmp_path))
    assert proc.returncode == 2
    assert "cluster.db" in proc.stderr and "Traceback" not in proc.stderr
