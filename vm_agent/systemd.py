"""The agent's systemd unit, so that a joined VM comes back after a reboot.

Where systemd is not running (a container, this machine's test namespaces),
`vm join` needs ``--foreground`` and writes no unit.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from vm_agent.state import UNIT_NAME, AgentError

UNIT_DIR = Path("/etc/systemd/system")


def running() -> bool:
    """Whether systemd manages this machine (what sd_booted(3) checks)."""
    return Path("/run/systemd/system").is_dir()


def unit_text(state_dir: Path) -> str:
    return (
        "[Unit]\n"
        "Description=meshgate VM agent: mesh identity, proxy, routes and DNS\n"
        "Wants=network-online.target\n"
        "After=network-online.target\n"
        "\n"
        "[Service]\n"
        f"ExecStart={sys.executable} -m mesh.cli vm run --state-dir {state_dir}\n"
        "Restart=always\n"
        "RestartSec=2\n"
        "KillMode=mixed\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n")


def install(state_dir: Path, unit_dir: Path = UNIT_DIR) -> Path:
    path = unit_dir / UNIT_NAME
    try:
        path.write_text(unit_text(state_dir))
    except OSError as e:
        raise AgentError(f"cannot write {path}: {e.strerror or e}") from e
    _systemctl("daemon-reload")
    _systemctl("enable", "--now", UNIT_NAME)
    return path


def remove(path: Path) -> None:
    if running():
        _systemctl("disable", "--now", UNIT_NAME, check=False)
    path.unlink(missing_ok=True)
    if running():
        _systemctl("daemon-reload", check=False)


def _systemctl(*args: str, check: bool = True) -> None:
    try:
        done = subprocess.run(["systemctl", *args], capture_output=True, text=True,
                              check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        if check:
            raise AgentError(f"systemctl {' '.join(args)} failed: {e}") from e
        return
    if check and done.returncode != 0:
        raise AgentError(f"systemctl {' '.join(args)} failed: "
                         f"{(done.stderr or done.stdout).strip()}")
