"""Guest network configuration over netlink (pyroute2).

What UpdateInterface, UpdateRoutes, ListInterfaces, ListRoutes and AddARPNeighbors
do (reference/kata-agent-api.md §10; iptables is kagent.iptables).  Every method
blocks on netlink round trips: the service calls them with asyncio.to_thread,
never on the event loop.

Sockets: one short-lived IPRoute per call.  A call costs ~3 ms here, the host
sends a handful per pod, and nothing is shared between executor threads or left
half-broken after an error (an overrun netlink socket, a pyroute2 event loop
bound to a dead thread).  Calls on one ``Network`` are serialised by a lock, so
two UpdateInterface calls never interleave their rename swaps.

Namespaces: ``Network(netns=...)`` (a name under /run/netns or a path) does its
work in a fresh thread that setns()'d into that namespace, so the netlink socket
and the /proc/sys/net reads belong to it (kagent.iptables runs its children the
same way); the agent's own threads never change namespace.  The agent uses
netns=None (the namespace it runs in); tests pass the namespace they created.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import ipaddress
import os
import re
import socket
import threading
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from kagent import log as klog
from kagent.errors import (
    AgentError,
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
    Unimplemented,
)
from kagent.protocols import agent_pb2, types_pb2

if TYPE_CHECKING:
    from pyroute2 import IPRoute

_log = klog.get_logger("network")
T = TypeVar("T")

IFF_UP = 0x1
IFF_NOARP = 0x80
NUD_PERMANENT = 0x80
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RTPROT_BOOT = 3
RTNH_F_ONLINK = 0x4
CLONE_NEWNET = 0x40000000
IFNAMSIZ = 16
NETNS_RUN_DIR = "/run/netns"

WaitForDevice = Callable[[str, float], str]  # (PCI path, timeout s) -> interface name

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")

# netlink errno -> domain error; anything else is INTERNAL with the kernel's words.
_ERRNO_ERRORS: dict[int, type[AgentError]] = {
    errno.ENODEV: NotFound, errno.ENOENT: NotFound, errno.ESRCH: NotFound,
    errno.EEXIST: AlreadyExists,
    errno.EINVAL: InvalidArgument, errno.ERANGE: InvalidArgument,
    errno.EADDRNOTAVAIL: InvalidArgument, errno.EAFNOSUPPORT: InvalidArgument,
    errno.ENETUNREACH: InvalidArgument, errno.EHOSTUNREACH: InvalidArgument,
    errno.EPERM: PermissionDenied, errno.EACCES: PermissionDenied,
    errno.EOPNOTSUPP: Unimplemented, errno.EBUSY: Unavailable,
}


def _netlink_error() -> type[Exception]:
    # pyroute2 takes ~80 ms to import: the first network call loads it, not the agent's start.
    from pyroute2.netlink.exceptions import NetlinkError

    return NetlinkError


@contextmanager
def _op(what: str, *, ignore: tuple[int, ...] = ()):
    """Turn a netlink failure of ``what`` into a domain error that names it."""
    try:
        yield
    except _netlink_error() as exc:
        if exc.code in ignore:
            return
        reason = os.strerror(exc.code) if exc.code > 0 else "netlink error"
        detail = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], str) else ""
        if detail and detail != reason:  # the kernel's extended ack says which part it refused
            reason = f"{detail} ({reason})"
        raise _ERRNO_ERRORS.get(exc.code, AgentError)(f"{what}: {reason}") from None
    except OSError as exc:
        if exc.errno in ignore:
            return
        raise _ERRNO_ERRORS.get(exc.errno or 0, AgentError)(f"{what}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class _Link:
    index: int
    name: str
    mac: str
    flags: int
    mtu: int
    kind: str


def _links(ipr: IPRoute) -> list[_Link]:
    with _op("list links"):
        msgs = ipr.get_links()
    out = []
    for m in msgs:
        info = m.get("IFLA_LINKINFO")
        out.append(_Link(m["index"], m.get("IFLA_IFNAME") or "", (m.get("IFLA_ADDRESS") or "").lower(),
                         m["flags"], m.get("IFLA_MTU") or 0, (info.get("IFLA_INFO_KIND") if info else None) or ""))
    return out


# -- parsing: every field is checked before anything is changed ------------------------------

def _parse_mac(text: str, what: str) -> str:
    mac = text.strip().lower().replace("-", ":")
    if not _MAC.match(mac):
        raise InvalidArgument(f"{what}: {text!r} is not a MAC address")
    return mac


def _check_ifname(name: str) -> None:
    if len(name) >= IFNAMSIZ or name in (".", "..") or any(c in name for c in "/: \t\n"):
        raise InvalidArgument(f"{name!r} is not a valid interface name (at most {IFNAMSIZ - 1} characters, no '/', ':' or spaces)")


def _parse_ip_address(a: types_pb2.IPAddress, what: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    if not a.address:
        raise InvalidArgument(f"{what}: an IP address is empty")
    if not a.mask.isdigit():
        raise InvalidArgument(f"{what}: address {a.address} has mask {a.mask!r}, not a prefix length")
    try:
        return ipaddress.ip_interface(f"{a.address}/{a.mask}")
    except ValueError as exc:
        raise InvalidArgument(f"{what}: bad address {a.address}/{a.mask}: {exc}") from None


def _ip(text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise InvalidArgument(f"{what}: {text!r} is not an IP address") from None


@dataclass(frozen=True)
class _RouteSpec:
    family: int
    dest: ipaddress.IPv4Network | ipaddress.IPv6Network
    gateway: str
    device: str
    src: ipaddress.IPv4Network | ipaddress.IPv6Network | None  # RTA_SRC, a source prefix
    prefsrc: str
    scope: int
    flags: int
    mtu: int

    def __str__(self) -> str:
        text = str(self.dest)
        text += f" via {self.gateway}" if self.gateway else ""
        text += f" dev {self.device}" if self.device else ""
        return text


def _parse_route(r: types_pb2.Route) -> _RouteSpec:
    what = f"route {r.dest or 'default'}"
    gateway = _ip(r.gateway, what) if r.gateway else None
    dest = None
    if r.dest:
        try:
            dest = ipaddress.ip_network(r.dest, strict=False)  # the kernel wants host bits clear
        except ValueError:
            raise InvalidArgument(f"{what}: {r.dest!r} is not an address or CIDR") from None
    src = None
    prefsrc = None
    if r.source:
        # "a.b.c.d/N" with N > 0 is a source prefix (RTA_SRC); a bare address (what the Go
        # runtime sends, taken from the route's preferred source) or "/0" is PREFSRC.
        try:
            si = ipaddress.ip_interface(r.source)
        except ValueError:
            raise InvalidArgument(f"{what}: source {r.source!r} is not an address or CIDR") from None
        if "/" in r.source and si.network.prefixlen > 0:
            src = si.network
        else:
            prefsrc = si.ip
    # The family field defaults to v4 on the wire, so a v6 route whose sender left it out
    # is recognised by its addresses; a real contradiction is an error.
    versions = {x.version for x in (dest, gateway, src, prefsrc) if x is not None}
    if len(versions) > 1:
        raise InvalidArgument(f"{what}: mixes IPv4 and IPv6 addresses")
    version = versions.pop() if versions else (6 if r.family == types_pb2.v6 else 4)
    if r.family == types_pb2.v6 and version == 4:
        raise InvalidArgument(f"{what}: family is v6 but the addresses are IPv4")
    if dest is None:
        dest = ipaddress.ip_network("::/0" if version == 6 else "0.0.0.0/0")
    if r.scope > 255:
        raise InvalidArgument(f"{what}: scope {r.scope} is out of range (0-255)")
    if r.device:
        _check_ifname(r.device)
    return _RouteSpec(socket.AF_INET6 if version == 6 else socket.AF_INET, dest,
                      str(gateway) if gateway else "", r.device, src,
                      str(prefsrc) if prefsrc else "", r.scope, r.flags, r.mtu)


# -- namespaces ----------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def run_in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """``fn()`` in network namespace ``netns`` (a name under /run/netns or a path; None:
    the caller's own, where it simply runs).

    Otherwise it runs in a new thread that joined the namespace: setns(CLONE_NEWNET)
    changes only the calling thread, so the caller's (and the executor's) threads stay
    where they were, while sockets ``fn`` opens and children it forks belong to ``netns``.
    """
    if netns is None:
        return fn()
    path = netns if "/" in netns else os.path.join(NETNS_RUN_DIR, netns)
    result: list[Any] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise NotFound(f"network namespace {path} does not exist") from None
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise _ERRNO_ERRORS.get(err, AgentError)(f"setns({path}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    t = threading.Thread(target=run, name="kagent-netns")
    t.start()
    t.join()
    if failure:
        raise failure[0]
    return result[0]


@contextmanager
def _iproute():
    # pyroute2 drives its socket with an asyncio loop of its own in this thread.  Give it a
    # stdlib loop explicitly: under a uvloop policy it would get a uvloop loop, which cannot
    # open AF_NETLINK datagram endpoints.
    from pyroute2 import IPRoute

    loop = asyncio.SelectorEventLoop()
    try:
        with IPRoute(use_event_loop=loop, ext_ack=True) as ipr:
            yield ipr
        loop.run_until_complete(asyncio.sleep(0))  # let the transport finish closing
    finally:
        loop.close()


def _ipv6_disabled() -> bool:
    """IPv6 is off when both all/ and default/ disable_ipv6 say so (or the kernel has none).

    /proc/sys/net shows the namespace of the thread that opens it: call this in the right one.
    """
    for key in ("all", "default"):
        try:
            with open(f"/proc/sys/net/ipv6/conf/{key}/disable_ipv6") as f:
                if f.read().strip() == "0":
                    return False
        except FileNotFoundError:
            return True
    return True


# -- the library ---------------------------------------------------------------------------

class Network:
    """Network configuration of one network namespace (None: the caller's own)."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._lock = threading.Lock()

    def _netlink(self, fn: Callable[[IPRoute], T]) -> T:
        def work() -> T:
            with _iproute() as ipr:
                return fn(ipr)

        with self._lock:
            return run_in_netns(self.netns, work)

    # -- interfaces ----------------------------------------------------------------------

    def update_interface(self, iface: types_pb2.Interface, *, wait_for_device: WaitForDevice | None = None,
                         timeout: float = 3.0) -> types_pb2.Interface:
        """Configure one NIC as the host describes it; returns ``iface`` unchanged (as upstream)."""
        if not (iface.hwAddr or iface.name or iface.devicePath):
            raise InvalidArgument("the interface has no hwAddr, name or devicePath to find it by")
        what = f"interface {iface.name or iface.hwAddr or iface.devicePath}"
        mac = _parse_mac(iface.hwAddr, what) if iface.hwAddr else ""
        if iface.name:
            _check_ifname(iface.name)
        addrs = [_parse_ip_address(a, what) for a in iface.IPAddresses]
        if iface.mtu > 0xFFFFFFFF:
            raise InvalidArgument(f"{what}: mtu {iface.mtu} is out of range")
        dev_name = ""
        if iface.devicePath:
            if wait_for_device is None:
                raise Unimplemented("waiting for a PCI network device needs the device layer")
            dev_name = wait_for_device(iface.devicePath, timeout)  # outside the lock: it may block
        self._netlink(lambda ipr: self._update_interface(ipr, iface, mac, addrs, dev_name))
        _log.info("interface updated", name=iface.name, hwaddr=mac, mtu=iface.mtu,
                  addresses=[str(a) for a in addrs])
        return iface

    def _update_interface(self, ipr: IPRoute, iface: types_pb2.Interface, mac: str,
                          addrs: list, dev_name: str) -> None:
        links = _links(ipr)
        link = next((x for x in links if mac and x.mac == mac), None)
        if link is None:
            # Not found by MAC: the device the host named (by PCI path, else by name) gets the
            # MAC (VFIO and VM-template cases), or it is simply found by name.
            name = dev_name or iface.name
            link = next((x for x in links if name and x.name == name), None)
            if link is None:
                raise NotFound(f"no link has MAC {mac!r}" + (f" and none is named {name!r}" if name else ""))
            if mac:
                with _op(f"set MAC {mac} on {link.name}"):
                    if link.flags & IFF_UP:
                        ipr.link("set", index=link.index, state="down")
                    ipr.link("set", index=link.index, address=mac)
                link = _Link(link.index, link.name, mac, link.flags & ~IFF_UP, link.mtu, link.kind)
        target = iface.name or link.name
        if link.flags & IFF_UP and target != link.name:
            # Upstream always takes the link down first.  Only a rename needs it (kernels
            # before 6.2 refuse to rename a running link); staying up otherwise keeps the
            # link's IPv6 addresses, which the kernel drops on down (keep_addr_on_down=0),
            # and spares a carrier flap when the host repeats the call.
            with _op(f"bring {link.name} down"):
                ipr.link("set", index=link.index, state="down")

        ipv6_off = None
        for a in addrs:
            if a.version == 6:
                if ipv6_off is None:
                    ipv6_off = _ipv6_disabled()
                if ipv6_off:
                    _log.warning("IPv6 is disabled: address skipped", name=link.name, address=str(a))
                    continue
            kw: dict[str, Any] = {}
            if a.version == 4 and a.network.prefixlen <= 30:
                kw["broadcast"] = str(a.network.broadcast_address)
            # Existing addresses stay; one the link already has is not an error.
            with _op(f"add address {a} to {link.name}", ignore=(errno.EEXIST,)):
                ipr.addr("add", index=link.index, address=str(a.ip), prefixlen=a.network.prefixlen,
                         family=socket.AF_INET6 if a.version == 6 else socket.AF_INET, **kw)

        other = None
        if target != link.name:
            other = next((x for x in _links(ipr) if x.name == target and x.index != link.index), None)
        if other is not None:
            # Swap: the link holding our name steps aside as <name>_temp, then takes our old name.
            temp = f"{target[:IFNAMSIZ - 1 - len('_temp')]}_temp"
            with _op(f"rename {other.name} to {temp}"):
                if other.flags & IFF_UP:  # older kernels refuse to rename a running link
                    ipr.link("set", index=other.index, state="down")
                ipr.link("set", index=other.index, ifname=temp)
        change: dict[str, Any] = {"index": link.index, "change": IFF_UP | IFF_NOARP,
                                  "flags": IFF_UP | (IFF_NOARP if iface.raw_flags & IFF_NOARP else 0)}
        if target != link.name:
            change["ifname"] = target
        if iface.mtu:
            change["mtu"] = iface.mtu
        try:
            with _op(f"configure {link.name} (name {target}, mtu {iface.mtu or link.mtu})"):
                ipr.link("set", **change)
        except AgentError:
            if other is not None:  # put the other link back as it was, then report the failure
                try:
                    ipr.link("set", index=other.index, ifname=other.name,
                             state="up" if other.flags & IFF_UP else "down")
                except (_netlink_error(), OSError) as exc:
                    _log.warning("cannot restore a renamed link", name=other.name, error=str(exc))
            raise
        if other is not None:
            with _op(f"rename {other.name} to {link.name}"):
                ipr.link("set", index=other.index, ifname=link.name,
                         state="up" if other.flags & IFF_UP else "down")

    def list_interfaces(self) -> agent_pb2.Interfaces:
        """Every link with its addresses.  Beyond upstream, ``type`` (the link kind) and
        ``raw_flags`` (ifi_flags) are filled; devicePath is not known here."""

        def work(ipr: IPRoute) -> agent_pb2.Interfaces:
            links = _links(ipr)
            with _op("list addresses"):
                addr_msgs = ipr.get_addr()
            by_index: dict[int, list[types_pb2.IPAddress]] = {}
            for m in addr_msgs:
                # For IPv4, IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer
                # on point-to-point links).
                addr = m.get("IFA_LOCAL") or m.get("IFA_ADDRESS")
                if addr:
                    by_index.setdefault(m["index"], []).append(types_pb2.IPAddress(
                        family=types_pb2.v6 if m["family"] == socket.AF_INET6 else types_pb2.v4,
                        address=addr, mask=str(m["prefixlen"])))
            return agent_pb2.Interfaces(Interfaces=[
                types_pb2.Interface(name=x.name, hwAddr=x.mac, mtu=x.mtu, type=x.kind, raw_flags=x.flags,
                                    IPAddresses=by_index.get(x.index, []))
                for x in links])

        return self._netlink(work)

    # -- routes --------------------------------------------------------------------------

    def update_routes(self, routes: Iterable[types_pb2.Route]) -> agent_pb2.Routes:
        """Add (replace) routes, those without a gateway first; existing routes stay.
        Returns the main table afterwards."""
        specs = [_parse_route(r) for r in routes]
        ordered = [s for s in specs if not s.gateway] + [s for s in specs if s.gateway]

        def work(ipr: IPRoute) -> agent_pb2.Routes:
            index = {x.name: x.index for x in _links(ipr)}
            for s in ordered:
                kw: dict[str, Any] = {"family": s.family, "table": RT_TABLE_MAIN, "type": RTN_UNICAST,
                                      "proto": RTPROT_BOOT, "scope": s.scope, "flags": s.flags,
                                      "dst_len": s.dest.prefixlen}
                if s.dest.prefixlen:
                    kw["dst"] = str(s.dest.network_address)
                if s.device:
                    if s.device not in index:
                        raise NotFound(f"route {s}: no link named {s.device!r}")
                    kw["oif"] = index[s.device]
                if s.gateway:
                    kw["gateway"] = s.gateway
                if s.src is not None:
                    kw["src"], kw["src_len"] = str(s.src.network_address), s.src.prefixlen
                if s.prefsrc:
                    kw["prefsrc"] = s.prefsrc
                if s.mtu:
                    kw["metrics"] = {"mtu": s.mtu}
                with _op(f"add route {s}", ignore=(errno.EEXIST,)):
                    ipr.route("replace", **kw)
            return self._list_routes(ipr)

        result = self._netlink(work)
        _log.info("routes updated", count=len(specs))
        return result

    def list_routes(self) -> agent_pb2.Routes:
        """The main table, v4 then v6.

        Unlike upstream, ``dest`` is always the real "addr/prefix" ("0.0.0.0/0" or "::/0"
        for a default route) rather than "0.0.0.0"/"::1" for every gateway route, ``family``
        is set, a route without a destination is listed, ``source`` falls back to the
        preferred source (a bare address, as UpdateRoutes takes it) and ``flags`` carries
        RTNH_F_ONLINK.  The host runtime only logs this list; these keep it true and
        usable as UpdateRoutes input.
        """
        return self._netlink(self._list_routes)

    def _list_routes(self, ipr: IPRoute) -> agent_pb2.Routes:
        names = {x.index: x.name for x in _links(ipr)}
        out = []
        for family in (socket.AF_INET, socket.AF_INET6):
            with _op("list routes"):
                msgs = ipr.get_routes(family=family)
            for m in msgs:
                if (m.get("RTA_TABLE") or m["table"]) != RT_TABLE_MAIN:
                    continue
                r = types_pb2.Route(scope=m["scope"], flags=m["flags"] & RTNH_F_ONLINK,
                                    family=types_pb2.v6 if family == socket.AF_INET6 else types_pb2.v4)
                dst = m.get("RTA_DST") or ("::" if family == socket.AF_INET6 else "0.0.0.0")
                r.dest = f"{dst}/{m['dst_len']}"
                r.gateway = m.get("RTA_GATEWAY") or ""
                if m.get("RTA_SRC"):
                    r.source = f"{m.get('RTA_SRC')}/{m['src_len']}"
                else:
                    r.source = m.get("RTA_PREFSRC") or ""
                oif = m.get("RTA_OIF")
                if oif is not None:
                    r.device = names.get(oif, "")
                metrics = m.get("RTA_METRICS")
                if metrics is not None:
                    r.mtu = metrics.get("RTAX_MTU") or 0
                out.append(r)
        return agent_pb2.Routes(Routes=out)

    # -- neighbours ----------------------------------------------------------------------

    def add_arp_neighbors(self, neighbors: Iterable[types_pb2.ARPNeighbor]) -> None:
        """Add (replace) neighbour entries; state 0 means PERMANENT."""
        entries = []
        for n in neighbors:
            if not n.toIPAddress.address:
                raise InvalidArgument(f"ARP neighbour on {n.device or '?'}: no IP address")
            what = f"ARP neighbour {n.toIPAddress.address} on {n.device or '?'}"
            ip = _ip(n.toIPAddress.address, what)
            if not n.device:
                raise InvalidArgument(f"{what}: no device")
            _check_ifname(n.device)
            lladdr = _parse_mac(n.lladdr, what) if n.lladdr else ""
            if not 0 <= n.state <= 0xFFFF or not 0 <= n.flags <= 0xFF:
                raise InvalidArgument(f"{what}: state {n.state} / flags {n.flags} out of range")
            entries.append((what, ip, n.device, lladdr, n.state or NUD_PERMANENT, n.flags))

        def work(ipr: IPRoute) -> None:
            index = {x.name: x.index for x in _links(ipr)}
            for what, ip, device, lladdr, state, flags in entries:
                if device not in index:
                    raise NotFound(f"{what}: no link named {device!r}")
                kw: dict[str, Any] = {"ifindex": index[device], "dst": str(ip), "state": state, "flags": flags,
                                      "family": socket.AF_INET6 if ip.version == 6 else socket.AF_INET}
                if lladdr:
                    kw["lladdr"] = lladdr
                with _op(f"add {what}"):
                    ipr.neigh("replace", **kw)

        self._netlink(work)
        _log.info("ARP neighbours added", count=len(entries))
