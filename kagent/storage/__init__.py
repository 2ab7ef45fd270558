"""Storage drivers (``Storage.driver``) and the reference-counted set of the sandbox's mounts.

``StorageManager`` (manager.py) is what the RPCs use; one module per driver family:
sharedfs (virtio-fs, 9p), block (blk, mmioblk, scsi, nvdimm), ephemeral (tmpfs,
hugetlbfs), local, overlay, watchable (watchable-bind), bind.
"""

from kagent.storage.context import SANDBOX_OWNER
from kagent.storage.manager import StorageManager
from kagent.storage.registry import handler_names

__all__ = ["SANDBOX_OWNER", "StorageManager", "handler_names"]
