"""A gratuitous ARP from a new Pod's interface. The pod CIDR hands a freed address
to the next Pod at once, and the node and other Pods may still map it to the old
Pod's MAC: they would send to it until their entry went stale, for up to tens of
seconds. An unsolicited ARP for the address updates every existing entry (Linux
updates entries from one, and with `arp_accept` off never creates them)."""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
from ipaddress import IPv4Address

from localcluster.namespaces import socket_in_namespace
from mesh.errors import MeshError

log = logging.getLogger(__name__)

ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6


def frame(mac: bytes, ip: IPv4Address) -> bytes:
    """An Ethernet broadcast ARP request for `ip` from `ip` itself (RFC 5227's
    announcement)."""
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, ip.packed, b"\x00" * 6,
                      ip.packed)
    return BROADCAST + mac + struct.pack("!H", ETH_P_ARP) + arp


def announce(netns: str, ifname: str, ip: IPv4Address) -> None:
    """Send the announcement on `ifname` in `netns`; a failure is logged, never raised:
    without it, traffic to the Pod may only start later."""
    try:
        sock = socket_in_namespace(netns, socket.AF_PACKET, socket.SOCK_RAW,
                                   socket.htons(ETH_P_ARP))
    except (OSError, MeshError) as e:
        log.warning("gratuitous arp not sent netns=%s ip=%s cause=%s", netns, ip, e)
        return
    with contextlib.closing(sock):
        try:
            sock.bind((ifname, 0))
            mac = sock.getsockname()[4]
            sock.send(frame(mac, ip))
        except OSError as e:
            log.warning("gratuitous arp not sent netns=%s ip=%s cause=%s", netns, ip, e)
