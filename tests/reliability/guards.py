"""Guards for tests that feed hostile input to readers: a time limit and an address-space limit,
so a reader that believes a header claiming a huge image fails its test instead of hanging or
exhausting the machine."""

from __future__ import annotations

import contextlib
import os
import resource
import signal


class Hang(Exception):
    """A reader ran past the hang guard."""


@contextlib.contextmanager
def bounded(seconds: int, extra_bytes: int):
    """Runs a block with a hang guard and a memory guard.

    The block fails with `Hang` when it runs longer than `seconds`, and with `MemoryError`
    when it tries to grow this process's address space by more than `extra_bytes` (on Linux),
    so a reader that believes a header claiming a huge image fails the test instead of
    exhausting the machine.
    """

    def alarm(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = None
    if os.path.exists("/proc/self/statm"):
        with open("/proc/self/statm") as f:
            limit = int(f.read().split()[0]) * resource.getpagesize() + extra_bytes
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
