"""One exception family for the whole library.

Every message is a single line that says what is wrong and what to do about it; the CLI shows
it verbatim (exit 1). Foreign exceptions (bcc's bare ``Exception``, pyroute2's ``NetlinkError``,
``OSError`` from subprocesses) are wrapped at the boundary where they occur.
"""


class HybridError(Exception):
    """Base class. ``errno`` is kept when the failure came from a system call."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class PrivilegeError(HybridError):
    """Missing root / CAP_NET_ADMIN / CAP_BPF."""


class KernelFeatureError(HybridError):
    """The running kernel lacks something hybrid needs (XDP, clsact, NFQUEUE, bpffs, ...)."""


class ToolMissingError(HybridError):
    """A userspace tool (iptables, ip, iperf3, ...) is not installed."""


class ConfigError(HybridError):
    """Bad user input: an option value, a rules or configuration file."""


class NotFoundError(HybridError):
    """An interface, namespace or attachment that was named does not exist."""


class TableFullError(HybridError):
    """A kernel table that does not evict (hybrid_pinned) refused an insert: full."""
