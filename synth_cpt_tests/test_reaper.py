"""The engine's watchdog (synth_cpt/generation/reaper.py): when the process that loaded the engine is
SIGKILLed, every process it started after the watchdog, orphaned or detached, is ended; a process that ran
before is left alone; a normal close ends the watchdog and kills nothing. The last test SIGKILLs a process
holding the real vLLM engine: without the watchdog its `VLLM::EngineCore` and `VLLM::Worker` (about 7 GB
on 2 cores) were re-parented to init and stayed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from synth_cpt.core.processes import process_started
from synth_cpt.generation.reaper import Reaper, descendants, still_ours

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def alive(pids) -> set[int]:
    """The pids still running (a zombie holds no memory and waits only for init to collect it)."""
    out = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.add(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(pids, timeout_s: float) -> tuple[set[int], float]:
    """(pids still alive when they all went or the timeout passed, seconds waited)."""
    started = time.monotonic()
    while alive(pids) and time.monotonic() - started < timeout_s:
        time.sleep(0.2)
    return alive(pids), round(time.monotonic() - started, 1)


def kill_all(pids) -> None:
    for pid in alive(pids):
        os.kill(pid, signal.SIGKILL)


def read_json_line(proc: subprocess.Popen, log: Path, timeout_s: float) -> dict:
    """The first line of `log` (the child's stdout, where vLLM logs too) that is a JSON object."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and line.endswith("}"):
                return json.loads(line)
        time.sleep(0.5)
    raise AssertionError(f"no JSON line from the child in {timeout_s} s (exit code {proc.poll()}); see {log}")


# A parent that has a process running before its watchdog starts, then starts a detached child (its own
# session) and a child that starts a detached grandchild and exits, so the grandchild is orphaned while the
# parent still lives: each would outlive the parent's SIGKILL.
MIDDLE = """
import subprocess, time
print(subprocess.Popen(["sleep", "300"], start_new_session=True).pid, flush=True)
time.sleep(0.5)
"""
PARENT = """
import json, subprocess, sys, time
from synth_cpt.generation.reaper import Reaper
before = subprocess.Popen(["sleep", "300"], start_new_session=True)
reapers = [Reaper.start(refresh_s=0.2), Reaper.start(refresh_s=0.2)]  # two engines, two watchdogs
detached = subprocess.Popen(["sleep", "300"], start_new_session=True)
middle = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
grandchild = int(middle.stdout.readline())
time.sleep(1.5)  # several refreshes of the watchdog's record; the middle child has exited meanwhile
print(json.dumps({"before": before.pid, "watchdogs": [r.pid for r in reapers], "started": [detached.pid, middle.pid, grandchild]}), flush=True)
time.sleep(300)
"""


def test_sigkilled_parent_loses_every_process_it_started_and_keeps_what_ran_before(tmp_path):
    log = tmp_path / "parent.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", PARENT, MIDDLE], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    pids = read_json_line(proc, log, 30)
    try:
        at_kill = alive(pids["started"])  # the middle child has exited, as planned: its grandchild is an orphan
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        survivors, waited = wait_gone(pids["started"] + pids["watchdogs"], 20)
        before_alive = alive([pids["before"]])
        reports = [set(json.loads(m)) for m in re.findall(r"ended its engine processes (\[.*\])", log.read_text())]
        figures = f"watchdogs {pids['watchdogs']}, started {pids['started']}, alive at the kill {sorted(at_kill)}, alive {waited} s after: {sorted(survivors)}; reports {reports}"
        print(figures)
        assert len(at_kill) == 2, figures
        assert survivors == set(), figures
        assert before_alive == {pids["before"]}, f"a process started before the watchdog was killed: {figures}"
        assert len(reports) == 2 and all(at_kill <= r <= set(pids["started"]) for r in reports), (
            f"each watchdog ends what was started, not the other: {figures}"
        )
    finally:
        kill_all(pids["started"] + pids["watchdogs"] + [pids["before"]])


def test_normal_close_stops_the_watchdog_and_kills_nothing():
    reaper = Reaper.start(refresh_s=0.2)
    child = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        time.sleep(0.6)  # recorded by the watchdog
        reaper.stop()
        time.sleep(0.5)
        print(f"watchdog {reaper.pid} exit code {reaper.proc.returncode}; child alive: {child.poll() is None}")
        assert reaper.proc.returncode == 0
        assert alive([reaper.pid]) == set()
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()


def test_started_any_sees_only_processes_started_after_the_watchdog():
    earlier = subprocess.Popen(["sleep", "300"])
    reaper = Reaper.start()
    try:
        idle = reaper.started_any()
        later = subprocess.Popen(["sleep", "300"])
        busy = reaper.started_any()
        later.kill()
        later.wait()
        print(f"started_any before a new child {idle}, after {busy}")
        assert (idle, busy) == (False, True)
    finally:
        reaper.stop()
        earlier.kill()
        earlier.wait()


class InProcessLLMDouble:
    """Test double of `vllm.LLM` for an engine that starts no process."""

    def __init__(self, model, **kwargs):
        self.model = model


def test_an_engine_that_starts_no_process_keeps_no_watchdog_with_a_double(monkeypatch):
    import vllm

    from synth_cpt.generation.backends import VLLMBackend

    monkeypatch.setattr(vllm, "LLM", InProcessLLMDouble)
    backend = VLLMBackend("model-folder", {})
    backend.prepare()
    watchdog = backend._reaper
    print(f"watchdog {watchdog.pid} exit code after the load {watchdog.proc.poll()}")
    assert watchdog.proc.poll() == 0
    backend.close()


def test_a_recorded_pid_reused_by_another_process_is_not_ours():
    child = subprocess.Popen(["sleep", "300"])
    try:
        created = process_started(child.pid)
        assert created is not None and created.isdigit()
        assert [p.pid for p in still_ours({child.pid: created})] == [child.pid]
        assert still_ours({child.pid: str(int(created) + 1)}) == []  # the same pid, started at another tick
        assert descendants(os.getpid(), exclude=[child.pid]).get(child.pid) is None
        assert descendants(os.getpid())[child.pid] == created
    finally:
        child.kill()
        child.wait()


ENGINE = textwrap.dedent(
    """
    import json, os, sys, time
    import psutil

    def main():
        from synth_cpt.generation.settings import LLMSettings
        settings = LLMSettings()
        path, _ = settings.resolve_model(sys.argv[1])
        backend = settings.shared_backend(path)
        backend.prepare()
        watchdog = backend._reaper.pid
        engine = [{"pid": p.pid, "name": p.name(), "rss": p.memory_info().rss}
                  for p in psutil.Process().children(recursive=True) if p.pid != watchdog]
        print(json.dumps({"watchdog": watchdog, "engine": engine}), flush=True)
        time.sleep(600)

    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.vllm
def test_sigkilled_engine_process_leaves_no_engine_processes(embedded_model, tmp_path):
    script = tmp_path / "engine_holder.py"
    script.write_text(ENGINE)
    log = tmp_path / "engine.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "home")], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ)
        )
    info = {"engine": [], "watchdog": None}
    try:
        info = read_json_line(proc, log, 300)
        engine = [p["pid"] for p in info["engine"]]
        names = sorted({p["name"] for p in info["engine"]})
        gib = round(sum(p["rss"] for p in info["engine"]) / 2**30, 2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # signalled within the reaper's grace (10 s); the kernel may take longer to tear down GiBs under load
        survivors, waited = wait_gone(engine + [info["watchdog"]], 120)
        states = {pid: psutil.Process(pid).status() for pid in survivors if psutil.pid_exists(pid)}
        figures = (
            f"engine processes {names} ({len(engine)}, {gib} GiB RSS); alive {waited} s after the SIGKILL: {sorted(survivors)} {states}"
        )
        print(figures)
        assert "VLLM::EngineCore" in names, figures
        assert survivors == set(), figures
    finally:
        proc.kill()
        proc.wait()
        kill_all([p["pid"] for p in info["engine"]] + ([info["watchdog"]] if info["watchdog"] else []))


def test_a_watchdog_that_never_says_ready_fails_the_start_at_its_timeout(tmp_path, monkeypatch):
    """A watchdog that hangs silent (an import stuck on a dead NFS mount) fails the engine's start after
    `timeout_s`, instead of blocking it for as long as the watchdog lives."""
    silent = tmp_path / "silent-python"
    silent.write_text("#!/bin/sh\nexec sleep 60\n")
    silent.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(silent))
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="did not start"):
        Reaper.start(timeout_s=1.0)
    waited = time.monotonic() - started
    print(f"start gave up after {waited:.1f} s (timeout 1 s; the silent watchdog would live 60 s)")
    assert waited < 5, "the timeout (1 s) and one poll, not the watchdog's 60 s"
