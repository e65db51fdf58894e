"""The production instance (deploy/dagster.yaml) on a real PostgreSQL: run, event-log and schedule storage in
Postgres, the QueuedRunCoordinator, and concurrent runs.

`dagster dev` runs on that instance. Its daemon ingests the sample corpus the way users rely on: the sensor
registers each of two sample drops and launches its ingest run, and declarative automation materializes raw_corpus, the
tokenizer and quality_subsets of the four partitions. Then two backfills of every generation asset over the
four partitions are launched at once. The runs use the openai backend against a test-double server on
127.0.0.1 (fault_server.py, answering every request). Every run goes through the queue.

Checked in Postgres itself, not in what the UI shows:
- every run succeeded and every event was recorded;
- every asset partition is materialized, and every asset check of every generation run was evaluated;
- the deploy file's limits held: the two runs of one partition never overlapped, and the queue started exactly
  as many generation runs at once as the `gpu` pool had slots (2), although one run per partition allows 4.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections import Counter

import pytest
import yaml

from .conftest import REPO, SAMPLE_DROPS, environ
from .dagster_dev import dagster_dev, start_backfill, wait_backfill
from .fault_server import FaultServer, echo_reply
from .postgres import postgres_server

pytestmark = pytest.mark.e2e

PARTITIONS = ["en|high", "en|low", "pt|high", "pt|low"]
ANSWER_S = 4.0  # a step then lasts longer than a run takes to start: at 1.5 s two runs overlapped but once their steps did not
GPU_SLOTS = 2  # fewer than the 4 runs the per-partition limit lets start at once: only the pool can hold them to 2
INGEST_HALF = ["raw_corpus", "quality_subsets"]
DROPS = ["2026-11-03_en_fortunes.jsonl.zst", "2026-11-03_pt_fortunes-br.jsonl.gz"]


def _slow_reply(body: dict) -> str:
    """Each answer takes ANSWER_S, as a GPU's would: a generation step lasts longer than the spread of its run's
    launch, so the steps the pool allows at once do run at once."""
    time.sleep(ANSWER_S)
    return echo_reply(body)


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    return max((sum(1 for s, e in spans if s <= start < e) for start, _ in spans), default=0)


def _overlapping(spans: list[tuple[float, float]]) -> bool:
    ordered = sorted(spans)
    return any(later[0] < earlier[1] for earlier, later in zip(ordered, ordered[1:], strict=False))


def test_a_postgres_instance_records_every_queued_run_event_check_and_partition_within_its_limits(tmp_path):
    from dagster import AssetKey, DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter
    from sqlalchemy import create_engine, text

    from synth_cpt.defs.definitions import build_definitions
    from synth_cpt.synthesis.prompts import load_kind

    with contextlib.ExitStack() as cleanup, postgres_server() as url:
        server = FaultServer(seed=18, reply=_slow_reply)
        cleanup.callback(server.stop)
        server.faulty = False  # a healthy server: this test is about the instance, not the client
        home = tmp_path / "dagster_home"
        home.mkdir()
        shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
        drops = tmp_path / "drops"  # two of the sample corpus's drops: every partition gets documents (thresholds are per document)
        drops.mkdir()
        for name in DROPS:
            shutil.copy(SAMPLE_DROPS / name, drops / name)
        config = tmp_path / "pipeline.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "extends": str(REPO / "synth_cpt" / "defaults" / "demo.yaml"),
                    "drops": {"location": str(drops), "settle_seconds": 0, "sensor_interval_seconds": 5, "automation_interval_seconds": 5},
                    # a cluster's backfills: one run per partition, spread by the queue's limits (README "Scaling out")
                    "synthesis": {"max_documents": 1, "routing": {"high": ["medium"], "low": ["medium"]}, "backfill": "per_partition"},
                    "generation": {"backend": "openai", "endpoints": [server.url], "served_model_name": "test-double", "concurrency": 4},
                }
            )
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNTH_CPT_", "DAGSTER_"))}
        env.update(DAGSTER_HOME=str(home), DAGSTER_PG_URL=url, SYNTH_CPT_HOME=str(tmp_path / "home"), SYNTH_CPT_CONFIG=str(config))
        restore = contextlib.ExitStack()
        restore.enter_context(environ({k: env[k] for k in ("DAGSTER_HOME", "DAGSTER_PG_URL", "SYNTH_CPT_CONFIG", "SYNTH_CPT_HOME")}))
        try:
            with DagsterInstance.get() as instance:
                storages = {type(s).__name__ for s in (instance.run_storage, instance.event_log_storage, instance.schedule_storage)}
                assert storages == {"PostgresRunStorage", "PostgresEventLogStorage", "PostgresScheduleStorage"}, storages
                assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
                instance.event_log_storage.set_concurrency_slots("gpu", GPU_SLOTS)
            generation = [f"rewrites_{s}" for s in load_kind("rewrite")] + ["entity_graphs", "entigraph_corpus"]
            started = time.monotonic()
            with dagster_dev(env, tmp_path) as (_dev, graphql_url, _port):
                # the sensor and automation ingest the sample corpus: wait until every partition's subset is there
                deadline = time.monotonic() + 600
                while True:
                    with DagsterInstance.get() as instance:
                        done = instance.get_materialized_partitions(AssetKey("quality_subsets"))
                        failed = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.FAILURE]))
                    assert not failed, [r.run_id for r in failed]
                    if done == set(PARTITIONS):
                        break
                    assert time.monotonic() < deadline, f"quality_subsets after 600 s: {sorted(done)}"
                    time.sleep(5)
                ingest_s = time.monotonic() - started
                # two backfills of every generation asset at once: two queued runs per partition
                backfills = [start_backfill(graphql_url, generation, PARTITIONS) for _ in range(2)]
                statuses = [wait_backfill(graphql_url, b, 900) for b in backfills]
            assert all(s.startswith("COMPLETED") for s in statuses), statuses

            with DagsterInstance.get() as instance:
                runs = instance.get_run_records()
                by_job = Counter(r.dagster_run.job_name for r in runs)
                assert {r.dagster_run.status for r in runs} == {DagsterRunStatus.SUCCESS}, [
                    (r.dagster_run.job_name, r.dagster_run.status.value) for r in runs if r.dagster_run.status != DagsterRunStatus.SUCCESS
                ]
                # every run's own events: it started, succeeded, and recorded each materialization it made
                for record in runs:
                    types = {e.dagster_event_type for e in instance.all_logs(record.dagster_run.run_id) if e.is_dagster_event}
                    assert {DagsterEventType.RUN_START, DagsterEventType.RUN_SUCCESS} <= types, record.dagster_run.run_id
                # every partition of the ingest half and of every generation asset is materialized
                for asset in INGEST_HALF + generation:
                    assert instance.get_materialized_partitions(AssetKey(asset)) == set(PARTITIONS), asset
                # the generation runs: one per partition per backfill; each evaluated every check of what it made
                synthesis_runs = [r for r in runs if r.dagster_run.tags.get("dagster/backfill") in backfills]
                assert sorted(r.dagster_run.tags["dagster/partition"] for r in synthesis_runs) == sorted(PARTITIONS * 2)
                defs = build_definitions()
                graph = defs.resolve_asset_graph()
                expected_checks = {k for k in graph.asset_check_keys if k.asset_key.to_user_string() in generation}
                evaluations = 0
                for record in synthesis_runs:
                    events = instance.get_records_for_run(
                        record.dagster_run.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION
                    ).records
                    checked = {e.event_log_entry.dagster_event.event_specific_data.asset_check_key for e in events}
                    assert checked == expected_checks, (record.dagster_run.run_id, sorted(map(str, checked)))
                    evaluations += len(events)
                # the limits: one run per partition at a time; at most GPU_SLOTS synthesis steps at a time
                for partition in PARTITIONS:
                    spans = [(r.start_time, r.end_time) for r in synthesis_runs if r.dagster_run.tags["dagster/partition"] == partition]
                    assert len(spans) == 2 and not _overlapping(spans), (partition, spans)
                all_evaluations = sum(
                    len(instance.get_records_for_run(r.dagster_run.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION).records)
                    for r in runs
                )
                steps: dict[str, list[float]] = {}
                for record in synthesis_runs:
                    for e in instance.all_logs(record.dagster_run.run_id):
                        if e.is_dagster_event and e.step_key == "synthesis" and e.dagster_event_type in (
                            DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS,
                        ):  # fmt: skip
                            steps.setdefault(record.dagster_run.run_id, []).append(e.timestamp)
                step_spans = [(min(t), max(t)) for t in steps.values()]
                runs_at_once = _most_at_once([(r.start_time, r.end_time) for r in synthesis_runs])
                steps_at_once = _most_at_once(step_spans)
            # and in Postgres itself
            engine = create_engine(url)
            with engine.connect() as db:
                db_runs = db.execute(text("select count(*) from runs")).scalar()
                db_events = db.execute(text("select count(*) from event_logs")).scalar()
                db_checks = db.execute(text("select count(*) from asset_check_executions")).scalar()
            engine.dispose()
        finally:
            restore.close()
    print(
        f"\nPostgres instance: {len(runs)} runs by job {dict(sorted(by_job.items()))}, all SUCCESS; in Postgres: {db_runs} runs, "
        f"{db_events} events, {db_checks} check executions; ingest half by sensor and automation in {ingest_s:.0f} s; "
        f"{len(synthesis_runs)} generation runs, {evaluations} check evaluations; at most {runs_at_once} generation runs and "
        f"{steps_at_once} synthesis steps at once (gpu slots {GPU_SLOTS}); the two runs of each partition never overlapped; "
        f"{all_evaluations} check evaluation events in all"
    )
    assert db_runs == len(runs)
    assert evaluations > 0 and db_checks == all_evaluations, "one check execution row per evaluation event, ingest runs' too"
    # the queue holds back a run whose step's pool is full (it does not start it to wait): runs and steps at once are
    # both the pool's slots, not the 4 that one run per partition would allow
    assert (runs_at_once, steps_at_once) == (GPU_SLOTS, GPU_SLOTS)
