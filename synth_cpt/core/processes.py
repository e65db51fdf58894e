"""Which process a pid is: the machine it runs on and when it started. A pid alone is reused; a wall-clock start
time moves when the clock is stepped. Used to tell a killed run's process from a live one (cli/common.py) and an
engine's helper processes from an unrelated process that got their pid (generation/reaper.py)."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def this_machine() -> str:
    """Which machine and pid namespace a pid belongs to: the host name alone is not enough (containers sharing
    the host's name, VMs all called `ubuntu` sharing one instance), so the boot id and the pid namespace join it."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    boot_id = boot.read_text().strip() if boot.exists() else "?"
    try:
        pid_ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pid_ns = "?"
    return f"{socket.gethostname()}/{boot_id}/{pid_ns}"


def process_started(pid: int) -> str | None:
    """When `pid` started, in clock ticks since boot (/proc/<pid>/stat field 22): unlike a wall-clock start time it
    does not move when the clock is stepped, so a live process is never taken for a gone one. None: no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
