"""Build the guest image: an uncompressed initramfs with Python, kagent and busybox.

    .venv/bin/python -m vm.build_initrd            # prints the kernel and initrd paths

The kernel is Debian's (vm/kernel.py).  The initramfs holds:

- the interpreter the venv was made from (so kagent's compiled extensions match it),
  its standard library less what a guest never imports (tests, tkinter, idle, ...),
  precompiled (unchecked-hash .pyc: nothing is compiled under slow emulation), and
  every shared library ``ldd`` names, at the same paths;
- kagent (with its compiled extensions) and the distributions requirements.txt
  names, with their own requirements, copied from the venv;
- busybox with its applets in /bin (the debug console, /sbin/modprobe for the
  kernel's on-demand module loads) and a busybox container rootfs at ROOTFS;
- the kernel modules vm/kernel.py kept, and etc/modules-load.d/kagent.conf
  naming those kagent.init loads at boot;
- ``/init``: kagent.init.main, the agent as PID 1.

The image is cached under the cache dir as initrd-<sha256 of the staged tree>.cpio,
so an unchanged tree is not compiled or archived again.  The build checks the
staged tree by importing the agent in it under chroot (when root).
"""

from __future__ import annotations

import argparse
import compileall
import hashlib
import json
import os
import py_compile
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from kagent import devtools
from vm import cpio
from vm.kernel import BOOT_MODULES, Kernel, cache_dir, fetch_kernel

BUILDER_VERSION = "3"  # bump when the layout changes without the inputs changing
REPO = Path(__file__).resolve().parent.parent
PYVER = f"python{sys.version_info.major}.{sys.version_info.minor}"
ROOTFS = "usr/share/kagent/rootfs"  # a busybox container rootfs inside the image
HOSTNAME = "kagent-vm"
KEEP_IMAGES = 3  # older initrd-*.cpio files are removed from the cache

# Top-level parts of the standard library that a guest never imports.
_STDLIB_SKIP = {
    "site-packages", "test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip",
    "pydoc_data", "distutils", "venv", "turtle.py", "__phello__", "dist-packages",
}
_SKIP_DIRS = {"__pycache__", "test", "tests", "idle_test"}
# lib-dynload modules a guest never needs (GUI, terminals, test helpers, old databases)
_DYNLOAD_SKIP = re.compile(r"^(_tkinter|_test|_xxtest|xx|_ctypes_test|_curses|readline|_dbm|_gdbm|nis"
                           r"|ossaudiodev|audioop|spwd|_crypt)")
_IMPORT_CHECK = ("import kagent.agent, kagent.zygote, kagent.worker.main, kagent.init, kagent._fast as f; "
                 "import {modules}; print(f.status())")


# Device nodes for the time before devtmpfs is mounted: the kernel opens /dev/console for
# init's stdio, and Python reads /dev/urandom for its hash seed when getrandom() would block.
_DEV_NODES = (("console", 0o600, (5, 1)), ("null", 0o666, (1, 3)), ("zero", 0o666, (1, 5)),
              ("random", 0o666, (1, 8)), ("urandom", 0o666, (1, 9)))


class BuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class Image:
    kernel: Kernel
    initrd: Path
    key: str
    files: int
    size: int
    cached: bool

    def describe(self) -> dict:
        return {"kernel": str(self.kernel.vmlinux), "kernel_package": f"{self.kernel.package} {self.kernel.version}",
                "initrd": str(self.initrd), "initrd_bytes": self.size, "files": self.files,
                "key": self.key, "cached": self.cached}


# --- staging -------------------------------------------------------------------------------


def _copy(src: str | Path, dst: Path, mode: int | None = None) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if os.path.islink(src) and mode is None:
        target = os.readlink(src)
        if not os.path.isabs(target):
            os.symlink(target, dst)
            return
    shutil.copyfile(src, dst)  # follows links: the content, never a link to the host
    os.chmod(dst, mode if mode is not None else stat.S_IMODE(os.stat(src).st_mode))


def _copy_tree(src: Path, dst: Path, skip_top: Collection[str] = (), skip_file=None) -> None:
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS
                             and not (rel == Path(".") and d in skip_top))
        for name in filenames:
            if rel == Path(".") and name in skip_top:
                continue
            if name.endswith((".pyc", ".pyo")) or (skip_file and skip_file(rel / name)):
                continue
            _copy(Path(dirpath) / name, dst / rel / name)


def _ldd(paths: list[Path]) -> set[str]:
    libs: set[str] = set()
    for path in paths:
        done = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=False)
        for line in done.stdout.splitlines():
            m = re.search(r"=>\s*(/\S+)", line) or re.match(r"\s*(/\S+)\s+\(", line)
            if m:
                libs.add(m.group(1))
    return libs


def _runtime_distributions(requirements: Path) -> list[metadata.Distribution]:
    """The distributions requirements.txt names, and what they require (markers honoured)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - pytest and pip bring packaging
        Requirement = None  # type: ignore[assignment,misc]
    todo = [_project_name(line) for line in requirements.read_text().splitlines()]
    todo = [name for name in todo if name]
    seen: dict[str, metadata.Distribution] = {}
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise BuildError(f"{name} is required but not installed in the venv (make install)") from None
        seen[key] = dist
        for req in dist.requires or []:
            if Requirement is not None:
                r = Requirement(req)
                if r.marker is not None and not r.marker.evaluate({"extra": ""}):
                    continue
                todo.append(r.name)
            elif ";" not in req:
                todo.append(_project_name(req))
    return list(seen.values())


def _project_name(requirement: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9_.\-]+)", requirement.split("#", 1)[0])
    return m.group(1) if m else ""


def stage_python(stage: Path) -> list[str]:
    """The interpreter, its stdlib and the runtime site-packages; returns the top-level
    modules of the runtime distributions (for check_tree)."""
    base_prefix = Path(sys.base_prefix)
    exe = Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
    if not exe.exists():
        raise BuildError(f"cannot find the venv's base interpreter ({exe})")
    usr_lib = stage / "usr/lib"
    pylib = usr_lib / PYVER
    _copy(exe, stage / "usr/bin" / PYVER, 0o755)
    os.symlink(PYVER, stage / "usr/bin/python3")
    src_lib = base_prefix / "lib" / PYVER
    if not (src_lib / "os.py").exists():
        raise BuildError(f"no standard library at {src_lib}")
    _copy_tree(src_lib, pylib, skip_top=_STDLIB_SKIP | {n.name for n in src_lib.glob("config-*")},
               skip_file=lambda rel: rel.parts[0] == "lib-dynload" and bool(_DYNLOAD_SKIP.match(rel.name)))

    site = pylib / "site-packages"
    venv_site = Path(sysconfig.get_paths()["purelib"])
    top_level: list[str] = []
    for dist in _runtime_distributions(REPO / "requirements.txt"):
        names = (dist.read_text("top_level.txt") or "").split()
        top_level += [n for n in names if n.isidentifier() and not n.startswith("_")]
        for f in dist.files or []:
            src = Path(str(dist.locate_file(f)))
            try:
                rel = src.resolve().relative_to(venv_site.resolve())
            except ValueError:
                continue  # scripts in bin/, data outside site-packages
            if "__pycache__" in rel.parts or rel.suffix == ".pyc" or not src.is_file():
                continue
            _copy(src, site / rel)
    # kagent itself, from the work tree (the venv has it as an editable install)
    _copy_tree(REPO / "kagent", site / "kagent",
               skip_file=lambda rel: rel.suffix in (".c", ".pyx", ".pxd", ".pyi", ".proto", ".h"))

    elves = [stage / "usr/bin" / PYVER]
    elves += [p for p in pylib.rglob("*.so") if p.is_file()]
    for lib in sorted(_ldd(elves)):
        src = Path(lib)
        if src.is_relative_to(stage):
            continue  # a wheel's own vendored libraries (regopy.libs), already in place
        if src.is_relative_to(base_prefix):  # libpython from a pyenv-style prefix
            dst = usr_lib / src.name
        else:
            dst = stage / src.relative_to("/")
        if not dst.exists():
            _copy(src, dst, 0o755)
            elves.append(dst)
    _strip(elves)
    return sorted(set(top_level))


def _strip(files: list[Path]) -> None:
    """Drop debug sections (pyenv's libpython and uvloop carry ~30 MB of them)."""
    strip = shutil.which("strip")
    if strip is None:
        return  # binutils missing: a bigger image, nothing worse
    subprocess.run([strip, "--strip-debug", *map(str, files)], check=True, capture_output=True)


def stage_busybox(stage: Path) -> None:
    busybox = devtools.find_busybox()
    if busybox is None:
        raise BuildError("busybox not found (apt-get install busybox-static)")
    devtools.build_busybox_rootfs(str(stage / ROOTFS), busybox)
    # the guest's own /bin: the same binary, hard-linked (stored once in the cpio)
    (stage / "bin").mkdir(parents=True, exist_ok=True)
    os.link(stage / ROOTFS / "bin/busybox", stage / "bin/busybox")
    for entry in os.scandir(stage / ROOTFS / "bin"):
        if entry.is_symlink() and not (stage / "bin" / entry.name).exists():
            os.symlink("busybox", stage / "bin" / entry.name)
    (stage / "sbin").mkdir(exist_ok=True)
    os.symlink("/bin/busybox", stage / "sbin/modprobe")  # the kernel's request_module helper


def stage_system(stage: Path, kernel: Kernel) -> None:
    for d in ("proc", "sys", "dev", "run", "tmp", "root", "mnt", "var/tmp", "etc/modules-load.d"):
        (stage / d).mkdir(parents=True, exist_ok=True)
    os.chmod(stage / "tmp", 0o1777)
    os.chmod(stage / "var/tmp", 0o1777)
    shutil.copytree(kernel.modules_root / "lib", stage / "lib", dirs_exist_ok=True, symlinks=True)
    etc = stage / "etc"
    (etc / "modules-load.d/kagent.conf").write_text(
        "# loaded by kagent.init at boot (with their dependencies); see vm/kernel.py\n"
        + "".join(f"{m}\n" for m in BOOT_MODULES))
    (etc / "hostname").write_text(HOSTNAME + "\n")
    (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n")
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (etc / "group").write_text("root:x:0:\ntty:x:5:\n")
    (etc / "resolv.conf").write_text("")
    init = stage / "init"
    init.write_text(f"#!/usr/bin/{PYVER} -sB\n"
                    '"""The kernel runs this as PID 1: kagent as the guest\'s init."""\n'
                    "import sys\n\n"
                    "from kagent.init import main\n\n"
                    "sys.exit(main())\n")
    os.chmod(init, 0o755)


def _tree_key(stage: Path) -> tuple[str, int]:
    h = hashlib.sha256(f"kagent-initrd {BUILDER_VERSION}\n".encode())
    count = 0
    for dirpath, dirnames, filenames in os.walk(stage):
        dirnames.sort()
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, stage)
            if stat.S_ISLNK(st.st_mode):
                h.update(f"L {rel} {os.readlink(full)}\n".encode())
            else:
                with open(full, "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
                h.update(f"F {rel} {stat.S_IMODE(st.st_mode):o} {digest}\n".encode())
            count += 1
    return h.hexdigest(), count


def compile_tree(stage: Path) -> int:
    """Unchecked-hash .pyc for everything: nothing to compile or stat-check in the guest.

    Outside kagent the sources are then dropped, each .pyc taking its module's place
    (13 MB less to unpack at every boot); kagent keeps its sources for readable tracebacks.
    Returns the number of modules made sourceless."""
    pylib = stage / "usr/lib" / PYVER
    compileall.compile_dir(str(pylib), ddir=f"/usr/lib/{PYVER}", quiet=2, workers=0,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    tag = sys.implementation.cache_tag
    kagent_dir = pylib / "site-packages" / "kagent"
    moved = 0
    for py in pylib.rglob("*.py"):
        if py.is_relative_to(kagent_dir):
            continue
        pyc = py.parent / "__pycache__" / f"{py.stem}.{tag}.pyc"
        if pyc.exists():
            os.replace(pyc, py.with_suffix(".pyc"))
            py.unlink()
            moved += 1
    for cache in list(pylib.rglob("__pycache__")):
        if not cache.is_relative_to(kagent_dir) and not any(cache.iterdir()):
            cache.rmdir()
    return moved


def check_tree(stage: Path, modules: list[str]) -> str:
    """Import the agent and every runtime distribution inside the staged tree (chroot)
    before anything boots it."""
    if os.geteuid() != 0:
        return "not checked (needs root for chroot)"
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    done = subprocess.run([chroot, str(stage), f"/usr/bin/{PYVER}", "-sB", "-c",
                           _IMPORT_CHECK.format(modules=", ".join(modules or ["sys"]))],
                          capture_output=True, text=True, env={"PATH": "/bin:/usr/bin"}, check=False)
    if done.returncode != 0:
        raise BuildError(f"the image's Python cannot import the agent:\n{done.stderr[-3000:]}")
    status = done.stdout.strip()
    if "DEGRADED" in status:
        raise BuildError(f"compiled extensions do not load in the image: {status}")
    return status


def _prune(cache: Path, keep: Path) -> None:
    images = sorted(cache.glob("initrd-*.cpio"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in images[KEEP_IMAGES:]:
        if old != keep:
            old.unlink(missing_ok=True)


def build(cache: Path | None = None, log=print) -> Image:
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    kernel = fetch_kernel(cache=cache, log=log)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".stage-") as tmp:
        stage = Path(tmp) / "root"
        stage.mkdir()
        stage_system(stage, kernel)
        stage_busybox(stage)
        top_level = stage_python(stage)
        key, files = _tree_key(stage)
        out = cache / f"initrd-{key[:16]}.cpio"
        if out.exists():
            os.utime(out)  # most recently used: kept by _prune
            return Image(kernel, out, key, files, out.stat().st_size, cached=True)
        t0 = time.monotonic()
        sourceless = compile_tree(stage)
        log(f"initrd: compiled in {time.monotonic() - t0:.1f}s ({sourceless} modules without sources); "
            f"{check_tree(stage, top_level)}")
        partial = out.with_suffix(".part")
        extra = [cpio.Node(f"dev/{name}", stat.S_IFCHR | mode, rdev=rdev) for name, mode, rdev in _DEV_NODES]
        with open(partial, "wb") as f:
            size = cpio.write_tree(str(stage), f, extra)
        os.replace(partial, out)
    _prune(cache, out)
    return Image(kernel, out, key, files, size, cached=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vm.build_initrd", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, help="cache directory (default $KAGENT_VM_CACHE or ~/.cache/kagent-vm)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    try:
        image = build(args.cache, log=lambda msg: print(msg, file=sys.stderr))
    except (BuildError, OSError, RuntimeError) as exc:
        print(f"vm.build_initrd: {exc}", file=sys.stderr)
        return 1
    info = image.describe() | {"seconds": round(time.monotonic() - t0, 1)}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"kernel  {info['kernel']}  ({info['kernel_package']})")
        print(f"initrd  {info['initrd']}  ({image.size / 1e6:.1f} MB, {image.files} files, "
              f"{'cached' if image.cached else 'built'} in {info['seconds']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
