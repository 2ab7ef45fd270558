"""The guest kernel: Debian's linux-image package, unpacked once and cached.

    k = fetch_kernel()          # Kernel(release, vmlinux, modules_root, ...)

Steps (each result cached under ``cache_dir()/kernel/<package>_<version>-<modules hash>``):

1. ``apt-cache depends linux-image-amd64`` names the current kernel package
   (``linux-image-6.1.0-57-amd64``), ``apt-get download`` fetches it.
2. ``dpkg-deb -x`` unpacks it; ``depmod -b`` indexes the modules (the deb ships
   no modules.dep); ``modprobe --show-depends`` gives each wanted module's
   dependency chain (soft dependencies included).
3. Only those modules are kept, in a small tree indexed again with depmod,
   so the image carries ~2.5 MB of modules instead of 400 MB.
4. The bzImage is XZ-compressed and decompressing it under TCG takes ~4.5 s:
   the ELF ``vmlinux`` is extracted once and booted through PVH instead
   (QEMU's ``-kernel`` accepts an ELF with the PVH note).

Without network or apt lists, the newest kernel already in the cache is used.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

META_PACKAGE = "linux-image-amd64"

#: Loaded at boot, in this order, with their dependencies (virtio devices have no udev to
#: load their drivers on hot-plug, so every driver the host may plug is loaded up front).
BOOT_MODULES = (
    "virtio_pci", "virtio_console", "virtio_blk", "virtio_rng",
    "pvpanic_mmio", "pvpanic_pci",
)
#: Carried in the image, loaded on demand by the kernel's request_module (``fs-ext4``, ...)
#: through /sbin/modprobe, or by a storage driver.
ON_DEMAND_MODULES = ("ext4", "overlay", "9pnet_virtio", "9p", "virtiofs", "crc32c_generic")
MODULES = BOOT_MODULES + ON_DEMAND_MODULES

_XZ_MAGIC = b"\xfd7zXZ\x00"


class KernelError(RuntimeError):
    pass


@dataclass(frozen=True)
class Kernel:
    package: str  # linux-image-6.1.0-57-amd64
    version: str  # the package version, 6.1.192-3
    release: str  # uname -r, 6.1.0-57-amd64
    dir: Path  # the cache entry
    vmlinux: Path  # ELF with the PVH note (or the bzImage when extraction failed)
    modules_root: Path  # holds lib/modules/<release>/...
    modules: tuple[str, ...]  # every module kept (dependencies included), by file name

    @property
    def modules_dir(self) -> Path:
        return self.modules_root / "lib" / "modules" / self.release


def cache_dir() -> Path:
    """``$KAGENT_VM_CACHE``, else ``$XDG_CACHE_HOME/kagent-vm`` (``~/.cache/kagent-vm``)."""
    env = os.environ.get("KAGENT_VM_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kagent-vm"


def _run(argv: list[str], cwd: str | os.PathLike | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise KernelError(f"{argv[0]} is not installed (apt-get install kmod dpkg apt)") from None
    if done.returncode != 0:
        raise KernelError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    return done.stdout


def current_package() -> tuple[str, str]:
    """(package, version) of the kernel Debian's linux-image-amd64 points at now."""
    out = _run(["apt-cache", "depends", META_PACKAGE])
    m = re.search(r"Depends:\s*(linux-image-[0-9][^\s]*)", out)
    if m is None:
        raise KernelError(f"apt-cache does not know {META_PACKAGE} (run apt-get update first)")
    package = m.group(1)
    shown = _run(["apt-cache", "show", "--no-all-versions", package])
    v = re.search(r"^Version:\s*(\S+)", shown, re.M)
    if v is None:
        raise KernelError(f"apt-cache show {package}: no Version")
    return package, v.group(1)


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """The ELF kernel inside an XZ-compressed bzImage."""
    start = vmlinuz.find(_XZ_MAGIC)
    while start >= 0:
        try:
            dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
            elf = dec.decompress(vmlinuz[start:])  # trailing bytes after the stream are ignored
            if elf.startswith(b"\x7fELF"):
                return elf
        except lzma.LZMAError:
            pass
        start = vmlinuz.find(_XZ_MAGIC, start + 1)
    raise KernelError("no XZ-compressed ELF found in the bzImage")


def _modules_key(modules: tuple[str, ...]) -> str:
    return hashlib.sha256("\n".join(modules).encode()).hexdigest()[:12]


def _load_entry(entry: Path) -> Kernel | None:
    try:
        meta = json.loads((entry / "kernel.json").read_text())
    except (OSError, ValueError):
        return None
    k = Kernel(meta["package"], meta["version"], meta["release"], entry, entry / meta["vmlinux"],
               entry / "modules", tuple(meta["modules"]))
    return k if k.vmlinux.exists() and k.modules_dir.is_dir() else None


def _newest_cached(root: Path, key: str) -> Kernel | None:
    for entry in sorted(root.glob(f"*-{key}"), key=lambda p: p.stat().st_mtime, reverse=True):
        k = _load_entry(entry)
        if k is not None:
            return k
    return None


def fetch_kernel(modules: tuple[str, ...] = MODULES, cache: Path | None = None,
                 log=print) -> Kernel:
    """The cached kernel for today's linux-image-amd64, fetching and unpacking it if needed."""
    root = (cache or cache_dir()) / "kernel"
    key = _modules_key(modules)
    try:
        package, version = current_package()
    except KernelError as exc:
        k = _newest_cached(root, key)
        if k is None:
            raise
        log(f"kernel: {exc}; using the cached {k.package} {k.version}")
        return k
    entry = root / f"{package}_{version}-{key}"
    k = _load_entry(entry)
    if k is not None:
        return k
    root.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=root, prefix=".build-") as tmp:
            _build_entry(Path(tmp), package, version, modules, log)
            stage = Path(tmp) / "entry"
            if _load_entry(entry) is None:  # a concurrent build may have finished first
                shutil.rmtree(entry, ignore_errors=True)
                try:
                    os.rename(stage, entry)
                except OSError:
                    if _load_entry(entry) is None:
                        raise
    except KernelError as exc:
        fallback = _newest_cached(root, key)
        if fallback is None:
            raise KernelError(f"{exc} (if the package lists are stale: apt-get update)") from None
        log(f"kernel: {exc}; using the cached {fallback.package} {fallback.version}")
        return fallback
    k = _load_entry(entry)
    assert k is not None
    return k


def _build_entry(tmp: Path, package: str, version: str, modules: tuple[str, ...], log) -> None:
    log(f"kernel: downloading {package} {version}")
    _run(["apt-get", "download", "-q", f"{package}={version}"], cwd=tmp)
    debs = list(tmp.glob("*.deb"))
    if len(debs) != 1:
        raise KernelError(f"apt-get download {package}: expected one .deb, found {len(debs)}")
    unpacked = tmp / "pkg"
    _run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)])
    debs[0].unlink()
    releases = [p.name for p in (unpacked / "lib" / "modules").iterdir() if p.is_dir()]
    if len(releases) != 1:
        raise KernelError(f"{package}: expected one lib/modules/<release>, found {releases}")
    release = releases[0]
    _run(["depmod", "-b", str(unpacked), release])

    # Each wanted module's chain, soft dependencies included (ext4 needs crc32c that way).
    src_mods = unpacked / "lib" / "modules" / release
    keep: list[Path] = []
    for name in modules:
        out = _run(["modprobe", "-d", str(unpacked), "-S", release, "--show-depends", name])
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "insmod":
                path = Path(parts[1])
                if path not in keep:
                    keep.append(path)
    stage = tmp / "entry"
    dst_mods = stage / "modules" / "lib" / "modules" / release
    for path in keep:
        rel = path.relative_to(src_mods)
        (dst_mods / rel.parent).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dst_mods / rel)
    for name in ("modules.builtin",):  # modprobe's list of what needs no loading
        if (src_mods / name).exists():
            shutil.copy2(src_mods / name, dst_mods / name)
    _run(["depmod", "-b", str(stage / "modules"), release])

    vmlinuz = unpacked / "boot" / f"vmlinuz-{release}"
    try:
        (stage / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
        kernel_file = "vmlinux"
    except KernelError as exc:
        log(f"kernel: {exc}: booting the bzImage (slower under TCG)")
        shutil.copy2(vmlinuz, stage / "vmlinuz")
        kernel_file = "vmlinuz"
    shutil.copy2(unpacked / "boot" / f"config-{release}", stage / "config")
    meta = {"package": package, "version": version, "release": release, "vmlinux": kernel_file,
            "modules": sorted(p.name for p in keep), "wanted": list(modules)}
    (stage / "kernel.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(unpacked)
    log(f"kernel: {package} {version} ready, {len(keep)} modules kept")
