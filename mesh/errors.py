"""The root of meshgate's exception tree.

Every error a person may see derives from `MeshError`; its message names the
object involved and what to do next. Foreign exceptions are translated at the
boundary where they enter meshgate code.
"""


class MeshError(Exception):
    """Base class of every meshgate error."""


class ConfigError(MeshError):
    """A configuration file, flag or payload is invalid; the message names the field."""


class ProtocolError(MeshError):
    """Bytes on the wire do not follow the protocol that was expected."""


class IdentityError(MeshError):
    """A certificate, token or peer identity could not be obtained or verified."""


class ConnectError(MeshError):
    """A peer could not be reached: the connection was refused, reset or not made in time."""


class DiscoveryError(MeshError):
    """Service discovery data could not be obtained or is inconsistent."""


class NetlinkError(MeshError):
    """A route, address or namespace operation failed."""


class CrdError(MeshError):
    """meshgate's CustomResourceDefinitions could not be read or installed."""


class ResolverError(MeshError):
    """A host's resolver configuration (/etc/resolv.conf, systemd-resolved) could not be
    read, changed or restored; the message names the file or line and what to do."""
