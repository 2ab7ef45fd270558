"""The guest image for kagent's VM tests: Debian's kernel and an initramfs with kagent as init.

    make initrd                       # or: .venv/bin/python -m vm.build_initrd
    make test-vm                      # boots guests under QEMU (tests/vm)

kernel.py fetches and caches the kernel, build_initrd.py the initramfs, cpio.py
writes the archive.  The cache lives in $KAGENT_VM_CACHE (default ~/.cache/kagent-vm).
"""
