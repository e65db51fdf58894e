"""Definitions load and validate; assets run in a real instance; declarative automation propagates a drop."""

import json
import os
import shutil
import subprocess
import sys

import duckdb
import yaml
from dagster import (
    AssetKey,
    DagsterInstance,
    evaluate_automation_conditions,
)

from .conftest import EN_TEXT, PT_TEXT, REPO, write_jsonl


def test_dagster_definitions_validate(tmp_path):
    """The workspace loads in an instance made from the repository's dagster.yaml template."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    out = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", str(REPO / "workspace.yaml")],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Validation successful" in out.stderr + out.stdout


def _setup(tmp_path, monkeypatch):
    drops = tmp_path / "drops"
    write_jsonl(
        drops / "2026-11-01.jsonl", [{"text": f"{PT_TEXT} {i}", "edu": 3.0 + i / 10} for i in range(6)] + [{"text": EN_TEXT, "stem": 1.0}]
    )
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "storage_root": str(tmp_path / "home"),
                "drops": {"location": str(drops)},
                "tokenizer": {"vocab_size": 600},
                "subsets": {"default_budget_tokens": 200},
            }
        )
    )
    monkeypatch.setenv("SYNTH_CPT_CONFIG", str(cfg))
    monkeypatch.delenv("SYNTH_CPT_HOME", raising=False)
    monkeypatch.delenv("SYNTH_CPT_DROPS", raising=False)
    from synth_cpt.defs.definitions import build_definitions

    return build_definitions()


def test_a_new_drop_flows_downstream_by_automation(tmp_path, monkeypatch):
    defs = _setup(tmp_path, monkeypatch)
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("crawl_drops", ["2026-11-01.jsonl"])
        result = evaluate_automation_conditions(defs=defs, instance=instance)
        assert result.total_requested == 0, "nothing runs before a drop is ingested"

        ingest = defs.resolve_job_def("ingest_drop_job").execute_in_process(instance=instance, partition_key="2026-11-01.jsonl")
        assert ingest.success
        result = evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
        assert result.get_num_requested(AssetKey("raw_corpus")) == 4, "every language|quality partition of raw_corpus"
        assert result.get_num_requested(AssetKey("tokenizer")) == 0, "the tokenizer waits for raw_corpus"

        for key in ("pt|high", "pt|low", "en|high", "en|low"):
            assert defs.resolve_job_def("corpus_job").execute_in_process(instance=instance, partition_key=key).success
        result = evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
        assert result.get_num_requested(AssetKey("tokenizer")) == 1

        assert defs.resolve_job_def("tokenizer_job").execute_in_process(instance=instance).success
        result = evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
        assert result.get_num_requested(AssetKey("quality_subsets")) == 4


def test_checks_run_with_their_assets_and_block_on_bad_data(tmp_path, monkeypatch):
    defs = _setup(tmp_path, monkeypatch)
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("crawl_drops", ["2026-11-01.jsonl"])
        assert defs.resolve_job_def("ingest_drop_job").execute_in_process(instance=instance, partition_key="2026-11-01.jsonl").success
        for key in ("pt|high", "pt|low", "en|high", "en|low"):
            assert defs.resolve_job_def("corpus_job").execute_in_process(instance=instance, partition_key=key).success
        assert defs.resolve_job_def("tokenizer_job").execute_in_process(instance=instance).success
        result = defs.resolve_job_def("quality_subsets_job").execute_in_process(instance=instance, partition_key="pt|high")
        assert result.success
        evals = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
        names = {(ev.asset_key.to_user_string(), ev.check_name): ev.passed for ev in evals}
        assert names == {("quality_subsets", "documents_valid"): True, ("quality_subsets", "tokens_within_budget"): True}
        subset = tmp_path / "home/quality_subsets/pt/high/part-0.parquet"
        tokens, rows = duckdb.sql(f"select sum(n_tokens), count(*) from read_parquet('{subset}')").fetchall()[0]
        assert 0 < tokens <= 200 and rows >= 1

        # a bad candidate (a bucket filter that lets everything through) is validated before it is
        # published: the step fails, readers keep the previous file, the candidate is kept, downstream waits
        published = tmp_path / "home/raw_corpus/en/high/part-0.parquet"
        before = published.read_bytes()
        import polars as pl

        from synth_cpt.core.config import BucketBounds

        monkeypatch.setattr(BucketBounds, "expr", lambda self, column="quality_score": pl.lit(True))
        both = defs.resolve_implicit_job_def_def_for_assets([AssetKey("raw_corpus"), AssetKey("quality_subsets")])
        bad = both.execute_in_process(
            instance=instance, partition_key="en|high", raise_on_error=False,
            asset_selection=[AssetKey("raw_corpus"), AssetKey("quality_subsets")],
        )  # fmt: skip
        assert not bad.success
        evals = [e.event_specific_data for e in bad.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
        assert [(ev.asset_key.to_user_string(), ev.check_name, ev.passed) for ev in evals] == [("raw_corpus", "documents_valid", False)]
        assert not [e for e in bad.all_events if e.event_type_value == "ASSET_MATERIALIZATION"], "nothing was published"
        assert published.read_bytes() == before, "readers still see the previous good version"
        kept = list((tmp_path / "home/_rejected/raw_corpus/en/high").glob("*part-0.parquet"))
        assert len(kept) == 1 and duckdb.sql(f"select count(*) from read_parquet('{kept[0]}')").fetchall()[0][0] == 1
        steps = {e.step_key for e in bad.all_events if e.event_type_value == "STEP_START"}
        assert not any("quality_subsets" in k for k in steps), "the downstream asset did not run on it"


def test_blocking_quarantine_check_stops_a_bad_drop(tmp_path, monkeypatch):
    defs = _setup(tmp_path, monkeypatch)
    write_jsonl(tmp_path / "drops/bad.jsonl", [{"text": PT_TEXT}, b"{nope", b"[1]", b'{"text": null}'])
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("crawl_drops", ["bad.jsonl"])
        result = defs.resolve_job_def("ingest_drop_job").execute_in_process(
            instance=instance, partition_key="bad.jsonl", raise_on_error=False
        )
        evals = {
            e.event_specific_data.check_name: e.event_specific_data
            for e in result.all_events
            if e.event_type_value == "ASSET_CHECK_EVALUATION"
        }
        assert evals["quarantine_rate"].passed is False
        assert evals["quarantine_rate"].metadata["quarantine_rate"].value == 0.75
        assert evals["documents_valid"].passed is True
        pointer = json.loads((tmp_path / "home/crawl_drops/bad.jsonl/current.json").read_text())
        assert pointer["manifest"]["accepted"] is False
