"""VM suite fixtures: the guest image (built once per session) and booted guests.

The VM tests (``@pytest.mark.vm``) boot real guests under QEMU with software
emulation; they are skipped, saying so, only where QEMU is not installed.
An image that cannot be built is an error, not a skip.
"""

from __future__ import annotations

import shutil
import tempfile
import time

import pytest
from vm_harness import qemu_path


@pytest.fixture(scope="session")
def vm_image():
    if qemu_path() is None:
        pytest.skip("QEMU is not installed (apt-get install qemu-system-x86): the VM suite cannot run")
    from vm.build_initrd import BuildError, build

    t0 = time.monotonic()
    try:
        image = build(log=lambda msg: print(msg))
    except (BuildError, OSError, RuntimeError) as exc:
        pytest.fail(f"the guest image cannot be built: {exc}")
    print(f"guest image: {image.initrd} ({image.size / 1e6:.1f} MB, {image.files} files, "
          f"{'cached' if image.cached else 'built'} in {time.monotonic() - t0:.1f}s)")
    return image


@pytest.fixture(scope="module")
def vm_workdir():
    # short: unix socket paths are limited to 107 bytes
    d = tempfile.mkdtemp(prefix="kvm-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed VM test shows the end of its guest's console (the agent's logs) in its report."""
    outcome = yield
    report = outcome.get_result()
    vm = getattr(item, "funcargs", {}).get("guest")
    if report.failed and vm is not None and hasattr(vm, "console"):
        report.sections.append(("guest console (end)", vm.console()[-12000:]))
