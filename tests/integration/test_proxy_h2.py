"""HTTP/2 with prior knowledge and gRPC pass through a proxy pair intact."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from tests.meshproxy import Trust, endpoint, free_port, service, services_file, start_proxy

METHOD = "/meshgate.test.Echo/Shout"


def _shout(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.set_trailing_metadata((("x-served-by", "app"),))
    return request.upper()


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("h2")
    trust = Trust.create(root)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.unary_unary_rpc_method_handler(_shout)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "meshgate.test.Echo", {"Shout": handler}),))
    app_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    inbound = start_proxy(root, "grpc-server", {
        "identity": trust.workload("default", "grpc"),
        "inbound": {"listen": f"127.0.0.1:{free_port()}"}})
    port = free_port()
    services_file(root / "services.yaml", service(
        "grpc", f"127.0.3.10:{port}", endpoint(inbound.inbound[1], app_port, "grpc")))
    outbound = start_proxy(root, "grpc-client", {
        "identity": trust.workload("default", "caller"),
        "discovery": str(root / "services.yaml")})
    try:
        yield f"127.0.3.10:{port}"
    finally:
        outbound.stop()
        inbound.stop()
        server.stop(None)


def test_grpc_unary_call_through_proxy_pair(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        shout = channel.unary_unary(METHOD)
        reply, call = shout.with_call(b"hello over h2", timeout=10)
    assert reply == b"HELLO OVER H2"
    assert ("x-served-by", "app") in call.trailing_metadata()


def test_many_streams_on_one_connection(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        shout = channel.unary_unary(METHOD)
        calls = [shout.future(f"message {i}".encode(), timeout=10) for i in range(50)]
        assert [c.result() for c in calls] == [f"MESSAGE {i}".encode() for i in range(50)]
