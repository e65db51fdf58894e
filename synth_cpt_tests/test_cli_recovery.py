"""A CLI run whose process was killed does not hold the machine's `gpu` slot for ever: the next command that
opens the instance fails it and frees the slot; a run whose process is still going is left alone."""

from __future__ import annotations

import subprocess
import sys

import pytest

from synth_cpt.cli.common import fail_runs_of_dead_processes, run_tags


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

    # a real process that has ended: its pid names no process now (or another one, with another start time)
    child = subprocess.Popen([sys.executable, "-c", "import os, psutil; print(psutil.Process().create_time())"], stdout=subprocess.PIPE)
    started = float(child.communicate()[0])
    dead_tags = {**run_tags("synthesize"), "synth_cpt/pid": str(child.pid), "synth_cpt/pid_started": f"{started:.2f}"}
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

    reused = {**run_tags("ingest"), "synth_cpt/pid_started": "12.00"}  # this process's pid, another start time
    run_id = _started_run(instance, reused)
    assert len(fail_runs_of_dead_processes(instance)) == 1
    assert instance.get_run_by_id(run_id).status == DagsterRunStatus.FAILURE
