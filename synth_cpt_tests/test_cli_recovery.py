"""A CLI run whose process was killed does not hold the machine's `gpu` slot for ever: the next command that
opens the instance fails it and frees the slot; a run whose process is still going is left alone."""

from __future__ import annotations

import subprocess
import sys

import pytest

from synth_cpt.cli.common import fail_runs_of_dead_processes, run_tags
from synth_cpt.core.processes import process_started


@pytest.fixture
def instance(tmp_path):
    from dagster import DagsterInstance

    (tmp_path / "dagster_home").mkdir()
    with DagsterInstance.local_temp(str(tmp_path / "dagster_home")) as inst:
        inst.event_log_storage.set_concurrency_slots("gpu", 1)
        yield inst


def _started_run(instance, tags: dict[str, str]) -> str:
    from dagster import DagsterRunStatus
    from dagster._core.storage.dagster_run import DagsterRun
    from dagster._core.utils import make_new_run_id

    run = DagsterRun(job_name="__ASSET_JOB", run_id=make_new_run_id(), status=DagsterRunStatus.STARTED, tags=tags)
    instance.add_run(run)
    return run.run_id


def test_a_killed_runs_slot_is_freed_and_the_run_failed_while_a_live_run_keeps_its_own(instance):
    from dagster import DagsterRunStatus

    # a real process that has ended: its pid names no process now (or another one, started at another tick)
    child = subprocess.Popen([sys.executable, "-c", "import os; print(open(f'/proc/{os.getpid()}/stat').read().rsplit(')', 1)[1].split()[19])"],
                             stdout=subprocess.PIPE)  # fmt: skip
    started = child.communicate()[0].decode().strip()
    dead_tags = {**run_tags("synthesize"), "synth_cpt/pid": str(child.pid), "synth_cpt/pid_started": started}
    dead = _started_run(instance, dead_tags)
    live = _started_run(instance, run_tags("synthesize"))  # this test's own process
    storage = instance.event_log_storage
    storage.claim_concurrency_slot("gpu", dead, "synthesis")
    assert storage.get_concurrency_run_ids() == {dead}

    said = fail_runs_of_dead_processes(instance)

    assert len(said) == 1 and dead[:8] in said[0] and f"pid {child.pid}" in said[0]
    assert instance.get_run_by_id(dead).status == DagsterRunStatus.FAILURE
    assert instance.get_run_by_id(live).status == DagsterRunStatus.STARTED
    assert storage.get_concurrency_run_ids() == set()
    # the slot the dead run held can be claimed again at once
    assert storage.claim_concurrency_slot("gpu", live, "synthesis").is_claimed
    assert fail_runs_of_dead_processes(instance) == []  # nothing more to do; the live run keeps its slot
    assert storage.get_concurrency_run_ids() == {live}


def test_a_reused_pid_is_not_taken_for_the_run_s_process(instance):
    """The pid alive but started at another time is another process: the run's own is gone."""
    from dagster import DagsterRunStatus

    reused = {**run_tags("ingest"), "synth_cpt/pid_started": "12"}  # this process's pid, another start tick
    run_id = _started_run(instance, reused)
    assert len(fail_runs_of_dead_processes(instance)) == 1
    assert instance.get_run_by_id(run_id).status == DagsterRunStatus.FAILURE


def test_runs_of_another_machine_or_pid_namespace_are_never_judged(instance):
    """Another host, or a container with this host's name but its own pids: its pids mean nothing here, so its
    runs are left alone even when no process here has that pid."""
    from dagster import DagsterRunStatus

    host, boot, ns = run_tags("synthesize")["synth_cpt/machine"].split("/")
    gone = {"synth_cpt/pid": "4194303", "synth_cpt/pid_started": "1"}  # above any pid this kernel hands out
    others = [
        _started_run(instance, {**run_tags("synthesize"), **gone, "synth_cpt/machine": machine})
        for machine in (f"other-host/{boot}/{ns}", f"{host}/another-boot/{ns}", f"{host}/{boot}/another-pid-namespace")
    ]
    assert process_started(4194303) is None
    assert fail_runs_of_dead_processes(instance) == []
    assert [instance.get_run_by_id(r).status for r in others] == [DagsterRunStatus.STARTED] * 3
    mine = _started_run(instance, {**run_tags("synthesize"), **gone})
    assert len(fail_runs_of_dead_processes(instance)) == 1
    assert instance.get_run_by_id(mine).status == DagsterRunStatus.FAILURE
