"""Runs launched as the UI launches them: `dagster dev` (webserver, daemon, queued run coordinator,
multiprocess executor), backfills through the webserver's GraphQL API (what the Backfill button calls),
the real embedded engine.

1. A run whose step loaded vLLM in its own process ends (before the engine was closed at the end of the
   step, the step process never exited and the run stayed STARTED).
2. With `synth-cpt serve` up, a backfill of every generation asset over all four partitions completes,
   and the model is loaded once in total: by the server, none by the runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from .conftest import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.ui]

PARTITIONS = ["en|high", "en|low", "pt|high", "pt|low"]
LAUNCH = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on UnauthorizedError { message }
  }
}"""
STATUS = """
query($id: String!) {
  partitionBackfillOrError(backfillId: $id) { __typename ... on PartitionBackfill { status } ... on PythonError { message } }
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: what `dagster dev` and `synth-cpt serve` shut down cleanly on
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """An ingested instance with `dagster dev` on 127.0.0.1 (no model server yet)."""
    base = tmp_path_factory.mktemp("ui")
    dagster_home = base / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(REPO / "dagster.yaml", dagster_home / "dagster.yaml")
    config = base / "pipeline.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "extends": "defaults",
                "synthesis": {"max_documents": 1, "min_pass_rate": 0.0},
                # a small KV cache: the test session may hold another engine at the same time
                "generation": {"gpu_memory_utilization": 0.1},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNTH_CPT_", "DAGSTER_"))}
    env.update(
        DAGSTER_HOME=str(dagster_home), SYNTH_CPT_HOME=str(base / "home"), SYNTH_CPT_CONFIG=str(config),
        SYNTH_CPT_MODELS=str(base / "models"), COLUMNS="200",
    )  # fmt: skip
    ingest = subprocess.run([_bin("synth-cpt"), "ingest"], env=env, cwd=base, capture_output=True, text=True, timeout=900)
    assert ingest.returncode == 0, ingest.stderr[-3000:]
    port = _free_port()
    log = open(base / "dagster_dev.log", "w")
    dev = subprocess.Popen(
        [_bin("dagster"), "dev", "-h", "127.0.0.1", "-p", str(port), "-m", "synth_cpt.definitions"],
        env=env, cwd=base, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/graphql"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.post(url, json={"query": "{ version }"}, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert dev.poll() is None and time.monotonic() < deadline, (base / "dagster_dev.log").read_text()[-3000:]
            time.sleep(2)
        yield {"url": url, "env": env, "base": base, "dagster_home": dagster_home}
    finally:
        _stop(dev)
        log.close()


def _graphql(url: str, query: str, variables: dict) -> dict:
    resp = httpx.post(url, json={"query": query, "variables": variables}, timeout=60)
    resp.raise_for_status()
    body = resp.json()
    assert "errors" not in body, body["errors"]
    return body["data"]


def _backfill(ui: dict, assets: list[str], partitions: list[str], timeout_s: float) -> tuple[str, str]:
    params = {"partitionNames": partitions, "assetSelection": [{"path": [a]} for a in assets], "fromFailure": False}
    launched = _graphql(ui["url"], LAUNCH, {"params": params})["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    backfill_id = launched["backfillId"]
    deadline = time.monotonic() + timeout_s
    status = "REQUESTED"
    while time.monotonic() < deadline:
        got = _graphql(ui["url"], STATUS, {"id": backfill_id})["partitionBackfillOrError"]
        status = got.get("status")
        if status not in ("REQUESTED", "CANCELING", "FAILING"):
            break
        time.sleep(5)
    return backfill_id, status


def _runs(ui: dict, backfill_id: str):
    from dagster import RunsFilter

    with _instance(ui) as instance:
        runs = instance.get_runs(RunsFilter(tags={"dagster/backfill": backfill_id}))
        materialized = {}
        for run in runs:
            for record in instance.get_records_for_run(run.run_id, of_type=_materialization_type()).records:
                m = record.event_log_entry.asset_materialization
                materialized[(m.asset_key.to_user_string(), m.partition)] = {k: v.value for k, v in m.metadata.items()}
        return [(r.run_id, r.status.value) for r in runs], materialized


@contextlib.contextmanager
def _instance(ui: dict):
    """The test's instance, opened from this process (its dagster.yaml reads DAGSTER_HOME)."""
    from dagster import DagsterInstance

    saved = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(ui["dagster_home"])
    try:
        with DagsterInstance.get() as instance:
            yield instance
    finally:
        if saved is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = saved


def _most_at_once(ui: dict, backfill_id: str) -> int:
    """How many of the backfill's runs were in progress at the same moment."""
    from dagster import RunsFilter

    with _instance(ui) as instance:
        records = instance.get_run_records(RunsFilter(tags={"dagster/backfill": backfill_id}))
    spans = [(r.start_time, r.end_time) for r in records if r.start_time and r.end_time]
    return max((sum(1 for s, e in spans if s <= start < e) for start, _ in spans), default=0)


def _materialization_type():
    from dagster import DagsterEventType

    return DagsterEventType.ASSET_MATERIALIZATION


def test_a_daemon_run_with_vllm_in_its_step_process_ends(ui):
    """The in-process engine (no server up) through the daemon and the multiprocess executor: the run
    reaches SUCCESS, which it can only do once its step process has exited."""
    backfill_id, status = _backfill(ui, ["rewrites_medium"], ["en|high"], timeout_s=900)
    runs, materialized = _runs(ui, backfill_id)
    assert [s for _, s in runs] == ["SUCCESS"], (status, runs, (ui["base"] / "dagster_dev.log").read_text()[-4000:])
    assert status.startswith("COMPLETED"), status
    meta = materialized[("rewrites_medium", "en|high")]
    assert meta["engine"] == "vllm" and meta["engine_loads"] == 1, meta


def test_a_backfill_of_every_generation_asset_over_all_partitions_loads_the_model_once(ui):
    from synth_cpt.defs.synthesis import ENTIGRAPH_PROMPTS  # noqa: F401  (the module defines the group)
    from synth_cpt.synthesis.prompts import load_kind

    assets = [f"rewrites_{s}" for s in load_kind("rewrite")] + ["entity_graphs", "entigraph_corpus"]
    port = _free_port()
    serve_log = open(ui["base"] / "serve.out", "w")
    server = subprocess.Popen(
        [_bin("synth-cpt"), "serve", "--port", str(port)], env=ui["env"], cwd=ui["base"],
        stdout=serve_log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        servers = ui["base"] / "models" / ".servers"
        deadline = time.monotonic() + 600
        record = None
        while record is None or record.get("state") != "ready":
            assert server.poll() is None and time.monotonic() < deadline, (ui["base"] / "serve.out").read_text()[-3000:]
            time.sleep(2)
            found = sorted(servers.glob("*.json")) if servers.is_dir() else []
            record = json.loads(found[0].read_text()) if found else None
        with _instance(ui) as instance:  # the server holds the engine: the partitions' runs may feed it at once (README)
            instance.event_log_storage.set_concurrency_slots("gpu", len(PARTITIONS))
        backfill_id, status = _backfill(ui, assets, PARTITIONS, timeout_s=1800)
        runs, materialized = _runs(ui, backfill_id)
        assert status.startswith("COMPLETED") and len(runs) == len(PARTITIONS), (status, runs)
        assert {s for _, s in runs} == {"SUCCESS"}, runs
        assert set(materialized) == {(a, p) for a in assets for p in PARTITIONS}
        assert {m["engine_loads"] for m in materialized.values()} == {0}, "no run loads a model"
        engines = {m.get("engine") for m in materialized.values() if m.get("sent", 0)}
        assert engines == {"vllm-serve"}, engines  # every request sent went to the server
        assert server.poll() is None, "the server served the whole backfill"
        loads = Path(record["log"]).read_text().count("Loading weights took")
        assert loads == 1, f"model loads in the server's log: {loads}"
        together = _most_at_once(ui, backfill_id)
        assert together >= 2, "the partitions' runs fed the one server at the same time"
        print(
            f"backfill {backfill_id}: {len(runs)} runs ({together} at once), {len(materialized)} materializations, "
            f"model loads: server {loads} + runs 0"
        )
    finally:
        _stop(server)
        serve_log.close()
    assert not list(servers.glob("*.json")), "the server's record goes with it"
