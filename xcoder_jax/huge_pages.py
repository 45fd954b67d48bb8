"""Transparent huge pages for the large buffers of a CPU step (glibc's malloc tunable).

XLA's CPU runtime allocates an executable's temporaries afresh on every call, and each
fresh 4 KiB page costs a page fault on first touch. On the 2-core machines this project is
measured on, first-touching 400 MB took 0.46 s against 0.03 s for the same write to memory
already touched; the paper-width sparse BatchTopK step ran in 6.6 s without huge pages and
4.8 s with them (docs/performance.md). With `glibc.malloc.hugetlb=1` malloc asks
for transparent huge pages (2 MiB, 512x fewer faults) on the large chunks it maps, where the
kernel allows them (`/sys/kernel/mm/transparent_hugepage/enabled` not "never").

glibc reads the tunable once, at process start, so `reexec()` starts the process again with
it set; the launchers and benchmarks call it first. `make` exports it, so their children
inherit it and nothing starts twice. XCODER_HUGE_PAGES=0 turns it off.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def wanted() -> bool:
    """Whether huge pages would be used here: Linux, allowed by the kernel, not turned off."""
    if sys.platform != "linux" or os.environ.get("XCODER_HUGE_PAGES", "1") == "0":
        return False
    try:
        with open(_THP) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def active() -> bool:
    """Whether this process started with the tunable set."""
    return TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":")


def reexec() -> None:
    """Starts this process again with the tunable added to GLIBC_TUNABLES, when it is
    wanted and not yet set; returns otherwise (and in the restarted process)."""
    if active() or not wanted():
        return
    tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]
    env = {**os.environ, "GLIBC_TUNABLES": ":".join([*tunables, TUNABLE])}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
