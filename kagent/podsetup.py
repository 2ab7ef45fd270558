"""What CreateSandbox sets up besides storages, and what DestroySandbox takes down.

- Persistent IPC and UTS namespaces that every container of the pod joins: created by a
  short-lived thread that unshares both (IPC and UTS are per-thread, so the agent's
  other threads are untouched), sets the hostname in the new UTS namespace, and
  bind-mounts ``/proc/thread-self/ns/{ipc,uts}`` onto files in ``ns_dir`` — the mounts
  keep the namespaces alive once the thread is gone.  A thread, as upstream does, rather
  than a forked helper: the supervisor runs threads, and fork without exec is unsafe there.
  ``ns_dir`` is ``/run/kata-containers/sandbox/ns`` (upstream: ``/var/run/sandbox-ns``):
  inside the agent's own tree, cleaned with it.
- DNS: the lines the host sent (its pod resolv.conf), trimmed and joined by "\\n", are
  written to ``<run_dir>/sandbox/resolv.conf`` and bind-mounted over /etc/resolv.conf if
  that exists (a directory there is an error; nothing there: nothing to do).
- Kernel modules: ``modprobe -v <name> <params...>`` each, with a clear error when
  modprobe or the module is missing.
- Guest hooks: executables under ``<guest_hook_path>/{prestart,poststart,poststop}``,
  appended to every container's OCI hooks.

Unlike upstream, CreateSandbox does not ``rm -rf /run/kata-containers`` first: a shared
filesystem mounted there by the guest image would be emptied through its mount.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from kagent.errors import AlreadyExists, FailedPrecondition, InvalidArgument, refuse_nul
from kagent.log import get_logger
from kagent.runtime import syscalls
from kagent.storage import SANDBOX_OWNER
from kagent.storage.common import make_dirs, remove_created, storage_error, umount

if TYPE_CHECKING:
    from kagent.protocols import agent_pb2
    from kagent.storage.manager import StorageManager

log = get_logger("sandbox")

RUN_DIR = "/run/kata-containers"
RESOLV_CONF = "/etc/resolv.conf"
HOOK_KINDS = ("prestart", "poststart", "poststop")
MODPROBE_CANDIDATES = ("/sbin/modprobe", "/usr/sbin/modprobe", "/bin/modprobe", "/usr/bin/modprobe")
MODPROBE_TIMEOUT = 60.0
HOSTNAME_MAX = 64  # the kernel's __NEW_UTS_LEN


# --- persistent namespaces --------------------------------------------------------------------


def persist_namespaces(ns_dir: str, hostname: str) -> tuple[str, str]:
    """New IPC and UTS namespaces (hostname set), bind-mounted on ``ns_dir``/{ipc,uts}."""
    paths = (os.path.join(ns_dir, "ipc"), os.path.join(ns_dir, "uts"))
    for path in paths:
        with open(path, "a"):
            pass  # a file to bind the nsfs inode onto
    outcome: dict[str, BaseException] = {}

    def body() -> None:
        mounted = []
        try:
            syscalls.unshare(syscalls.CLONE_NEWIPC | syscalls.CLONE_NEWUTS)
            if hostname:
                syscalls.sethostname(hostname)
            for kind, path in zip(("ipc", "uts"), paths, strict=True):
                syscalls.mount(f"/proc/thread-self/ns/{kind}", path, None, syscalls.MS_BIND)
                mounted.append(path)
        except BaseException as exc:
            for path in mounted:
                with contextlib.suppress(OSError):
                    syscalls.umount2(path, syscalls.MNT_DETACH)
            outcome["error"] = exc

    thread = threading.Thread(target=body, name="kagent-sandbox-ns")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise storage_error(outcome["error"], "create the sandbox's IPC and UTS namespaces")
    return paths


# --- DNS --------------------------------------------------------------------------------------


def resolv_conf_text(dns: Iterable[str]) -> str:
    """One trimmed entry a line (upstream joins them with "\n"); a text file ends with one."""
    lines = [line.strip() for line in dns]
    return "\n".join(lines) + "\n" if lines else ""


def setup_dns(dns: list[str], sandbox_dir: str, target: str) -> str | None:
    """Write the pod's resolv.conf and bind it over ``target``; the file, if bound."""
    if not dns:
        return None
    try:
        st = os.stat(target)
    except FileNotFoundError:
        log.info("no resolv.conf to bind the sandbox DNS over", target=target)
        return None
    if stat.S_ISDIR(st.st_mode):
        raise FailedPrecondition(f"cannot set the sandbox DNS: {target} is a directory")
    source = os.path.join(sandbox_dir, "resolv.conf")
    try:
        with open(source, "w") as f:
            f.write(resolv_conf_text(dns))
        syscalls.mount(source, target, None, syscalls.MS_BIND)
    except OSError as exc:
        raise storage_error(exc, f"bind the sandbox DNS {source} over {target}") from None
    log.info("sandbox DNS set", target=target, lines=len(dns))
    return source


# --- kernel modules ---------------------------------------------------------------------------


def find_modprobe() -> str | None:
    for path in MODPROBE_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("modprobe")


def modprobe_argv(modprobe: str, name: str, parameters: Iterable[str]) -> list[str]:
    if not name:
        raise InvalidArgument("kernel module name is empty")
    params = list(parameters)
    for word in (name, *params):
        if word.startswith("-") or "\0" in word:  # never an option of modprobe's own
            raise InvalidArgument(f"kernel module {name!r}: invalid argument {word!r}")
    return [modprobe, "-v", name, *params]


async def load_kernel_module(name: str, parameters: Iterable[str], modprobe: str | None) -> None:
    tool = modprobe or find_modprobe()
    if tool is None or not os.access(tool, os.X_OK):
        raise FailedPrecondition(f"cannot load kernel module {name}: modprobe not found "
                                 f"({tool or ', '.join(MODPROBE_CANDIDATES) + ' or PATH'})")
    argv = modprobe_argv(tool, name, parameters)
    try:
        done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True,
                                       errors="replace", timeout=MODPROBE_TIMEOUT,
                                       stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise FailedPrecondition(f"modprobe {name}: no answer within {MODPROBE_TIMEOUT:g}s") from None
    except OSError as exc:
        raise FailedPrecondition(f"cannot run {tool} for kernel module {name}: {exc.strerror}") from None
    if done.returncode != 0:
        detail = (done.stderr.strip() or done.stdout.strip() or "no output")[-1000:]
        how = f"exit status {done.returncode}" if done.returncode > 0 else f"signal {-done.returncode}"
        raise FailedPrecondition(f"cannot load kernel module {name} ({' '.join(argv)}: {how}): {detail}")
    log.info("kernel module loaded", module=name, parameters=" ".join(argv[3:]),
             output=done.stdout.strip()[-500:])


# --- guest hooks ------------------------------------------------------------------------------


def scan_hooks(hook_path: str) -> dict[str, list[dict[str, Any]]]:
    """OCI hooks from ``<hook_path>/<kind>/*``: regular executable files (not symlinks),
    sorted by name, each run as ``<name> <kind>``."""
    hooks: dict[str, list[dict[str, Any]]] = {}
    for kind in HOOK_KINDS:
        found = []
        directory = os.path.join(hook_path, kind)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            entries = []
        for entry in entries:
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                if not entry.stat(follow_symlinks=False).st_mode & 0o111:
                    continue
            except OSError:
                continue
            found.append({"path": os.path.join(directory, entry.name), "args": [entry.name, kind]})
        if found:
            hooks[kind] = found
            log.info("guest hooks found", kind=kind, hooks=[h["path"] for h in found])
    return hooks


# --- container specs --------------------------------------------------------------------------


def join_sandbox_namespaces(spec: dict, *, ipc: str | None, uts: str | None,
                            pid: str | None = None) -> dict:
    """Point the spec's ipc/uts namespaces (and pid, when the pod shares it) at the sandbox's.

    A spec's own ``hostname`` is dropped once its UTS namespace is the pod's: it would
    rename the whole pod (the pod's hostname was set at CreateSandbox).
    """
    linux = spec.setdefault("linux", {})
    namespaces = linux.setdefault("namespaces", [])
    for ns in namespaces:
        kind = ns.get("type")
        if kind == "ipc" and ipc:
            ns["path"] = ipc
        elif kind == "uts" and uts:
            ns["path"] = uts
            spec.pop("hostname", None)
    if pid:
        linux["namespaces"] = [ns for ns in namespaces if ns.get("type") != "pid"]
        linux["namespaces"].append({"type": "pid", "path": pid})
    return spec


def append_hooks(spec: dict, guest_hooks: dict[str, list[dict[str, Any]]]) -> dict:
    """Add the guest hooks after the container's own, as upstream."""
    if guest_hooks:
        hooks = spec.setdefault("hooks", {})
        for kind, entries in guest_hooks.items():
            hooks.setdefault(kind, []).extend(dict(h, args=list(h["args"])) for h in entries)
    return spec


# --- the sandbox ------------------------------------------------------------------------------


class PodSetup:
    """The sandbox-level state CreateSandbox makes and DestroySandbox undoes."""

    def __init__(self, *, run_dir: str = RUN_DIR, ns_dir: str | None = None,
                 resolv_conf: str = RESOLV_CONF, modprobe: str | None = None) -> None:
        self.run_dir = run_dir
        self.sandbox_dir = os.path.join(run_dir, "sandbox")
        self.ns_dir = ns_dir or os.path.join(self.sandbox_dir, "ns")
        self.resolv_conf = resolv_conf
        self.modprobe = modprobe
        self.created = False
        self.sandbox_id = ""
        self.hostname = ""
        self.sandbox_pidns = False
        self.ipc_ns_path: str | None = None
        self.uts_ns_path: str | None = None
        self.guest_hooks: dict[str, list[dict[str, Any]]] = {}
        self._dns_source: str | None = None
        self._made: list[str] = []  # directories we created
        self._storages: StorageManager | None = None

    async def create(self, req: agent_pb2.CreateSandboxRequest, storages: StorageManager) -> list[str]:
        """Everything CreateSandbox asks for, in upstream's order; the sandbox storages'
        mount points.  On failure, what was done is undone."""
        if self.created:
            raise AlreadyExists(f"the sandbox {self.sandbox_id!r} was already created")
        hostname = req.hostname
        if len(os.fsencode(hostname)) > HOSTNAME_MAX or "\0" in hostname:
            raise InvalidArgument(f"hostname {hostname!r} is longer than {HOSTNAME_MAX} bytes")
        self.created = True
        self.sandbox_id, self.hostname, self.sandbox_pidns = req.sandbox_id, hostname, req.sandbox_pidns
        try:
            self._made = await asyncio.to_thread(make_dirs, self.sandbox_dir)
            if req.guest_hook_path:
                refuse_nul(req.guest_hook_path, "CreateSandbox: guest_hook_path")
                self.guest_hooks = await asyncio.to_thread(scan_hooks, req.guest_hook_path)
            for module in req.kernel_modules:
                await load_kernel_module(module.name, module.parameters, self.modprobe)
            self._made += await asyncio.to_thread(make_dirs, self.ns_dir)
            self.ipc_ns_path, self.uts_ns_path = await asyncio.to_thread(
                persist_namespaces, self.ns_dir, hostname)
            self._storages = storages
            mount_points = await storages.add(req.storages, SANDBOX_OWNER)
            self._dns_source = await asyncio.to_thread(setup_dns, list(req.dns), self.sandbox_dir,
                                                       self.resolv_conf)
        except BaseException:
            await self.destroy()
            raise
        log.info("sandbox created", sandbox_id=self.sandbox_id, hostname=hostname,
                 ipc_ns=self.ipc_ns_path, uts_ns=self.uts_ns_path, storages=mount_points)
        return mount_points

    async def destroy(self) -> None:
        """Undo create: the DNS bind, the sandbox storages' references, the namespaces.
        (DestroySandbox releases every storage with StorageManager.destroy_all first.)"""
        if self._storages is not None:
            with contextlib.suppress(Exception):  # logged by the manager
                await self._storages.remove(SANDBOX_OWNER)
            self._storages = None
        await asyncio.to_thread(self._teardown)
        self.created = False
        self.ipc_ns_path = self.uts_ns_path = None
        self.guest_hooks = {}

    def _teardown(self) -> None:
        if self._dns_source is not None:
            with contextlib.suppress(Exception):
                # a container may still hold the file open: detach
                syscalls.umount2(self.resolv_conf, syscalls.MNT_DETACH)
            with contextlib.suppress(OSError):
                os.unlink(self._dns_source)
            self._dns_source = None
        for path in (self.ipc_ns_path, self.uts_ns_path):
            if path is None:
                continue
            with contextlib.suppress(Exception):
                umount(path, "umount the sandbox namespace")
            with contextlib.suppress(OSError):
                os.unlink(path)
        remove_created(self._made)
        self._made = []

    # -- what containers need ----------------------------------------------------------------

    def container_spec(self, spec: dict, *, pidns_path: str | None = None) -> dict:
        """A container's spec joined to the sandbox: shared IPC/UTS (and PID) namespaces,
        guest hooks appended."""
        join_sandbox_namespaces(spec, ipc=self.ipc_ns_path, uts=self.uts_ns_path, pid=pidns_path)
        return append_hooks(spec, self.guest_hooks)
