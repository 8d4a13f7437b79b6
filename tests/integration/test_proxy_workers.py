"""`meshgate proxy run --workers N`: N processes share the listeners, all stop together."""

from __future__ import annotations

from pathlib import Path

from tests.cluster import wait_for
from tests.meshproxy import (
    Trust,
    call,
    echo_app,
    endpoint,
    free_port,
    service,
    services_file,
    start_proxy,
)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def test_workers_share_listeners_and_stop_together(tmp_path: Path) -> None:
    trust = Trust.create(tmp_path)
    app = echo_app()
    server = start_proxy(tmp_path, "server", {"identity": trust.workload("default", "echo")},
                         extra=("--workers", "2"))
    port = free_port()
    services_file(tmp_path / "services.yaml", service(
        "echo", f"127.0.4.10:{port}", endpoint(server.inbound[1], app.server_address[1], "echo")))
    client = start_proxy(tmp_path, "client", {"identity": trust.workload("default", "c"),
                                              "discovery": str(tmp_path / "services.yaml")},
                         extra=("--workers", "2"))
    try:
        workers = _children(server.proc.pid)
        assert len(workers) == 1  # the parent is the first worker
        for i in range(40):
            assert call(("127.0.4.10", port), b"ping %d" % i) == b"ping %d" % i
        # The connections landed on both workers, yet every scrape, whichever
        # worker answers it, counts all 40.
        for _ in range(6):
            assert client.metric("tcp_open_total", direction="outbound",
                                 dst_service="echo.default.svc.cluster.local") == 40
            assert server.metric("tcp_open_total", direction="inbound") >= 40
    finally:
        client.stop()
        server.stop()
        app.shutdown()
    wait_for(lambda: not any(Path(f"/proc/{w}").exists() for w in workers),
             what="worker processes to exit")
