# cython: language_level=3
"""Compiled twin of kagent/runtime/syscalls.py: the same names, the same errors.

libc is called directly; the syscall numbers come from the system headers, so
every architecture glibc knows is covered.  No logic here: one call, and an
OSError(errno, "<call>(<args>): <strerror>") on failure.
"""

import os

from libc.errno cimport errno
from libc.stdint cimport uint32_t


cdef extern from "<sys/mount.h>":
    int c_mount "mount" (const char *source, const char *target, const char *fstype,
                         unsigned long flags, const void *data)
    int c_umount2 "umount2" (const char *target, int flags)

cdef extern from "<sched.h>":
    int c_unshare "unshare" (int flags)
    int c_setns "setns" (int fd, int nstype)

cdef extern from "<unistd.h>":
    int c_sethostname "sethostname" (const char *name, size_t len)
    int c_setdomainname "setdomainname" (const char *name, size_t len)
    long c_syscall "syscall" (long number, ...)

cdef extern from "<sys/prctl.h>":
    int c_prctl "prctl" (int option, unsigned long arg2, unsigned long arg3,
                         unsigned long arg4, unsigned long arg5)

cdef extern from "<sys/syscall.h>":
    long SYS_pivot_root
    long SYS_capget
    long SYS_capset
    long SYS_close_range

cdef struct cap_header:
    uint32_t version
    int pid

cdef struct cap_data:
    uint32_t effective
    uint32_t permitted
    uint32_t inheritable

cdef enum:
    CAP_VERSION_3 = 0x20080522


cdef inline object _path(object p):
    return None if p is None else os.fsencode(p)


cdef inline str _show(object p):
    return repr(None if p is None else os.fsdecode(p))


cdef object _fail(str call):
    cdef int err = errno
    return OSError(err, f"{call}: {os.strerror(err)}")


cdef inline const char *_ptr(object b):
    if b is None:
        return NULL
    return <char *>b


def mount(source, target, fstype, unsigned long flags=0, data=None):
    cdef object s = _path(source), t = _path(target), f = _path(fstype), d = _path(data)
    if c_mount(_ptr(s), _ptr(t), _ptr(f), flags, <const void *>_ptr(d)) != 0:
        raise _fail(f"mount({_show(source)}, {_show(target)}, {_show(fstype)}, {flags:#x})")


def umount2(target, int flags=0):
    cdef object t = _path(target)
    if c_umount2(_ptr(t), flags) != 0:
        raise _fail(f"umount2({_show(target)}, {flags:#x})")


def pivot_root(new_root, put_old):
    cdef object n = _path(new_root), o = _path(put_old)
    if c_syscall(SYS_pivot_root, _ptr(n), _ptr(o)) != 0:
        raise _fail(f"pivot_root({_show(new_root)}, {_show(put_old)})")


def unshare(int flags):
    if c_unshare(flags) != 0:
        raise _fail(f"unshare({flags:#x})")


def setns(int fd, int nstype=0):
    if c_setns(fd, nstype) != 0:
        raise _fail(f"setns({fd}, {nstype:#x})")


def sethostname(name):
    cdef bytes raw = os.fsencode(name)
    if c_sethostname(raw, len(raw)) != 0:
        raise _fail(f"sethostname({_show(name)})")


def setdomainname(name):
    cdef bytes raw = os.fsencode(name)
    if c_setdomainname(raw, len(raw)) != 0:
        raise _fail(f"setdomainname({_show(name)})")


def capget():
    """This thread's (effective, permitted, inheritable) sets, 64-bit each."""
    cdef cap_header hdr
    cdef cap_data data[2]
    hdr.version = CAP_VERSION_3
    hdr.pid = 0
    if c_syscall(SYS_capget, &hdr, &data[0]) != 0:
        raise _fail("capget()")
    return (
        data[0].effective | (<unsigned long long>data[1].effective << 32),
        data[0].permitted | (<unsigned long long>data[1].permitted << 32),
        data[0].inheritable | (<unsigned long long>data[1].inheritable << 32),
    )


def capset(unsigned long long effective, unsigned long long permitted, unsigned long long inheritable):
    cdef cap_header hdr
    cdef cap_data data[2]
    hdr.version = CAP_VERSION_3
    hdr.pid = 0
    data[0].effective = effective & 0xFFFFFFFF
    data[0].permitted = permitted & 0xFFFFFFFF
    data[0].inheritable = inheritable & 0xFFFFFFFF
    data[1].effective = effective >> 32
    data[1].permitted = permitted >> 32
    data[1].inheritable = inheritable >> 32
    if c_syscall(SYS_capset, &hdr, &data[0]) != 0:
        raise _fail(f"capset({effective:#x}, {permitted:#x}, {inheritable:#x})")


def prctl(int option, arg2=0, unsigned long arg3=0, unsigned long arg4=0, unsigned long arg5=0):
    """prctl with integer arguments (PR_SET_NAME takes bytes as arg2)."""
    cdef int rc
    cdef const char *p
    if isinstance(arg2, bytes):
        p = <bytes>arg2
        rc = c_prctl(option, <unsigned long>p, arg3, arg4, arg5)
        shown = repr(arg2)
    else:
        rc = c_prctl(option, <unsigned long>arg2, arg3, arg4, arg5)
        shown = str(arg2)
    if rc < 0:
        raise _fail(f"prctl({option}, {shown})")
    return rc


def close_range(unsigned int first, unsigned int last, int flags=0):
    if c_syscall(SYS_close_range, <long>first, <long>last, <long>flags) != 0:
        raise _fail(f"close_range({first}, {last}, {flags:#x})")
