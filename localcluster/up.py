"""A whole cluster on this machine: `cluster up` and `cluster down`.

`up` builds the cluster's node network namespace (localcluster.netns), starts
two processes in the background, each with a pid file and a log under the state
directory, and installs meshgate into the cluster:

- the API server, on the host (for kubectl, at the address in ``DIR/kubeconfig``)
  and on the node's address (for the cluster), from one process: a socket keeps
  the namespace it was created in; it runs the node's kubelet and service proxy;
- the cluster DNS, inside the node namespace, where pods reach it across the bridge;
- meshgate's own manifests (localcluster.manifestinstall): the control plane
  (identity, destination, policy, the proxy injector), the gateway and the mirror
  controller, Deployments the kubelet runs; the control plane's Service answers at
  the node's addresses;
- with ``--multicluster``: the node joins the shared WAN (localcluster.wan), the
  API server also listens on the node's WAN address (for VMs and other clusters,
  which reach it with ``DIR/kubeconfig.wan``), and the control plane and the
  gateway's LoadBalancer Service answer there.

`run-pod` is localcluster.pods.

A cluster is found by name through ``$MESHGATE_RUN_DIR/clusters/<name>`` (default
``/run/meshgate`` for root; see localcluster.rootless for everyone else), which
holds its state directory; like the network namespaces, it does not outlive a
reboot.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from localcluster import namespaces, netns, wan, wanlink
from localcluster.kubelet.reap import kill_pod_processes
from localcluster.rootless import meshgate_argv, run_dir
from mesh.errors import ConfigError, MeshError

log = logging.getLogger(__name__)

API_PORT = 6443
CONTROL_PORT = 8086
DNS_PORT = 53
START_TIMEOUT = 30.0


class ClusterError(MeshError):
    """The cluster cannot be brought up, found, or used as asked."""


class ClusterSpec(BaseModel):
    """DIR/cluster.json: what `up` built, for `run-pod` and `down` in other processes."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str
    state_dir: Path = Field(alias="stateDir")
    pod_cidr: str = Field(alias="podCidr")
    service_cidr: str = Field(alias="serviceCidr")
    cluster_domain: str = Field(alias="clusterDomain")
    trust_domain: str = Field(alias="trustDomain")
    node_netns: str = Field(alias="nodeNetns")
    node_address: str = Field(alias="nodeAddress")
    workload_heartbeat: str = Field("10s", alias="workloadHeartbeat")
    """How often VMs' agents report; the control plane drops one after 3 missed reports."""
    netns_prefix: str = Field("mg-", alias="netnsPrefix")
    wan: str | None = None
    """The WAN namespace the cluster is attached to; None: not multicluster."""
    wan_address: str | None = Field(None, alias="wanAddress")

    @property
    def network(self) -> netns.ClusterNetwork:
        return netns.ClusterNetwork(
            name=self.name, state_dir=self.state_dir,
            pod_cidr=ipaddress.IPv4Network(self.pod_cidr),
            service_cidr=ipaddress.IPv4Network(self.service_cidr),
            cluster_domain=self.cluster_domain, netns_prefix=self.netns_prefix)

    @property
    def control_url(self) -> str:
        return f"https://{self.node_address}:{CONTROL_PORT}"

    @property
    def control_url_wan(self) -> str | None:
        """The control plane as VMs and other clusters on the WAN reach it."""
        if self.wan_address is None:
            return None
        return f"https://{self.wan_address}:{CONTROL_PORT}"

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def kubeconfig_wan(self) -> Path | None:
        """The API server at the node's WAN address, for VMs and other clusters."""
        return self.state_dir / "kubeconfig.wan" if self.wan_address is not None else None

    @property
    def identity_dir(self) -> Path:
        return self.state_dir / "identity"


# --- finding clusters --------------------------------------------------------------------


def _entry(name: str) -> Path:
    return run_dir() / "clusters" / name


def find(name: str) -> ClusterSpec:
    """The cluster `name` that `up` started on this machine."""
    entry = _entry(name)
    try:
        state_dir = Path(entry.read_text().strip())
    except FileNotFoundError:
        raise ClusterError(f"no cluster named {name!r} is up on this machine; start it with "
                           f"`meshgate cluster up --name {name} --state-dir DIR ...`") from None
    return load_spec(state_dir)


def load_spec(state_dir: Path) -> ClusterSpec:
    path = state_dir / "cluster.json"
    try:
        return ClusterSpec.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise ClusterError(f"{path} is missing: {state_dir} holds no cluster started by "
                           "`meshgate cluster up`") from None
    except ValidationError as e:
        raise ClusterError(f"{path} is damaged ({e.error_count()} errors); run "
                           "`meshgate cluster down` and start again") from e


# --- background processes ----------------------------------------------------------------


def _pid_file(state_dir: Path, name: str) -> Path:
    return state_dir / "run" / f"{name}.pid"


def _log_file(state_dir: Path, name: str) -> Path:
    return state_dir / "logs" / f"{name}.log"


def _in_netns(name: str, argv: Sequence[str]) -> list[str]:
    nsenter = shutil.which("nsenter")
    if nsenter is None:
        raise ClusterError("entering the node's network namespace needs `nsenter` "
                           "(util-linux) on PATH; install it")
    return [nsenter, f"--net={namespaces.namespace_path(name)}", "--", *argv]


def launch(argv: Sequence[str], log_path: Path, *, ready: str, what: str,
            detach: bool, timeout: float = START_TIMEOUT) -> subprocess.Popen[bytes]:
    """Start `argv` with its output appended to `log_path`; return it once the log
    shows `ready`. `detach`: in a session of its own, to outlive this process."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        start = out.tell()
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=detach,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = _read_from(log_path, start)
        if ready in text:
            return proc
        if proc.poll() is not None:
            raise ClusterError(f"{what} exited with status {proc.returncode}: "
                               f"{_last_line(text)} (log: {log_path})")
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise ClusterError(f"{what} did not start within {timeout:.0f}s: "
                       f"{_last_line(_read_from(log_path, start))} (log: {log_path})")


def _start_daemon(state_dir: Path, name: str, argv: Sequence[str], *, ready: str) -> int:
    """Start one of the cluster's processes in the background; its pid once ready."""
    pid_file = _pid_file(state_dir, name)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    proc = launch(argv, _log_file(state_dir, name), ready=ready, what=name, detach=True)
    pid_file.write_text(f"{proc.pid}\n")
    return proc.pid


def _read_from(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def _stop_daemon(state_dir: Path, name: str, *, timeout: float = 5.0) -> None:
    pid_file = _pid_file(state_dir, name)
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return
    if _ours(pid, state_dir):
        _terminate(pid, timeout)
    pid_file.unlink(missing_ok=True)


def _ours(pid: int, state_dir: Path) -> bool:
    """Whether `pid` still runs a process started for this state directory (pids are
    reused, and a stale pid file must not kill a stranger)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(str(state_dir).encode() in part for part in cmdline)


def _terminate(pid: int, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return False
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# --- up and down -------------------------------------------------------------------------


@dataclass(frozen=True)
class UpRequest:
    name: str
    state_dir: Path
    pod_cidr: str = "10.244.0.0/16"
    service_cidr: str = "10.96.0.0/16"
    cluster_domain: str = "cluster.local"
    identity_dir: Path | None = None
    trust_domain: str = "cluster.local"
    netns_prefix: str = "mg-"
    multicluster: bool = False
    wan: str = wan.DEFAULT_WAN
    wan_cidr: str | None = None
    wan_address: str | None = None
    wan_delay: str | None = None
    """With `multicluster`: netem on the node's WAN link ("30ms"; localcluster.wanlink)."""
    wan_jitter: str | None = None
    wan_loss: str | None = None
    """"0.5%"."""
    workload_heartbeat: str = "10s"


DAEMONS = ("apiserver", "dns")
"""In start order; `down` stops them in reverse."""


def up(req: UpRequest) -> ClusterSpec:
    """Build the cluster and start its processes; on any failure, undo all of it.

    For a cluster that is already up from the same state directory, start
    whatever of it has stopped (a crashed control plane, say) and change nothing
    else."""
    state_dir = req.state_dir.resolve()
    entry = _entry(req.name)
    if entry.exists():
        other = Path(entry.read_text().strip())
        if other == state_dir and (state_dir / "cluster.json").exists():
            spec = load_spec(state_dir)
            if req.multicluster and spec.wan is None:
                raise ClusterError(f"cluster {req.name!r} was started without --multicluster; "
                                   f"`meshgate cluster down --name {req.name}` and start it "
                                   "again with --multicluster")
            netem = _wan_netem(req)
            netns.up(spec.network)
            spec = _attach_wan(spec, netem=netem)
            _start_cluster_processes(spec)
            return spec
        if any(_daemon_alive(other, d) for d in DAEMONS):
            raise ClusterError(f"cluster {req.name!r} is already up (state in {other}); "
                               f"`meshgate cluster down --name {req.name}` first")
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"state directory {state_dir}: {e.strerror or e}") from e
    try:
        net = netns.ClusterNetwork(
            name=req.name, state_dir=state_dir, pod_cidr=ipaddress.IPv4Network(req.pod_cidr),
            service_cidr=ipaddress.IPv4Network(req.service_cidr),
            cluster_domain=req.cluster_domain, netns_prefix=req.netns_prefix)
    except ValueError as e:
        raise ConfigError(f"--pod-cidr/--service-cidr: {e}") from e
    wan_cidr, wan_address = _wan_request(req)
    netem = _wan_netem(req)
    trust_domain = _prepare_identity(state_dir / "identity", req)
    spec = ClusterSpec(name=req.name, state_dir=state_dir, pod_cidr=str(net.pod_cidr),
                       service_cidr=str(net.service_cidr), cluster_domain=req.cluster_domain,
                       trust_domain=trust_domain, node_netns=net.node_netns,
                       node_address=str(net.gateway.ip), netns_prefix=req.netns_prefix,
                       wan=req.wan if req.multicluster else None,
                       workload_heartbeat=req.workload_heartbeat)
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_text(f"{state_dir}\n")
    (state_dir / "cluster.json").write_text(spec.model_dump_json(by_alias=True, indent=2))
    try:
        netns.up(net)
        spec = _attach_wan(spec, cidr=wan_cidr, address=wan_address, netem=netem)
        _start_cluster_processes(spec)
    except BaseException:
        with contextlib.suppress(MeshError):
            _down(spec)
        raise
    return spec


def _wan_request(req: UpRequest) -> tuple[ipaddress.IPv4Network | None,
                                            ipaddress.IPv4Address | None]:
    if not req.multicluster:
        if req.wan_cidr or req.wan_address:
            raise ConfigError("--wan-cidr and --wan-address need --multicluster")
        return None, None
    wan.check_name(req.wan)
    try:
        cidr = ipaddress.IPv4Network(req.wan_cidr) if req.wan_cidr else None
        address = ipaddress.IPv4Address(req.wan_address) if req.wan_address else None
    except ValueError as e:
        raise ConfigError(f"--wan-cidr/--wan-address: {e}") from e
    return cidr, address


def _wan_netem(req: UpRequest) -> wan.Netem | None:
    """The netem the flags ask for on the node's WAN link; None: none asked for."""
    given = {"delay": req.wan_delay, "jitter": req.wan_jitter, "loss": req.wan_loss}
    if all(v is None for v in given.values()):
        return None
    if not req.multicluster:
        raise ConfigError("--wan-delay, --wan-jitter and --wan-loss need --multicluster")
    delay = jitter = loss = None
    if req.wan_delay is not None:
        delay = wanlink.parse_duration_ms(req.wan_delay, flag="--wan-delay")
    if req.wan_jitter is not None:
        jitter = wanlink.parse_duration_ms(req.wan_jitter, flag="--wan-jitter")
    if req.wan_loss is not None:
        loss = wanlink.parse_loss_pct(req.wan_loss, flag="--wan-loss")
    return wanlink.settings(delay_ms=delay, jitter_ms=jitter, loss_pct=loss,
                            flag_prefix="wan-")


def _attach_wan(spec: ClusterSpec, *, cidr: ipaddress.IPv4Network | None = None,
                address: ipaddress.IPv4Address | None = None,
                netem: wan.Netem | None = None) -> ClusterSpec:
    """Attach the cluster to its WAN, or converge its link (`up` again after a crash),
    with its netem and partition as recorded in the WAN, or `netem` if given (recorded
    there); the spec with the WAN address, recorded in DIR/cluster.json."""
    if spec.wan is None:
        return spec
    if spec.wan_address is not None:
        address = ipaddress.IPv4Address(spec.wan_address)
    attached = wan.attach(spec.name, node_netns=spec.node_netns,
                          pod_cidr=ipaddress.IPv4Network(spec.pod_cidr),
                          service_cidr=ipaddress.IPv4Network(spec.service_cidr), wan=spec.wan,
                          cidr=cidr, address=address)
    member = f"cluster/{spec.name}"
    if netem is None:
        wanlink.converge(spec.wan, member)
    else:
        wanlink.set_link(spec.wan, member, delay_ms=netem.delay_ms,
                         jitter_ms=netem.jitter_ms, loss_pct=netem.loss_pct)
    if spec.wan_address != str(attached.address.ip):
        spec = spec.model_copy(update={"wan_address": str(attached.address.ip)})
        (spec.state_dir / "cluster.json").write_text(spec.model_dump_json(by_alias=True,
                                                                          indent=2))
    return spec


def _start_cluster_processes(spec: ClusterSpec) -> None:
    """Start each of the cluster's processes that is not running."""
    d, node = spec.state_dir, spec.node_address
    if not _daemon_alive(d, "apiserver"):
        also = [f"{spec.node_netns}={node}:{API_PORT}"]
        if spec.wan_address is not None:
            also.append(f"{spec.node_netns}={spec.wan_address}:{API_PORT}")
        _start_daemon(d, "apiserver", meshgate_argv((
            "cluster", "serve", "--name", spec.name, "--state-dir", str(d),
            "--service-cidr", spec.service_cidr, "--kubelet",
            "--advertise-address", spec.wan_address or node,
            *(arg for a in also for arg in ("--also-listen", a)))), ready="kubeconfig:")
    node_kubeconfig = _node_kubeconfig(spec)
    if spec.wan_address is not None:
        write_wan_kubeconfig(spec)
    _start_dns(spec, node_kubeconfig)
    from localcluster.manifestinstall import install_manifests

    install_manifests(spec.kubeconfig, spec.identity_dir, control_addresses=[
        a for a in (spec.node_address, spec.wan_address) if a is not None],
        control_args=[f"--cluster-name={spec.name}", f"--cluster-domain="
                      f"{spec.cluster_domain}",
                      f"--workload-heartbeat={spec.workload_heartbeat}"])


def _start_dns(spec: ClusterSpec, node_kubeconfig: Path) -> None:
    if not _daemon_alive(spec.state_dir, "dns"):
        _start_daemon(spec.state_dir, "dns", _in_netns(spec.node_netns, [
            sys.executable, "-m", "localcluster.dns", "--kubeconfig", str(node_kubeconfig),
            "--listen", f"{spec.node_address}:{DNS_PORT}", "--cluster-domain",
            spec.cluster_domain]), ready="dns: serving")


def _node_kubeconfig(spec: ClusterSpec) -> Path:
    """The host kubeconfig, pointed at the API server's listener on the node."""
    return _kubeconfig_at(spec, spec.node_address, spec.state_dir / "kubeconfig.node")


def write_wan_kubeconfig(spec: ClusterSpec) -> Path:
    """The host kubeconfig, pointed at the API server's listener on the node's WAN
    address: the one VMs and other clusters reach."""
    assert spec.wan_address is not None and spec.kubeconfig_wan is not None
    return _kubeconfig_at(spec, spec.wan_address, spec.kubeconfig_wan)


def _kubeconfig_at(spec: ClusterSpec, address: str, path: Path) -> Path:
    doc = yaml.safe_load(spec.kubeconfig.read_text())
    doc["clusters"][0]["cluster"]["server"] = f"https://{address}:{API_PORT}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    return path


def node_exec(name: str, argv: Sequence[str]) -> int:
    """Run `argv` on the cluster's node: in its network namespace, where its controllers
    run (and reach what they reach, a linked cluster's WAN address among them), with
    KUBECONFIG naming the API server's node address. Returns the command's status."""
    spec = find(name)
    env = dict(os.environ, KUBECONFIG=str(_node_kubeconfig(spec)))
    return subprocess.run(_in_netns(spec.node_netns, argv), env=env, check=False).returncode


def _prepare_identity(directory: Path, req: UpRequest) -> str:
    """The cluster's issuer: under the given trust anchor, or under a new one of its own.
    Returns the trust domain."""
    from mesh.identity.ca import IssuerDir, new_issuer
    from mesh.identity.commands import _trust_domain

    mine = IssuerDir(directory)
    if mine.issuer_cert.exists():
        return _trust_domain(mine)
    now = dt.datetime.now(dt.UTC)
    if req.identity_dir is None:
        mine.init(req.trust_domain, anchor_lifetime=dt.timedelta(days=3650),
                  issuer_lifetime=dt.timedelta(days=365), now=now)
        return req.trust_domain
    shared = IssuerDir(req.identity_dir)
    trust_domain = _trust_domain(shared)
    anchor = shared.load_anchor()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.copyfile(shared.anchor_cert, mine.anchor_cert)
    mine.save_issuer(new_issuer(anchor, trust_domain, lifetime=dt.timedelta(days=365), now=now))
    mine.save_bundle(shared.load_bundle())
    return trust_domain


def _daemon_alive(state_dir: Path, name: str) -> bool:
    try:
        pid = int(_pid_file(state_dir, name).read_text().strip())
    except (OSError, ValueError):
        return False
    return _alive(pid) and _ours(pid, state_dir)


def down(name: str) -> None:
    """Stop the cluster's pods and processes and remove its network."""
    _down(find(name))


def _down(spec: ClusterSpec) -> None:
    for pod_dir in sorted((spec.state_dir / "pods").glob("*/")):
        with contextlib.suppress(OSError, ValueError):
            pid = int((pod_dir / "run-pod.pid").read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"run-pod" in cmdline and spec.name.encode() in cmdline:
                _terminate(pid, 10.0)
    for daemon in reversed(DAEMONS):
        _stop_daemon(spec.state_dir, daemon)
    kill_pod_processes(spec.network)  # what a killed kubelet could not stop
    netns.teardown(spec.state_dir)
    if spec.wan is not None:
        wan.detach(spec.name, wan=spec.wan)
    entry = _entry(spec.name)
    with contextlib.suppress(OSError):
        if Path(entry.read_text().strip()) == spec.state_dir:
            entry.unlink()
