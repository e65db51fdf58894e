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


def test_the_daemons_sensor_intervals_come_from_the_config(tmp_path, monkeypatch):
    defs = _setup(tmp_path, monkeypatch)
    shipped = {s.name: s.minimum_interval_seconds for s in defs.sensors}
    assert shipped == {"crawl_drop_sensor": 30, "synth_cpt_automation": 30}
    cfg = yaml.safe_load((tmp_path / "pipeline.yaml").read_text())
    cfg["drops"] |= {"sensor_interval_seconds": 5, "automation_interval_seconds": 7}
    (tmp_path / "faster.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("SYNTH_CPT_CONFIG", str(tmp_path / "faster.yaml"))  # another file: the config is cached by its path
    from synth_cpt.defs.definitions import build_definitions

    assert {s.name: s.minimum_interval_seconds for s in build_definitions().sensors} == {"crawl_drop_sensor": 5, "synth_cpt_automation": 7}


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
        # the exact subset, from the inputs: the six pt documents (all edu > 2.5: high) by score descending,
        # the longest prefix whose tokens (the published tokenizer's) fit the 200-token budget
        from synth_cpt.core.storage import LocalStorage
        from synth_cpt.corpus.tokenizer import TokenCounter

        counter = TokenCounter.from_storage(LocalStorage(tmp_path / "home"))
        by_score = [f"{PT_TEXT} {i}" for i in range(5, -1, -1)]
        counts = counter.count(by_score)
        fitting = 0
        while fitting < len(counts) and sum(counts[: fitting + 1]) <= 200:
            fitting += 1
        assert 0 < fitting < 6, "the budget cuts the six documents"
        subset = tmp_path / "home/quality_subsets/pt/high/part-0.parquet"
        got = duckdb.sql(f"select text, n_tokens from read_parquet('{subset}')").fetchall()
        assert got == list(zip(by_score[:fitting], counts[:fitting], strict=True))

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


def test_thresholds_profile_has_no_cutpoints_asset(tmp_path, monkeypatch):
    defs = _setup(tmp_path, monkeypatch)
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert "raw_corpus" in keys and "quality_cutpoints" not in keys


def _nemotron(tmp_path, monkeypatch, drops):
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "extends": str(REPO / "synth_cpt/defaults/nemotron.yaml"),
                "storage_root": str(tmp_path / "home"),
                "drops": {"location": str(drops)},
                "quality": {"percentile_sample": 150},  # fewer than the sample corpus' documents: the sample is a sample
            }
        )
    )
    monkeypatch.setenv("SYNTH_CPT_CONFIG", str(cfg))
    monkeypatch.delenv("SYNTH_CPT_HOME", raising=False)
    monkeypatch.delenv("SYNTH_CPT_DROPS", raising=False)
    from synth_cpt.defs.definitions import build_definitions

    return build_definitions()


def _expected_values(home, cuts: dict) -> dict[str, dict[str, float | None]]:
    """Each language's documents (earliest occurrence) and their bucket value, recomputed from the cut points."""
    import numpy as np
    import polars as pl

    files = sorted(home.glob("crawl_drops/*/v/*/docs.parquet"))
    docs = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed").sort(["drop_id", "source_line"])
    docs = docs.unique("doc_id", keep="first", maintain_order=True)
    out: dict[str, dict[str, float | None]] = {}
    for language, payload in cuts.items():
        table, values = payload["scores"], {}
        for row in docs.filter(pl.col("language") == language).iter_rows(named=True):
            fields = [
                int(np.digitize(row[f"score_{s}"], table[s]["cutpoints"]))
                for s in ("edu", "stem")
                if row[f"score_{s}"] is not None and table[s]["cutpoints"] is not None
            ]
            heuristic = table["heuristic"]["cutpoints"]
            value = max(fields) if fields else (int(np.digitize(row["score_heuristic"], heuristic)) if heuristic else None)
            values[row["doc_id"]] = value
        out[language] = values
    return out


def test_nemotron_profile_buckets_by_published_cut_points(tmp_path, monkeypatch):
    from .conftest import SAMPLE_DROPS

    drops = tmp_path / "drops"
    shutil.copytree(SAMPLE_DROPS, drops)
    defs = _nemotron(tmp_path, monkeypatch, drops)
    home = tmp_path / "home"
    with DagsterInstance.ephemeral() as instance:
        names = sorted(p.name for p in drops.iterdir())
        instance.add_dynamic_partitions("crawl_drops", names)
        result = evaluate_automation_conditions(defs=defs, instance=instance)
        for name in names:
            assert defs.resolve_job_def("ingest_drop_job").execute_in_process(instance=instance, partition_key=name).success
        result = evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
        assert result.get_num_requested(AssetKey("quality_cutpoints")) == 2
        assert result.get_num_requested(AssetKey("raw_corpus")) == 0, "raw_corpus waits for the cut points"

        cut_runs = {
            lang: defs.resolve_job_def("quality_cutpoints_job").execute_in_process(instance=instance, partition_key=lang)
            for lang in ("pt", "en")
        }
        assert all(r.success for r in cut_runs.values())
        cuts = {lang: json.loads((home / f"quality_cutpoints/{lang}/cutpoints.json").read_text()) for lang in ("pt", "en")}
        for lang, run in cut_runs.items():
            meta = run.asset_materializations_for_node("quality_cutpoints")[0].metadata
            assert meta["cutpoints_sha256"].value == cuts[lang]["sha256"]
            assert meta["sampled_documents"].value == 150
            assert meta["weight"].value == "characters"
            assert meta["drops_read"].value == names
        assert [len(cuts["pt"]["scores"]["edu"]["cutpoints"]), len(cuts["pt"]["scores"]["heuristic"]["cutpoints"])] == [19, 19]

        for key in ("pt|high", "pt|low", "en|high", "en|low"):
            run = defs.resolve_job_def("corpus_job").execute_in_process(instance=instance, partition_key=key)
            assert run.success
            lang = key.split("|")[0]
            assert run.asset_materializations_for_node("raw_corpus")[0].metadata["quality_cutpoints_sha256"].value == cuts[lang]["sha256"]

        expected = _expected_values(home, cuts)
        for lang in ("pt", "en"):
            high = {d: float(v) for d, v in expected[lang].items() if v is not None and v > 11}
            low = {d: float(v) for d, v in expected[lang].items() if v is not None and v <= 11}
            assert high and low, "the sample corpus fills both buckets"
            for quality, want in (("high", high), ("low", low)):
                got = duckdb.sql(
                    f"select doc_id, quality_score from read_parquet('{home}/raw_corpus/{lang}/{quality}/part-0.parquet')"
                ).fetchall()
                assert dict(got) == want, f"{lang}|{quality}"

        # rerun: same seed, same drops, same cut points; the history says unchanged
        before = (home / "quality_cutpoints/pt/cutpoints.json").read_bytes()
        again = defs.resolve_job_def("quality_cutpoints_job").execute_in_process(instance=instance, partition_key="pt")
        assert (home / "quality_cutpoints/pt/cutpoints.json").read_bytes() == before
        assert again.asset_materializations_for_node("quality_cutpoints")[0].metadata["changed"].value is False

        # a new drop of long, top-scored documents moves the edu cut points: a new version, visible in the metadata
        write_jsonl(drops / "2026-11-05_pt_new.jsonl", [{"text": f"{PT_TEXT * 20} {i}", "edu": 4.99, "language": "pt"} for i in range(60)])
        instance.add_dynamic_partitions("crawl_drops", ["2026-11-05_pt_new.jsonl"])
        assert (
            defs.resolve_job_def("ingest_drop_job").execute_in_process(instance=instance, partition_key="2026-11-05_pt_new.jsonl").success
        )
        moved = defs.resolve_job_def("quality_cutpoints_job").execute_in_process(instance=instance, partition_key="pt")
        meta = moved.asset_materializations_for_node("quality_cutpoints")[0].metadata
        new = json.loads((home / "quality_cutpoints/pt/cutpoints.json").read_text())
        assert meta["changed"].value is True
        assert (meta["previous_sha256"].value, meta["cutpoints_sha256"].value) == (cuts["pt"]["sha256"], new["sha256"])
        assert meta["drops_read"].value == sorted([*names, "2026-11-05_pt_new.jsonl"])
        assert new["scores"]["edu"]["cutpoints"] != cuts["pt"]["scores"]["edu"]["cutpoints"]
        history = instance.fetch_materializations(AssetKey("quality_cutpoints"), limit=10).records
        assert [r.asset_materialization.metadata["cutpoints_sha256"].value for r in history if r.partition_key == "pt"] == [
            new["sha256"], cuts["pt"]["sha256"], cuts["pt"]["sha256"],
        ]  # fmt: skip
