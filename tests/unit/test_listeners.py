"""Finding the socket that holds an address in /proc/net/tcp{,6}, without sockets."""

from __future__ import annotations

from mesh.proxy.listeners import sockets_on

TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0C00600A:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0
   1: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 222 1 0
   2: 0100007F:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 333 1 0
   3: 0C00600A:0050 0200000A:D431 06 00000000:00000000 03:00000F00 00000000     0        0 0 3 0
   4: 0C00600A:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 444 1 0
"""


def row(local: str, inode: int) -> str:
    """A /proc/net/tcp6 line: local address, remote, state LISTEN ... inode."""
    return f"   0: {local} {'0' * 32}:0000 0A 0:0 00:0 0 1000 0 {inode} 1 0"


TCP6 = "\n".join([
    "  sl  local_address remote_address st tx_queue rx_queue tr tm->when retrnsmt uid inode",
    row("00000000000000000000000000000000:0050", 555),  # [::]:80
    row("0000000000000000FFFF00000C00600A:0050", 666),  # [::ffff:10.96.0.12]:80
    row("B80D0120000000000000000001000000:0050", 777),  # [2001:db8::1]:80
])


def test_the_address_itself_and_wildcards_on_its_port_collide() -> None:
    # 10.96.0.12:80 exactly, and 0.0.0.0:80; not 127.0.0.1:80, not port 8080, not TIME_WAIT.
    assert sockets_on(TCP, "10.96.0.12", 80) == {111, 222}
    assert sockets_on(TCP, "10.96.0.12", 8080) == {444}
    assert sockets_on(TCP, "10.96.0.13", 443) == set()


def test_ipv6_wildcards_and_mapped_addresses_count_for_ipv4() -> None:
    assert sockets_on(TCP6, "10.96.0.12", 80) == {555, 666}
    assert sockets_on(TCP6, "2001:db8::1", 80) == {555, 777}
