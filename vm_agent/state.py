"""The agent's state directory: what a join made, so that `vm status` can show it
and `vm leave` (or a join that finds a half-done one) can undo it exactly.

Layout under ``--state-dir`` (default /var/lib/meshgate)::

    state.json          what was joined and each change made (`VmState`)
    trust-anchor.pem    the anchors the VM trusts, as given to join
    identity/key.pem    the workload key, made on the VM (mode 0600)
    identity/chain.pem  its certificate chain, renewed by the proxy
    agent/token         the API credential limited to this ExternalWorkload (0600)
    agent/api-ca.pem    the CA of the API server's certificate
    proxy.yaml          the proxy's configuration
    status.json         the running agent's view: heartbeats, failures and since when
    resolver/           the resolver file's backup (vm_agent.resolver)
    holder              who holds the directory (flock on the directory itself), while
                        an agent or command does

`state.json` is rewritten (temp file, fsync, rename) before each change is
made and after it is done, so a join killed at any line leaves a record of
everything it may have touched.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mesh.errors import ConfigError, MeshError
from mesh.files import write_atomic

UNIT_NAME = "meshgate-vm.service"


class AgentError(MeshError):
    """The VM agent cannot do what was asked; the message says why and what to do."""


class AlreadyRunning(AgentError):
    """Another agent or command holds the state directory."""


class Phase(StrEnum):
    JOINING = "joining"
    JOINED = "joined"
    LEAVING = "leaving"


class Change(StrEnum):
    """What a join may change on the VM or in the cluster; `vm leave` undoes each."""

    IDENTITY = "identity"
    """Files under the state directory: key, chain, credential, proxy configuration."""
    REGISTRATION = "registration"
    """The ExternalWorkload's address and Ready condition."""
    ROUTES = "routes"
    """AnyIP routes for service addresses, tagged with the agent's route protocol."""
    RESOLVER = "resolver"
    """The resolver configuration, backed up under resolver/."""
    UNIT = "unit"
    """The systemd unit file."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class VmState(_Model):
    phase: Phase
    namespace: str
    workload: str
    service_account: str = Field(alias="serviceAccount")
    identity: str
    control_plane: str = Field(alias="controlPlane")
    gateway: str | None = None
    gateway_identity: str | None = Field(None, alias="gatewayIdentity")
    api_server: str = Field("", alias="apiServer")
    address: str
    cluster_domain: str = Field("cluster.local", alias="clusterDomain")
    dns_address: str = Field(alias="dnsAddress")
    resolver_file: str = Field("/etc/resolv.conf", alias="resolverFile")
    unit_file: str | None = Field(None, alias="unitFile")
    changes: list[Change] = Field(default_factory=list)
    """Begun changes, in order; each is undone in reverse by `vm leave`."""
    joined_at: str | None = Field(None, alias="joinedAt")
    made_state_dir: bool = Field(False, alias="madeStateDir")
    """Join made the state directory, so leave removes it."""


class StateDir:
    """Paths in, and the state record of, one agent's state directory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def record(self) -> Path:
        return self.path / "state.json"

    @property
    def status(self) -> Path:
        return self.path / "status.json"

    @property
    def anchor(self) -> Path:
        return self.path / "trust-anchor.pem"

    @property
    def key(self) -> Path:
        return self.path / "identity" / "key.pem"

    @property
    def chain(self) -> Path:
        return self.path / "identity" / "chain.pem"

    @property
    def agent_token(self) -> Path:
        return self.path / "agent" / "token"

    @property
    def api_ca(self) -> Path:
        return self.path / "agent" / "api-ca.pem"

    @property
    def proxy_config(self) -> Path:
        return self.path / "proxy.yaml"

    @property
    def resolver(self) -> Path:
        return self.path / "resolver"

    @property
    def lock_file(self) -> Path:
        return self.path / "holder"

    def load(self) -> VmState | None:
        """The record, or None when nothing was ever joined from this directory."""
        try:
            raw = self.record.read_text()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise AgentError(f"cannot read {self.record}: {e.strerror or e}") from e
        try:
            return VmState.model_validate(json.loads(raw))
        except (ValueError, ValidationError) as e:
            raise AgentError(f"{self.record} is damaged ({str(e).splitlines()[0]}); "
                             f"move it away and run `meshgate vm leave --state-dir "
                             f"{self.path}` to undo what it can") from e

    def save(self, state: VmState) -> None:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(self.record, state.model_dump_json(by_alias=True, indent=2).encode(),
                     mode=0o644)

    def begin(self, state: VmState, change: Change) -> None:
        """Record `change` before it is made, so that a crash mid-way still undoes it."""
        if change not in state.changes:
            state.changes.append(change)
            self.save(state)

    @contextlib.contextmanager
    def locked(self, what: str) -> Iterator[None]:
        """Hold the directory for `what`; AlreadyRunning names the holder otherwise.

        The lock is on the directory itself (flock), so it goes with the process that
        held it; `holder` names that process while it lives. A directory this call
        made and nothing was joined into is removed again: a failed join leaves none.
        """
        created = not self.path.exists()
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise ConfigError(f"cannot use state directory {self.path}: "
                              f"{e.strerror or e}") from e
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AlreadyRunning(
                    f"state directory {self.path} is in use by {self.holder() or '?'}; stop "
                    f"it first (`systemctl stop {UNIT_NAME}`, or end the foreground agent)"
                    ) from None
            self.lock_file.write_text(f"{what} (pid {os.getpid()})\n")
            try:
                yield
            finally:
                self.lock_file.unlink(missing_ok=True)
                if created and not self.record.exists():
                    with contextlib.suppress(OSError):
                        os.rmdir(self.path)
        finally:
            os.close(fd)

    def holder(self) -> str | None:
        """Who holds the directory now, or None when nobody does."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    return self.lock_file.read_text().strip() or "?"
                except OSError:
                    return "?"
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def holder_pid(self) -> int | None:
        text = self.holder()
        if not text or "(pid " not in text:
            return None
        try:
            return int(text.rsplit("(pid ", 1)[1].rstrip(")"))
        except ValueError:
            return None


def now_text() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
