"""What holds for parallel work: runs of one partition queue behind each other (dagster.yaml), and if
two do run at once anyway (the in-process CLI, two machines), the cache stays whole and readers see
one result per request."""

import shutil
import subprocess
import sys
import uuid

import polars as pl

from synth_cpt.core.storage import LocalStorage
from synth_cpt.generation.cache import GenerationCache

from .conftest import REPO
from .doubles import make_requests


def test_the_instance_queues_a_second_run_of_the_same_partition(tmp_path, monkeypatch):
    from dagster import DagsterInstance, DagsterRunStatus
    from dagster._core.remote_origin import InProcessCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
    from dagster._core.storage.dagster_run import DagsterRun
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
    from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")  # the template `make instance` installs
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    origin = RemoteJobOrigin(
        RemoteRepositoryOrigin(InProcessCodeLocationOrigin(LoadableTargetOrigin(module_name="synth_cpt.definitions")), "__repository__"),
        "__ASSET_JOB",
    )
    with DagsterInstance.get() as instance:
        for partition in ("pt|high", "pt|high", "en|high", "en|low"):
            run = DagsterRun(
                job_name="__ASSET_JOB", run_id=str(uuid.uuid4()), status=DagsterRunStatus.QUEUED,
                tags={"dagster/partition": partition}, remote_job_origin=origin,
            )  # fmt: skip
            instance.add_run(run)
        daemon = QueuedRunCoordinatorDaemon(interval_seconds=1)
        launched = daemon._get_runs_to_dequeue(instance, instance.get_concurrency_config(), None)
    assert sorted(r.tags["dagster/partition"] for r in launched) == ["en|high", "en|low", "pt|high"]


def _worker(root, n, log, scope):
    return subprocess.Popen(
        [sys.executable, "-m", "synth_cpt_tests.gen_worker", str(root), str(n), "0.003", str(log), scope],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_two_simultaneous_runs_of_one_partition_leave_no_duplicated_or_corrupt_rows(tmp_path):
    root, scope = tmp_path / "home", "rewrites_easy/pt/high"
    a, b = _worker(root, 50, tmp_path / "a.log", scope), _worker(root, 50, tmp_path / "b.log", scope)
    assert a.wait(timeout=120) == 0 and b.wait(timeout=120) == 0, a.stderr.read() + b.stderr.read()
    cache = GenerationCache(LocalStorage(root))
    rows = cache.load()  # every segment reads back whole
    # a worker that found everything cached sent nothing and wrote no log
    sent = [i for log in (tmp_path / "a.log", tmp_path / "b.log") if log.exists() for i in log.read_text().split()]
    ids = [r.request_id("fp-double") for r in make_requests(50)]
    assert set(sent) == set(ids), "every request was sent by one worker or both"
    assert rows.height == len(sent) and rows["error"].is_null().all(), "one cached row per request sent"
    results = cache.finished(ids, scope=scope)
    assert results.height == 50 and results["request_id"].n_unique() == 50, "one row per request"
    # both workers write the same text for a request: the row that wins is the one in the segment whose
    # name (flush time first) sorts first, for `finished` (the index lookup) as for `load`
    name = pl.col("segment").str.extract(r"([^/]+)$")
    earliest = rows.sort(name, "created_at").unique("request_id", keep="first", maintain_order=True)
    won = ["request_id", "created_at", "segment"]
    assert results.select(won).sort("request_id").equals(earliest.select(won).sort("request_id"))
    assert cache.compact()["rows_after"] == 50
    assert cache.load().filter(pl.col("request_id").is_in(ids)).height == 50
