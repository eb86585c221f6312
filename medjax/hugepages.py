"""2 MiB pages for medjax's command-line jobs on Linux.

XLA's CPU runtime allocates a step's temporary buffers afresh at every execution, and its
transposes and convolutions walk them with large strides; with 4 KiB pages the first touch of
every page faults and the strided passes miss the TLB. glibc's malloc can back its memory with
transparent huge pages instead (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, glibc >= 2.35, the
kernel's transparent huge pages in "madvise" mode): on 2 CPU cores the U-Net training step of
`medjax.bench_peers` took 0.164 s instead of 0.214 s (README, "Performance").

glibc reads GLIBC_TUNABLES only when a process starts, so ``python -m medjax.main`` (and
``medjax.benchmark``, ``medjax.evaluate``) restart themselves once, before anything else is
imported, with that setting when all of these hold:

- Linux with glibc >= 2.35, and transparent huge pages in "madvise" mode ("always" gives them
  to every process already, "never" to none);
- GLIBC_TUNABLES is not set: any value, even empty, is the user's choice and is kept;
- MEDJAX_HUGE_PAGES is not "0" (the way to turn this off).

The restart is an ``exec`` of the same command line (same process id, file descriptors and
environment, plus GLIBC_TUNABLES); `medjax.benchmark` records the GLIBC_TUNABLES it ran with.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Mapping, Optional, Sequence

TUNABLE = "glibc.malloc.hugetlb=1"
ENTRY_POINTS = ("medjax.main", "medjax.benchmark", "medjax.evaluate")
OFF_SWITCH = "MEDJAX_HUGE_PAGES"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)


def glibc_version() -> Optional[tuple[int, int]]:
    """(major, minor) of the C library when it is glibc, else None."""
    try:
        name = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None
    match = re.fullmatch(r"glibc (\d+)\.(\d+).*", name or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def thp_mode(path: str = THP_MODE_FILE) -> Optional[str]:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or None."""
    try:
        with open(path) as f:
            match = re.search(r"\[(\w+)\]", f.read())
    except OSError:
        return None
    return match.group(1) if match else None


def module_run(orig_argv: Sequence[str], argv0: str) -> Optional[str]:
    """The module a ``python -m MODULE`` command line is starting, while its package loads.

    ``sys.argv[0]`` is "-m" only until runpy has imported the module's package, so this is None
    for imports from other programs and once the module itself runs.
    """
    if argv0 != "-m" or "-m" not in orig_argv[:-1]:
        return None
    return orig_argv[list(orig_argv).index("-m") + 1]


def wanted(
    environ: Mapping[str, str],
    module: Optional[str],
    platform: str,
    glibc: Optional[tuple[int, int]],
    thp: Optional[str],
) -> bool:
    """Whether a process in this situation should restart itself with `TUNABLE`."""
    return (
        module in ENTRY_POINTS
        and platform.startswith("linux")
        and "GLIBC_TUNABLES" not in environ
        and environ.get(OFF_SWITCH, "1") != "0"
        and glibc is not None
        and glibc >= MIN_GLIBC
        and thp == "madvise"
    )


def maybe_restart() -> None:
    """Restarts this ``python -m`` entry point with `TUNABLE` when `wanted`; else returns."""
    module = module_run(getattr(sys, "orig_argv", []), sys.argv[0] if sys.argv else "")
    if module is None or not sys.executable:
        return
    if not wanted(os.environ, module, sys.platform, glibc_version(), thp_mode()):
        return
    env = {**os.environ, "GLIBC_TUNABLES": TUNABLE}
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        return  # Carry on with 4 KiB pages.
