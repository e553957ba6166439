"""Child processes that never outlive their parent."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable


def die_with_parent() -> Callable[[], None]:
    """A preexec function asking the kernel to SIGKILL the child when this process dies, however it dies
    (kill -9 included), so no orphan outlives it: a rerun never trains beside one, a server never keeps its
    port. Everything it calls is resolved here, in the parent: between fork and exec the child only makes two
    system calls."""
    import ctypes

    prctl, getppid, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getppid, os.getpid()
    pr_set_pdeathsig = 1

    def preexec():
        prctl(pr_set_pdeathsig, signal.SIGKILL)
        if getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec
