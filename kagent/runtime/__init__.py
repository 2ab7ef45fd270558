"""The container runtime used by workers: from an OCI spec to a running container process.

Entry points (container.py): ``start_init`` → ``InitHandle.start``, ``exec_process``;
``stdio.make_stdio`` makes their pipes or pty; ``hooks.run`` runs poststop hooks.
One concept per module:

    syscalls      raw syscalls Python lacks (twin of kagent._fast.syscalls)
    namespaces    new/joined namespaces, their order, uid/gid maps
    rootfs        prepare, mounts, /dev, pivot_root, read-only and masked paths
    mounts        mount option strings, one spec mount, bind remounts
    cgroupfs      the /sys/fs/cgroup mount          devices   /dev nodes and links
    securejoin    resolving paths inside the rootfs  mountinfo /proc/<pid>/mountinfo
    system        hostname, domainname, sysctl       process   process attributes, exec
    capabilities  the five capability sets           users     uid/gid/groups, names
    seccomp       libseccomp filter (ctypes)         hooks     OCI lifecycle hooks
    stdio         pipes and pty                      channel   worker ⇄ child messages
    errors        SetupError
"""
