"""GetIPTables / SetIPTables: iptables-save and iptables-restore (ip6tables-* for IPv6).

The tools are children run with subprocess.run from a worker thread (the service
uses asyncio.to_thread): the event loop's subprocess API is off limits, because
uvloop keeps SIGCHLD for itself.  With a network namespace given, the child is
forked from a thread that joined it (kagent.network.run_in_netns), so it sees that
namespace's tables only.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

from kagent import log as klog
from kagent.errors import AgentError, DeadlineExceeded, FailedPrecondition, InvalidArgument
from kagent.network import run_in_netns

_log = klog.get_logger("network")

SEARCH_DIRS = ("/usr/sbin", "/sbin")  # looked in before PATH, as upstream
TIMEOUT = 30.0  # seconds; iptables-restore itself waits up to 5 s for the xtables lock
# iptables-restore's exit statuses for rules it refuses (xtables.h): OTHER_PROBLEM (a line that
# did not parse or commit), PARAMETER_PROBLEM (an unknown chain, target, option...)
_RULES_REFUSED = (1, 2)


class _Failed(AgentError):
    """A tool exited non-zero (INTERNAL unless the caller knows better)."""

    def __init__(self, argv: list[str], returncode: int, stderr: bytes) -> None:
        # its usage hint ("Try `iptables-restore -h' ...") is no help to the host
        lines = [line.strip() for line in stderr.decode(errors="replace").splitlines()]
        self.detail = "; ".join(line for line in lines if line and not line.startswith("Try `")) \
            or f"exit status {returncode}"
        self.returncode = returncode
        super().__init__(f"{' '.join(argv)} failed: {self.detail}")


class IPTables:
    def __init__(self, netns: str | None = None, *, search: Sequence[str] | None = None) -> None:
        self.netns = netns
        # Directories searched for the tools; None: /usr/sbin, /sbin, then PATH.
        self.search = None if search is None else tuple(search)

    def get(self, is_ipv6: bool) -> bytes:
        """What iptables-save (ip6tables-save) prints."""
        return self._exec([self._tool("ip6tables-save" if is_ipv6 else "iptables-save")], b"")

    def set(self, is_ipv6: bool, data: bytes) -> bytes:
        """Feed ``data`` to iptables-restore (ip6tables-restore); returns what it printed."""
        tool = self._tool("ip6tables-restore" if is_ipv6 else "iptables-restore")
        try:
            out = self._exec([tool, "--wait", "5"], data)
        except _Failed as exc:
            if exc.returncode not in _RULES_REFUSED:
                raise
            # the rules are the host's: what iptables-restore says tells it what to fix
            raise InvalidArgument(f"{os.path.basename(tool)} refused the rules: {exc.detail}") from None
        _log.info("iptables restored", ipv6=is_ipv6, size=len(data))
        return out

    def _tool(self, name: str) -> str:
        dirs = self.search
        if dirs is None:
            dirs = (*SEARCH_DIRS, *(d for d in os.environ.get("PATH", "").split(os.pathsep) if d))
        for d in dirs:
            path = os.path.join(d, name)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
        raise FailedPrecondition(f"{name} is not installed in the guest (looked in {', '.join(dirs) or 'nowhere'})")

    def _exec(self, argv: list[str], data: bytes) -> bytes:
        def run() -> subprocess.CompletedProcess:
            try:
                return subprocess.run(argv, input=data, capture_output=True, timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                raise DeadlineExceeded(f"{argv[0]} did not finish within {TIMEOUT:g}s") from None
            except OSError as exc:
                raise FailedPrecondition(f"cannot run {argv[0]}: {exc.strerror or exc}") from None

        res = run_in_netns(self.netns, run)
        if res.returncode != 0:
            raise _Failed(argv, res.returncode, res.stderr)
        return res.stdout


def get_iptables(is_ipv6: bool, netns: str | None = None) -> bytes:
    return IPTables(netns).get(is_ipv6)


def set_iptables(is_ipv6: bool, data: bytes, netns: str | None = None) -> bytes:
    return IPTables(netns).set(is_ipv6, data)
