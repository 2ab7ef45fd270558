"""Network configuration against real netlink, in network namespaces each test creates.

Every test gets two fresh namespaces, "test" (where kagent.network works) and "peer",
joined by a veth pair: kv0 in test, kp0 (up) in peer.  Nothing touches the host's links,
routes, neighbours, sysctls or iptables; the namespaces go away in the fixture's finalizer.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import os
import shutil
import socket
import stat
import subprocess
import threading
from types import SimpleNamespace

import pytest
from google.protobuf import empty_pb2
from pyroute2 import IPRoute, netns

from kagent.config import AgentConfig
from kagent.errors import AgentError, FailedPrecondition, InvalidArgument, NotFound, Unimplemented
from kagent.iptables import IPTables
from kagent.network import IFF_NOARP, IFF_UP, NUD_PERMANENT, RTPROT_BOOT, Network
from kagent.protocols import agent_pb2, types_pb2
from kagent.service import build_routes
from kagent.service.network import NetworkService
from kagent.ttrpc.client import Client
from kagent.ttrpc.codes import Code
from kagent.ttrpc.server import Server
from kagent.ttrpc.status import RpcError

pytestmark = pytest.mark.root

_ids = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)


def in_ns(name: str, fn):
    """Run fn in a thread that joined netns ``name`` (children it forks inherit it)."""
    out: list = []

    def run():
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            assert _libc.setns(fd, 0x40000000) == 0, os.strerror(ctypes.get_errno())
        finally:
            os.close(fd)
        try:
            out.append(("ok", fn()))
        except BaseException as exc:
            out.append(("err", exc))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    kind, value = out[0]
    if kind == "err":
        raise value
    return value


class Pair:
    def __init__(self) -> None:
        n = next(_ids)
        self.ns = f"kagt-{os.getpid()}-{n}"
        self.peer = f"kagt-{os.getpid()}-{n}p"

    def query(self, fn, peer: bool = False):
        """fn(ipr) on the test (or peer) namespace, in a thread of its own: pyroute2's
        blocking API runs an event loop, which cannot nest in a test's running loop."""
        out: list = []

        def run():
            try:
                with IPRoute(netns=self.peer if peer else self.ns, flags=0) as ipr:
                    out.append(("ok", fn(ipr)))
            except BaseException as exc:
                out.append(("err", exc))

        t = threading.Thread(target=run)
        t.start()
        t.join()
        kind, value = out[0]
        if kind == "err":
            raise value
        return value

    def link(self, name: str) -> dict | None:
        found = self.query(lambda ipr: ipr.get_links(ifname=name))
        return found[0] if found else None

    def mac(self, name: str) -> str:
        return self.link(name).get("IFLA_ADDRESS")

    def addresses(self, name: str) -> set[str]:
        def get(ipr):
            idx = ipr.link_lookup(ifname=name)[0]
            return {f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=idx)}

        return self.query(get)

    def add_veth(self, name: str, peer_name: str, up: bool = False) -> None:
        def add(ipr):
            ipr.link("add", ifname=name, kind="veth", peer={"ifname": peer_name})
            if up:
                ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")

        self.query(add)

    def neighbours(self) -> dict:
        return self.query(lambda ipr: {n.get("NDA_DST"): n for n in ipr.get_neighbours()})


@pytest.fixture
def pair():
    p = Pair()
    made = []
    try:
        for name in (p.ns, p.peer):
            netns.create(name)
            made.append(name)
        p.query(lambda ipr: ipr.link("add", ifname="kv0", kind="veth",
                                     peer={"ifname": "kp0", "net_ns_fd": p.peer}))
        p.query(lambda ipr: ipr.link("set", index=ipr.link_lookup(ifname="kp0")[0], state="up"), peer=True)
        yield p
    finally:
        for name in made:
            netns.remove(name)


def iface(**kw) -> types_pb2.Interface:
    addrs = kw.pop("addrs", [])
    return types_pb2.Interface(
        IPAddresses=[types_pb2.IPAddress(family=types_pb2.v6 if ":" in a else types_pb2.v4,
                                         address=a.split("/")[0], mask=a.split("/")[1]) for a in addrs],
        **kw)


def by_name(interfaces, name):
    return next(i for i in interfaces.Interfaces if i.name == name)


# -- interfaces -------------------------------------------------------------------------

def test_address_mtu_and_listing(pair):
    net = Network(pair.ns)
    req = iface(name="eth0", hwAddr=pair.mac("kv0").upper(), mtu=1400,
                addrs=["10.7.0.2/24", "2001:db8:1::2/64"])
    assert net.update_interface(req) == req  # upstream returns the request unchanged
    got = by_name(net.list_interfaces(), "eth0")
    assert got.mtu == 1400 and got.hwAddr == pair.mac("eth0") and got.type == "veth"
    assert got.raw_flags & IFF_UP and not got.raw_flags & IFF_NOARP
    assert {(a.family, a.address, a.mask) for a in got.IPAddresses} >= {
        (types_pb2.v4, "10.7.0.2", "24"), (types_pb2.v6, "2001:db8:1::2", "64")}
    assert pair.link("kv0") is None

    # Again, with one more address: existing ones stay, the repeated one is not an error.
    net.update_interface(iface(name="eth0", hwAddr=got.hwAddr, addrs=["10.7.0.2/24", "10.7.1.2/24"]))
    assert {"10.7.0.2/24", "10.7.1.2/24", "2001:db8:1::2/64"} <= pair.addresses("eth0")


def test_mac_not_found_sets_it_on_the_named_link(pair):
    net = Network(pair.ns)
    net.update_interface(iface(name="kv0", hwAddr="02:aa:bb:cc:dd:01", addrs=["10.7.0.2/24"]))
    assert pair.mac("kv0") == "02:aa:bb:cc:dd:01"
    assert "10.7.0.2/24" in pair.addresses("kv0")


def test_rename_swaps_with_the_link_holding_the_name(pair):
    pair.add_veth("eth0", "ethq", up=True)
    ours, theirs = pair.link("kv0")["index"], pair.link("eth0")["index"]
    Network(pair.ns).update_interface(iface(name="eth0", hwAddr=pair.mac("kv0")))
    assert pair.link("eth0")["index"] == ours
    swapped = pair.link("kv0")
    assert swapped["index"] == theirs and swapped["flags"] & IFF_UP  # its old state is kept
    assert pair.link("eth0_temp") is None


def test_failed_configure_puts_the_swapped_link_back(pair):
    pair.add_veth("eth0", "ethq")
    ours, theirs = pair.link("kv0")["index"], pair.link("eth0")["index"]
    with pytest.raises(InvalidArgument, match="configure kv0"):
        Network(pair.ns).update_interface(iface(name="eth0", hwAddr=pair.mac("kv0"), mtu=1_000_000))
    assert pair.link("eth0")["index"] == theirs and pair.link("kv0")["index"] == ours


def test_noarp_follows_raw_flags(pair):
    net = Network(pair.ns)
    mac = pair.mac("kv0")
    net.update_interface(iface(name="kv0", hwAddr=mac, raw_flags=IFF_NOARP))
    assert pair.link("kv0")["flags"] & IFF_NOARP
    net.update_interface(iface(name="kv0", hwAddr=mac, raw_flags=0))
    assert not pair.link("kv0")["flags"] & IFF_NOARP


def test_ipv6_skipped_when_disabled_in_the_namespace(pair):
    def disable():
        for key in ("all", "default"):
            with open(f"/proc/sys/net/ipv6/conf/{key}/disable_ipv6", "w") as f:
                f.write("1")

    in_ns(pair.ns, disable)
    Network(pair.ns).update_interface(iface(name="kv0", hwAddr=pair.mac("kv0"),
                                            addrs=["10.7.0.2/24", "2001:db8:1::2/64"]))
    assert pair.addresses("kv0") == {"10.7.0.2/24"}


def test_device_path_uses_the_waiter_or_is_unimplemented(pair):
    net = Network(pair.ns)
    with pytest.raises(Unimplemented, match="device layer"):
        net.update_interface(iface(devicePath="02/00", hwAddr="02:aa:bb:cc:dd:02", name="eth0"))
    asked = []

    def waiter(path, timeout):  # stands in for the device layer (uevents), another module
        asked.append((path, timeout))
        return "kv0"

    net.update_interface(iface(devicePath="02/00", hwAddr="02:aa:bb:cc:dd:02", name="eth0"),
                         wait_for_device=waiter, timeout=7.0)
    assert asked == [("02/00", 7.0)]
    assert pair.mac("eth0") == "02:aa:bb:cc:dd:02"


def test_interface_errors(pair):
    net = Network(pair.ns)
    with pytest.raises(InvalidArgument, match="no hwAddr, name or devicePath"):
        net.update_interface(types_pb2.Interface())
    with pytest.raises(NotFound, match="02:00:00:00:00:99.*nope0"):
        net.update_interface(iface(name="nope0", hwAddr="02:00:00:00:00:99"))
    with pytest.raises(InvalidArgument, match="10.0.0.300"):
        net.update_interface(iface(name="kv0", addrs=["10.0.0.300/24"]))
    with pytest.raises(InvalidArgument, match="mask 'abc'"):
        net.update_interface(types_pb2.Interface(name="kv0", IPAddresses=[
            types_pb2.IPAddress(address="10.0.0.3", mask="abc")]))
    with pytest.raises(InvalidArgument, match="not a MAC"):
        net.update_interface(iface(name="kv0", hwAddr="zz:00"))
    with pytest.raises(InvalidArgument, match="interface name"):
        net.update_interface(iface(name="a-name-far-too-long", hwAddr=pair.mac("kv0")))
    with pytest.raises(NotFound, match="network namespace"):
        Network("kagt-no-such-ns").list_interfaces()
    assert pair.addresses("kv0") == set()  # nothing was half-applied


# -- routes -----------------------------------------------------------------------------

def route(dest="", gateway="", device="eth0", **kw) -> types_pb2.Route:
    return types_pb2.Route(dest=dest, gateway=gateway, device=device, **kw)


def test_routes_order_default_v6_and_listing(pair):
    net = Network(pair.ns)
    net.update_interface(iface(name="eth0", hwAddr=pair.mac("kv0"),
                               addrs=["10.7.0.2/24", "2001:db8:1::2/64"]))
    routes = [
        # Listed first, but its gateway is only reachable through the next route:
        # this succeeds only if routes without a gateway go in first.
        route("10.20.0.0/16", "10.9.0.1"),
        route("10.9.0.0/24", scope=253, mtu=1300, source="10.7.0.2"),
        route("", "10.7.0.1"),
        route("2001:db8:2::/64", "2001:db8:1::1", family=types_pb2.v6),
    ]
    listed = net.update_routes(routes)
    got = {(r.dest, r.gateway, r.device): r for r in listed.Routes}
    assert ("0.0.0.0/0", "10.7.0.1", "eth0") in got
    assert ("10.20.0.0/16", "10.9.0.1", "eth0") in got
    link_route = got[("10.9.0.0/24", "", "eth0")]
    assert (link_route.mtu, link_route.scope, link_route.source) == (1300, 253, "10.7.0.2")
    assert got[("2001:db8:2::/64", "2001:db8:1::1", "eth0")].family == types_pb2.v6
    assert net.list_routes() == listed

    ours = pair.query(lambda ipr: [r for r in ipr.get_routes(family=socket.AF_INET, table=254)
                                   if r.get("RTA_GATEWAY")])
    assert ours and all(r["proto"] == RTPROT_BOOT for r in ours)

    # Replace mode: the same request again changes nothing and fails nothing.
    assert net.update_routes(routes) == listed


def test_route_errors(pair):
    net = Network(pair.ns)
    net.update_interface(iface(name="eth0", hwAddr=pair.mac("kv0"), addrs=["10.7.0.2/24"]))
    with pytest.raises(NotFound, match="no link named 'nope0'"):
        net.update_routes([route("10.8.0.0/16", device="nope0")])
    with pytest.raises(InvalidArgument, match="route 10.99.0.0/16 via 10.98.0.1 dev eth0"):
        net.update_routes([route("10.99.0.0/16", "10.98.0.1")])  # unreachable gateway
    with pytest.raises(InvalidArgument, match="'bogus'"):
        net.update_routes([route("bogus")])
    with pytest.raises(InvalidArgument, match="mixes IPv4 and IPv6"):
        net.update_routes([route("10.8.0.0/16", "2001:db8::1")])
    assert net.update_routes([]).Routes  # nothing to add: the table as it is


def test_arp_neighbours_permanent(pair):
    net = Network(pair.ns)
    net.update_interface(iface(name="eth0", hwAddr=pair.mac("kv0"), addrs=["10.7.0.2/24", "2001:db8:1::2/64"]))
    net.add_arp_neighbors([
        types_pb2.ARPNeighbor(toIPAddress=types_pb2.IPAddress(address="10.7.0.9"), device="eth0",
                              lladdr="02:00:00:00:00:09"),
        types_pb2.ARPNeighbor(toIPAddress=types_pb2.IPAddress(family=types_pb2.v6, address="2001:db8:1::9"),
                              device="eth0", lladdr="02:00:00:00:00:0A"),
    ])
    neigh = pair.neighbours()
    assert neigh["10.7.0.9"]["state"] == NUD_PERMANENT and neigh["10.7.0.9"].get("NDA_LLADDR") == "02:00:00:00:00:09"
    assert neigh["2001:db8:1::9"]["state"] == NUD_PERMANENT

    with pytest.raises(InvalidArgument, match="no IP address"):
        net.add_arp_neighbors([types_pb2.ARPNeighbor(device="eth0")])
    with pytest.raises(NotFound, match="nope0"):
        net.add_arp_neighbors([types_pb2.ARPNeighbor(toIPAddress=types_pb2.IPAddress(address="10.7.0.8"),
                                                     device="nope0")])


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox is not installed")
def test_ping_between_the_configured_ends(pair):
    Network(pair.ns).update_interface(iface(name="eth0", hwAddr=pair.mac("kv0"), addrs=["10.7.0.2/24"]))
    pair.query(lambda ipr: ipr.addr("add", index=ipr.link_lookup(ifname="kp0")[0], address="10.7.0.1",
                                    prefixlen=24), peer=True)
    res = in_ns(pair.ns, lambda: subprocess.run(
        ["busybox", "ping", "-c", "1", "-W", "3", "10.7.0.1"], capture_output=True, timeout=10))
    assert res.returncode == 0, res.stdout + res.stderr


# -- iptables ---------------------------------------------------------------------------

def fake_tool(directory: str, name: str, body: str) -> None:
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body)
    os.chmod(path, stat.S_IRWXU)


def test_iptables_missing_binary(pair, tmp_path):
    ipt = IPTables(pair.ns, search=[str(tmp_path)])
    with pytest.raises(FailedPrecondition, match="iptables-save is not installed"):
        ipt.get(False)
    with pytest.raises(FailedPrecondition, match="ip6tables-restore is not installed"):
        ipt.set(True, b"*filter\nCOMMIT\n")


def test_iptables_plumbing_with_stand_in_tools(pair, tmp_path):
    # Stand-ins for iptables-save/-restore (not installed on every machine): they show
    # what the agent passes (argv, stdin, namespace) and how it reports a failure.
    d = str(tmp_path)
    fake_tool(d, "ip6tables-save", "echo saved-v6; readlink /proc/self/ns/net\n")
    fake_tool(d, "iptables-restore", 'echo "args: $*"; cat\n')
    fake_tool(d, "ip6tables-restore", "echo 'line 1 failed' >&2; exit 2\n")
    ipt = IPTables(pair.ns, search=[d])
    out = ipt.get(True).decode()
    # The child ran in the test namespace, not the agent's.
    assert out == f"saved-v6\nnet:[{os.stat(f'/run/netns/{pair.ns}').st_ino}]\n"
    assert ipt.set(False, b"*filter\nCOMMIT\n") == b"args: --wait 5\n*filter\nCOMMIT\n"
    with pytest.raises(AgentError, match="line 1 failed") as info:
        ipt.set(True, b"x")
    assert info.value.code == Code.INVALID_ARGUMENT  # exit 2: iptables-restore refused the host's rules


@pytest.mark.skipif(shutil.which("iptables-restore") is None and not os.path.exists("/usr/sbin/iptables-restore"),
                    reason="iptables is not installed")
def test_iptables_real_in_the_test_namespace(pair):
    ipt = IPTables(pair.ns)
    rules = b"*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -s 10.1.2.3/32 -j DROP\nCOMMIT\n"
    ipt.set(False, rules)
    assert b"-A INPUT -s 10.1.2.3/32 -j DROP" in ipt.get(False)
    with pytest.raises(AgentError, match="iptables-restore"):
        ipt.set(False, b"garbage\n")


# -- the RPCs over ttRPC ----------------------------------------------------------------

AGENT = "grpc.AgentService"


async def test_service_over_ttrpc(pair, tmp_sock_dir):
    fake_agent = SimpleNamespace(config=AgentConfig())
    svc = NetworkService(fake_agent, netns=pair.ns)
    # iptables is not installed everywhere: a stand-in iptables-save, and no ip6tables-save.
    fake_tool(tmp_sock_dir, "iptables-save", "echo '*filter'; echo COMMIT\n")
    svc.iptables.search = (tmp_sock_dir,)
    server = Server(build_routes([svc]))
    addr = "unix://" + os.path.join(tmp_sock_dir, "net.sock")
    await server.start(addr)
    try:
        async with await Client.connect(addr) as c:
            mac = pair.mac("kv0")
            req = agent_pb2.UpdateInterfaceRequest(interface=iface(name="eth0", hwAddr=mac, mtu=1450,
                                                                   addrs=["10.7.0.2/24"]))
            assert await c.call(AGENT, "UpdateInterface", req, types_pb2.Interface, timeout=10) == req.interface

            listed = await c.call(AGENT, "ListInterfaces", agent_pb2.ListInterfacesRequest(),
                                  agent_pb2.Interfaces, timeout=10)
            eth0 = by_name(listed, "eth0")
            assert eth0.mtu == 1450 and ("10.7.0.2", "24") in {(a.address, a.mask) for a in eth0.IPAddresses}

            routes = agent_pb2.UpdateRoutesRequest(routes=agent_pb2.Routes(Routes=[route("", "10.7.0.1")]))
            got = await c.call(AGENT, "UpdateRoutes", routes, agent_pb2.Routes, timeout=10)
            assert ("0.0.0.0/0", "10.7.0.1") in {(r.dest, r.gateway) for r in got.Routes}
            assert await c.call(AGENT, "ListRoutes", agent_pb2.ListRoutesRequest(), agent_pb2.Routes,
                                timeout=10) == got

            neigh = agent_pb2.AddARPNeighborsRequest(neighbors=agent_pb2.ARPNeighbors(ARPNeighbors=[
                types_pb2.ARPNeighbor(toIPAddress=types_pb2.IPAddress(address="10.7.0.9"), device="eth0",
                                      lladdr="02:00:00:00:00:09")]))
            await c.call(AGENT, "AddARPNeighbors", neigh, empty_pb2.Empty, timeout=10)
            assert "10.7.0.9" in await asyncio.to_thread(pair.neighbours)

            async def code_of(method, request, response):
                with pytest.raises(RpcError) as info:
                    await c.call(AGENT, method, request, response, timeout=10)
                return info.value.code, info.value.message

            assert (await code_of("UpdateInterface", agent_pb2.UpdateInterfaceRequest(),
                                  types_pb2.Interface))[0] == Code.INVALID_ARGUMENT
            assert (await code_of("UpdateRoutes", agent_pb2.UpdateRoutesRequest(),
                                  agent_pb2.Routes))[0] == Code.INVALID_ARGUMENT
            assert (await code_of("AddARPNeighbors", agent_pb2.AddARPNeighborsRequest(),
                                  empty_pb2.Empty))[0] == Code.INVALID_ARGUMENT
            code, msg = await code_of("UpdateInterface", agent_pb2.UpdateInterfaceRequest(
                interface=iface(name="nope0", hwAddr="02:00:00:00:00:99")), types_pb2.Interface)
            assert code == Code.NOT_FOUND and "02:00:00:00:00:99" in msg
            code, msg = await code_of("UpdateInterface", agent_pb2.UpdateInterfaceRequest(
                interface=iface(name="eth0", devicePath="02/00")), types_pb2.Interface)
            assert code == Code.UNIMPLEMENTED and "device layer" in msg

            got = await c.call(AGENT, "GetIPTables", agent_pb2.GetIPTablesRequest(),
                               agent_pb2.GetIPTablesResponse, timeout=10)
            assert got.data == b"*filter\nCOMMIT\n"
            code, msg = await code_of("GetIPTables", agent_pb2.GetIPTablesRequest(is_ipv6=True),
                                      agent_pb2.GetIPTablesResponse)
            assert code == Code.FAILED_PRECONDITION and "ip6tables-save is not installed" in msg
    finally:
        await server.close()


async def test_service_waits_for_the_device_on_the_loop(pair, tmp_sock_dir):
    asked = []

    async def wait_for_device(path, timeout):  # stands in for the device layer
        asked.append((path, timeout))
        return "kv0"

    svc = NetworkService(SimpleNamespace(config=AgentConfig(hotplug_timeout=4.0)), netns=pair.ns,
                         wait_for_device=wait_for_device)
    req = agent_pb2.UpdateInterfaceRequest(interface=iface(name="eth1", devicePath="02/00",
                                                           hwAddr="02:aa:bb:cc:dd:03"))
    await svc.UpdateInterface(req, None)
    assert asked == [("02/00", 4.0)]
    assert pair.mac("eth1") == "02:aa:bb:cc:dd:03"
