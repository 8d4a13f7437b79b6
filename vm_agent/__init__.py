"""The VM agent: join, enrollment, ExternalWorkload registration, DNS for mesh names,
route-based traffic redirection and proxy supervision."""

from pathlib import Path

DEFAULT_STATE_DIR = Path("/var/lib/meshgate")
"""Where the agent keeps what it recorded (vm_agent.state); here so that the command
line, which every meshgate process parses, need not load the state's models."""
