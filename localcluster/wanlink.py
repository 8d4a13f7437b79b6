"""Distance and partitions on the WAN: each member's link shape.

A member of a WAN (a cluster's node, or a VM; localcluster.wan) sits on it through a
veth pair: its own side (``wan0`` on a node, ``eth0`` on a VM) and the WAN side, a
port of the WAN's bridge. This module shapes that pair.

Netem (delay, jitter, loss) is the root qdisc on BOTH ends, each shaping what it
sends: the member's side delays what the member sends to the WAN, the WAN side what
the WAN sends to the member. So a member with delay D is D away from the WAN's
core in each direction: one way from A to B takes D(A) + D(B), a round trip
2·D(A) + 2·D(B), and loss P drops P% of the packets in each direction through the
link. Jitter varies each packet's delay by up to ± J (netem's uniform default), so
packets may be reordered, as on a real path.

A partition sets the WAN side of the pair down. The member's side loses its
carrier and sends nothing; nothing reaches it; no one answers with a reset. A
connection being made times out (or fails with "no route to host" once the
neighbour entry fails); an established one retransmits into the void and, healed
in time, carries on where it stopped. Netem loss of 100% would do the same to
data, but a link that is down is also what a real partition looks like to the
member. Healing sets the link up and applies its netem again.

Settings are recorded per member in the WAN's record (localcluster.wan), written
once the kernel has them; a change the kernel refuses puts the link back as it was.
`converge` (called by `cluster up` again, after a crash) makes a link as recorded,
and localcluster.wan makes a partitioned member's link again partitioned.
"""

from __future__ import annotations

import errno
import logging
import math
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError as PyrouteNetlinkError

from localcluster import namespaces
from localcluster import wan as wan_topology
from localcluster.wan import MemberRef, Netem, WanError
from mesh.errors import ConfigError

log = logging.getLogger(__name__)

TC_H_ROOT = 0xFFFFFFFF
MAX_DELAY_MS = 60_000.0
"""Netem keeps a delay in 32 bits of scheduler ticks; a minute is far inside."""
# A sign is parsed so that a negative value is refused by name, not as a typo.
_DURATION = re.compile(r"(?P<value>-?\d+(?:\.\d+)?)(?P<unit>us|ms|s)")
_PERCENT = re.compile(r"(?P<value>-?\d+(?:\.\d+)?)%?")
_MS_PER = {"us": 0.001, "ms": 1.0, "s": 1000.0}


NO_NETEM = Netem()


class NetemUnavailableError(WanError):
    """The kernel has no netem queueing discipline."""


class UnknownMemberError(WanError):
    """No cluster or VM of that name is on the WAN."""


# --- parsing and validation (pure) ---------------------------------------------------------


def parse_duration_ms(text: str, *, flag: str) -> float:
    """`text` ("30ms", "1s", "250us", "1.5ms", or "0") in milliseconds."""
    text = text.strip()
    if text == "0":
        return 0.0
    found = _DURATION.fullmatch(text)
    if found is None:
        raise ConfigError(f"{flag} {text!r} is not a duration; give a number and a unit "
                          "(us, ms, s): 30ms, 1.5s, 500us, or 0 for none")
    return float(found["value"]) * _MS_PER[found["unit"]]


def parse_loss_pct(text: str, *, flag: str) -> float:
    """`text` ("0.5%", "0.5", "100%") as a percentage."""
    found = _PERCENT.fullmatch(text.strip())
    if found is None:
        raise ConfigError(f"{flag} {text!r} is not a percentage; give a number from 0 to "
                          "100, with or without %: 0.5%, 100%, or 0 for none")
    return float(found["value"])


def _flags(prefix: str) -> tuple[str, str, str]:
    delay, jitter, loss = (f"--{prefix}{n}" for n in ("delay", "jitter", "loss"))
    return delay, jitter, loss


def check_values(*, delay_ms: float | None = None, jitter_ms: float | None = None,
                 loss_pct: float | None = None, flag_prefix: str = "") -> None:
    """Each value given within what netem takes, each on its own. `flag_prefix` ("wan-"
    for `cluster up`) makes the errors name the flags as the caller spelled them."""
    delay, jitter, loss = _flags(flag_prefix)
    for flag, value in ((delay, delay_ms), (jitter, jitter_ms), (loss, loss_pct)):
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{flag} must be a finite number, not {value}")
    if delay_ms is not None and delay_ms < 0:
        raise ConfigError(f"{delay} {delay_ms:g}ms is negative; give 0 (none) or more")
    if delay_ms is not None and delay_ms > MAX_DELAY_MS:
        raise ConfigError(f"{delay} {delay_ms:g}ms is more than netem holds; give at most "
                          f"{MAX_DELAY_MS / 1000:g}s")
    if jitter_ms is not None and jitter_ms < 0:
        raise ConfigError(f"{jitter} {jitter_ms:g}ms is negative; give 0 (none) or more")
    if jitter_ms is not None and jitter_ms > MAX_DELAY_MS:
        raise ConfigError(f"{jitter} {jitter_ms:g}ms is more than netem holds; give at most "
                          f"{MAX_DELAY_MS / 1000:g}s")
    if loss_pct is not None and not 0 <= loss_pct <= 100:
        raise ConfigError(f"{loss} {loss_pct:g}% is outside 0..100%; give a percentage "
                          "such as 0.5%")
    if delay_ms == 0 and jitter_ms:
        raise ConfigError(f"{jitter} {jitter_ms:g}ms needs a delay to vary, and {delay} is 0; "
                          f"give a {delay} (or {jitter} 0)")


def settings(current: Netem = NO_NETEM, *, delay_ms: float | None = None,
             jitter_ms: float | None = None, loss_pct: float | None = None,
             flag_prefix: str = "") -> Netem:
    """`current` with the values given (None keeps one), checked. A delay set to 0
    clears the jitter too, unless a jitter is given; a jitter needs a delay."""
    check_values(delay_ms=delay_ms, jitter_ms=jitter_ms, loss_pct=loss_pct,
                 flag_prefix=flag_prefix)
    delay, jitter, _ = _flags(flag_prefix)
    new_delay = current.delay_ms if delay_ms is None else delay_ms
    new_jitter = current.jitter_ms if jitter_ms is None else jitter_ms
    if delay_ms == 0 and jitter_ms is None:
        new_jitter = 0.0
    if new_jitter and not new_delay:
        raise ConfigError(f"{jitter} {new_jitter:g}ms needs a delay to vary; give {delay} "
                          f"too (or {jitter} 0)")
    return Netem(delay_ms=new_delay, jitter_ms=new_jitter,
                 loss_pct=current.loss_pct if loss_pct is None else loss_pct)


def describe(netem: Netem) -> str:
    """As `tc` prints it: "delay 30ms 2ms loss 0.5%", or "none"."""
    if netem.empty:
        return "none"
    parts = []
    if netem.delay_ms:
        parts.append(f"delay {netem.delay_ms:g}ms")
        if netem.jitter_ms:
            parts.append(f"{netem.jitter_ms:g}ms")
    if netem.loss_pct:
        parts.append(f"loss {netem.loss_pct:g}%")
    return " ".join(parts)


def tc_options(netem: Netem) -> dict[str, Any]:
    """pyroute2's netem arguments: delay and jitter in whole microseconds, loss in
    percent."""
    return {"delay": round(netem.delay_ms * 1000), "jitter": round(netem.jitter_ms * 1000),
            "loss": netem.loss_pct}


def resolve(members: list[MemberRef], name: str, *, wan: str) -> MemberRef:
    """The member `name` ("east", or "cluster/east", "vm/db" when a cluster and a VM
    share a name) of the WAN whose members are `members`."""
    kind, sep, bare = name.partition("/")
    if not sep:
        kind, bare = "", name
    elif kind not in ("cluster", "vm"):
        raise ConfigError(f"member {name!r}: say cluster/NAME or vm/NAME, or just NAME")
    found = [m for m in members if m.name == bare and kind in ("", m.kind)]
    if len(found) == 1:
        return found[0]
    if found:
        raise ConfigError(f"both a cluster and a VM are called {bare!r} on the WAN "
                          f"{wan!r}; say cluster/{bare} or vm/{bare}")
    there = ", ".join(f"{m.holder} ({m.address})" for m in members) or "none"
    raise UnknownMemberError(f"the WAN {wan!r} has no member {name!r}; its members: "
                             f"{there}")


# --- netlink -------------------------------------------------------------------------------


def _shape(netns: str, ifname: str, netem: Netem, *, holder: str) -> None:
    """The root qdisc of `ifname` in `netns`: netem as given, or none (the veth's
    default) for empty settings."""
    action = f"shape {ifname} of {holder} ({describe(netem)})"
    with namespaces.iproute(netns, action) as ipr:
        index = namespaces.link_index(ipr, ifname)
        if index is None:
            raise WanError(f"{holder} has no {ifname} in {netns!r}; `cluster up` it again "
                           "(or delete and create the VM) to make its link")
        if netem.empty:
            roots = [q for q in ipr.get_qdiscs(index=index) if q["parent"] == TC_H_ROOT]
            if any(q.get_attr("TCA_KIND") == "netem" for q in roots):
                ipr.tc("del", index=index, parent=TC_H_ROOT)
            return
        try:
            ipr.tc("replace", kind="netem", index=index, **tc_options(netem))
        except PyrouteNetlinkError as e:
            if e.code == errno.ENOENT:
                raise NetemUnavailableError(
                    f"cannot {action}: this kernel has no netem queueing discipline "
                    "(CONFIG_NET_SCH_NETEM); `modprobe sch_netem`, or run on a kernel "
                    "built with it") from None
            raise


def _set_peer(wan_netns: str, ref: MemberRef, *, up: bool) -> None:
    with namespaces.iproute(wan_netns, f"{'heal' if up else 'partition'} {ref.holder}") as w:
        index = namespaces.link_index(w, ref.peer)
        if index is None:
            raise WanError(f"{ref.holder} has no link on the WAN ({ref.peer} in "
                           f"{wan_netns!r}); `cluster up` it again (or delete and create the "
                           "VM) to make it")
        w.link("set", index=index, state="up" if up else "down")


def _apply(wan_netns: str, ref: MemberRef) -> None:
    """Make `ref`'s link as `ref` says: netem on both ends, the WAN side up or down."""
    _shape(ref.node_netns, ref.node_ifname, ref.netem, holder=ref.holder)
    _shape(wan_netns, ref.peer, ref.netem, holder=ref.holder)
    _set_peer(wan_netns, ref, up=not ref.partitioned)


def _change(wan: str, member: str, update: Callable[[MemberRef], MemberRef]) -> MemberRef:
    """Under the WAN's lock: `member` as `update` makes it, in the kernel, then recorded."""
    namespaces.require_off_event_loop(f"changing {member!r} on the WAN {wan!r}")
    namespaces.require_privileges()
    with wan_topology.editing(wan) as edit:
        old = resolve(edit.members, member, wan=wan)
        new = update(old)
        try:
            _apply(edit.netns, new)
        except BaseException as e:
            try:
                _apply(edit.netns, old)
            except WanError as undo:
                e.add_note(f"putting {old.holder}'s link back as it was also failed: {undo}")
            raise
        edit.record(new)
    log.info("wan link changed wan=%s %s=%s netem=%r partitioned=%s", wan, new.kind,
             new.name, describe(new.netem), new.partitioned)
    return new


# --- public operations ---------------------------------------------------------------------


def set_link(wan: str, member: str, *, delay_ms: float | None = None,
             jitter_ms: float | None = None, loss_pct: float | None = None) -> MemberRef:
    """Give `member`'s link on the WAN `wan` the netem settings given (None keeps one;
    0 clears it; all 0 removes the qdisc), on both ends. A partitioned member stays
    partitioned, with them."""
    # Checked before the lock and the privileges, so a bad value is named first.
    check_values(delay_ms=delay_ms, jitter_ms=jitter_ms, loss_pct=loss_pct)
    return _change(wan, member, lambda old: replace(old, netem=settings(
        old.netem, delay_ms=delay_ms, jitter_ms=jitter_ms, loss_pct=loss_pct)))


def partition(wan: str, member: str) -> MemberRef:
    """Cut `member` off the WAN `wan`: its link's WAN side goes down, silently."""
    return _change(wan, member, lambda old: replace(old, partitioned=True))


def heal(wan: str, member: str) -> MemberRef:
    """Put a partitioned `member` back on the WAN `wan`, with its netem; a member that
    is not partitioned is left as it is."""
    return _change(wan, member, lambda old: replace(old, partitioned=False))


def converge(wan: str, member: str) -> MemberRef:
    """Make `member`'s link as recorded (after `cluster up` made it again)."""
    return _change(wan, member, lambda old: old)


def show(wan: str = wan_topology.DEFAULT_WAN) -> list[MemberRef]:
    """Every member of the WAN `wan`, clusters then VMs, with its address, netem and
    partition, as recorded."""
    with wan_topology.editing(wan) as edit:
        return edit.members
