"""The generation assets through Dagster, with the deterministic test double as the engine's backend."""

import json
import re

import duckdb
import pytest
import yaml
from dagster import AssetKey, DagsterInstance, materialize

from synth_cpt.core.storage import LocalStorage
from synth_cpt.defs.resources import LLM, PipelineResource
from synth_cpt.generation.cache import GenerationCache
from synth_cpt.generation.engine import GenerationEngine
from synth_cpt.generation.prompt_archive import archived_prompt
from synth_cpt.synthesis.prompts import load_kind

from .conftest import EN_TEXT, PT_TEXT, write_jsonl
from .doubles import DeterministicTestBackend

PARTITION = "pt|high"


def swapped_words(prepared) -> str:
    """A 'rewrite' in the document's own words, reordered: Portuguese, as long as the source, not a copy."""
    user = prepared.request.messages[-1][1]
    text = re.split(r"\n(?:Texto|Text|TEXTO)[^\n]*:\s*\n", user)[-1]
    words = text.split()
    for i in range(0, len(words) - 1, 2):
        words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


class LLMWithTestDouble(LLM):
    """The LLM resource with the test double behind it (tests only). The double counts a "load" the first
    time it is handed requests, as VLLMBackend does, so the assets' `engine_loads` figure is measured."""

    def engine(self, storage, storage_root, log=None, progress=None):
        return GenerationEngine(DOUBLE["backend"], GenerationCache(storage), model="test-double", model_fingerprint="fp-double", log=log)

    def generator_tokenizer_file(self, storage_root, log=None):
        """The double serves no model folder: without generation.tokenizer the target tokenizer chunks."""
        return super().generator_tokenizer_file(storage_root, log) if self.tokenizer else None


DOUBLE: dict = {}


def shipped_prompts():
    return [p for kind in ("rewrite", "entigraph", "judge") for p in load_kind(kind).values()]


def configure(tmp_path, monkeypatch, seed: int = 1234, mixes: dict | None = None, **synthesis):
    """Definitions for a config over the small test drop (generation capped to 3 documents). Each
    config is a new file: the process caches a config by its path."""
    cfg = tmp_path / f"pipeline-{len(list(tmp_path.glob('pipeline-*.yaml')))}.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "storage_root": str(tmp_path / "home"),
                "drops": {"location": str(tmp_path / "drops"), "settle_seconds": 0},
                "tokenizer": {"vocab_size": 600},
                "subsets": {"default_budget_tokens": 100000},
                "synthesis": {"max_documents": 3, "min_pass_rate": 0.0, **synthesis},
                "seeds": {"synthesis": seed},
                **({"mixes": mixes} if mixes else {}),
            }
        )
    )
    monkeypatch.setenv("SYNTH_CPT_CONFIG", str(cfg))
    monkeypatch.delenv("SYNTH_CPT_HOME", raising=False)
    monkeypatch.delenv("SYNTH_CPT_DROPS", raising=False)
    from synth_cpt.defs.definitions import build_definitions

    return build_definitions()


def ingest_small_corpus(tmp_path, monkeypatch, **synthesis):
    """Five Portuguese documents and one English one, ingested up to quality_subsets of pt|high."""
    docs = [{"text": f"Documento {i}. {PT_TEXT} Foram {i + 3} escolas em 2024.", "edu": 3.0 + i / 10} for i in range(5)]
    write_jsonl(tmp_path / "drops" / "2026-11-01.jsonl", docs + [{"text": EN_TEXT, "stem": 1.0}])
    defs = configure(tmp_path, monkeypatch, **synthesis)
    ingest_to_quality_subsets(defs)
    return defs, tmp_path / "home"


def ingest_to_quality_subsets(defs, drop: str = "2026-11-01.jsonl") -> None:
    """The drop's jobs in order, as the sensor and the UI run them: ingest, every corpus partition, the
    tokenizer, then quality_subsets of PARTITION."""
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("crawl_drops", [drop])
        assert defs.resolve_job_def("ingest_drop_job").execute_in_process(instance=instance, partition_key=drop).success
        for key in ("pt|high", "pt|low", "en|high", "en|low"):
            assert defs.resolve_job_def("corpus_job").execute_in_process(instance=instance, partition_key=key).success
        assert defs.resolve_job_def("tokenizer_job").execute_in_process(instance=instance).success
        assert defs.resolve_job_def("quality_subsets_job").execute_in_process(instance=instance, partition_key=PARTITION).success


@pytest.fixture
def pipeline(tmp_path, monkeypatch):
    defs, home = ingest_small_corpus(tmp_path, monkeypatch)
    DOUBLE["backend"] = DeterministicTestBackend(reply=lambda p: None if p.request.json_schema else swapped_words(p))
    with DagsterInstance.ephemeral() as instance:
        yield defs, instance, home, lambda **kw: configure(tmp_path, monkeypatch, **kw)


def synthesize(defs, instance, assets, raise_on_error=True):
    synthesis = next(a for a in defs.assets if getattr(a, "node_def", None) is not None and a.node_def.name == "synthesis")
    return materialize(
        [synthesis], instance=instance, partition_key=PARTITION, selection=[AssetKey(a) for a in assets],
        resources={"pipeline": PipelineResource(), "llm": LLMWithTestDouble()}, raise_on_error=raise_on_error,
    )  # fmt: skip


def materializations(result) -> dict[str, dict]:
    return {
        e.asset_key.to_user_string(): {k: v.value for k, v in e.event_specific_data.materialization.metadata.items()}
        for e in result.get_asset_materialization_events()
    }


def test_generation_assets_publish_rows_with_lineage_and_rerun_sends_nothing(pipeline):
    defs, instance, home, _ = pipeline
    wanted = ["rewrites_medium", "rewrites_distill", "entity_graphs", "entigraph_corpus"]
    first = synthesize(defs, instance, wanted)
    meta = materializations(first)
    assert set(meta) == set(wanted)
    assert "not routed" not in json.dumps(meta["rewrites_medium"]) and meta["rewrites_medium"]["sent"] > 0
    assert meta["rewrites_distill"]["not_routed"] == "style 'distill' applies to buckets [] (its prompt file), not 'high'"
    assert meta["rewrites_distill"]["dagster/row_count"] == 0
    assert {m["chunking_tokenizer"]["tokenizer"] for m in meta.values()} == {"target"}  # the double names no generator tokenizer
    # one load for the whole run, shared by the three assets that generate; the unrouted one (first) needed no engine
    assert DOUBLE["backend"].loads == 1
    assert {a: meta[a]["engine_loads"] for a in wanted} == {
        "rewrites_distill": 0,
        "rewrites_medium": 1,
        "entity_graphs": 1,
        "entigraph_corpus": 1,
    }
    assert {a: meta[a]["speculation"] for a in wanted} == {
        "rewrites_distill": "off (no engine was needed)",
        **dict.fromkeys(["rewrites_medium", "entity_graphs", "entigraph_corpus"], "off (not an in-process vLLM engine)"),
    }
    evals = [e.event_specific_data for e in first.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert {(ev.asset_key.to_user_string(), ev.check_name) for ev in evals} == {(a, c) for a in wanted for c in ("rows_valid", "pass_rate")}
    assert all(ev.passed for ev in evals)

    # every row leads back to a subset document and to its generations in the cache
    rows_glob = f"{home}/rewrites_medium/pt/high/v/*/rows.parquet"
    rows = duckdb.sql(
        f"select doc_id, drop_id, source_line, request_ids, prompt_sha, model_fingerprint from read_parquet('{rows_glob}')"
    ).fetchall()
    assert rows
    subset = dict(duckdb.sql(f"select doc_id, source_line from read_parquet('{home}/quality_subsets/pt/high/part-0.parquet')").fetchall())
    cache = GenerationCache(LocalStorage(home))
    for doc_id, drop_id, line, request_ids, prompt_sha, fingerprint in rows:
        assert subset[doc_id] == line and drop_id == "2026-11-01.jsonl"
        found = cache.finished(request_ids)
        assert set(found["request_id"].to_list()) == set(request_ids)
        assert set(found["prompt_sha"].to_list()) == {prompt_sha} and set(found["model_fingerprint"].to_list()) == {fingerprint}
    # rows carry the version of the drop they came from, and every prompt file they name is archived by its SHA
    drop_version = json.loads((home / "crawl_drops/2026-11-01.jsonl/current.json").read_text())["version"]
    storage = LocalStorage(home)
    for table in (
        "rewrites_medium/pt/high/v/*/rows.parquet",
        "entigraph_corpus/pt/high/v/*/rows.parquet",
        "entity_graphs/pt/high/v/*/summaries.parquet",
    ):
        made = duckdb.sql(f"select distinct drop_version, prompt_sha from read_parquet('{home}/{table}')").fetchall()
        assert made and {v for v, _ in made} == {drop_version}, table
        for _, sha in made:
            assert archived_prompt(storage, sha) == next(p.raw for p in shipped_prompts() if p.sha == sha).decode("utf-8")
    corpus = duckdb.sql(
        f"select kind, count(*) from read_parquet('{home}/entigraph_corpus/pt/high/v/*/rows.parquet') group by kind"
    ).fetchall()
    assert dict(corpus)["entigraph_summary"] == 3
    # the double lists two entities per document: one pair each, no triple possible
    figures = {k: meta["entigraph_corpus"][k] for k in ("pairs_possible", "pairs_planned", "triples_possible", "triples_planned")}
    assert figures == {"pairs_possible": 3, "pairs_planned": 3, "triples_possible": 0, "triples_planned": 0}
    assert meta["entigraph_corpus"]["pairs_written"] == dict(corpus)["entigraph_pair"] == 3
    assert meta["entigraph_corpus"]["budget"] == "every pair, then triples: triples_per_document 8 per document"

    # a second materialization sends zero requests and publishes the same rows
    sent = len(DOUBLE["backend"].sent)
    second = materializations(synthesize(defs, instance, wanted))
    assert len(DOUBLE["backend"].sent) == sent
    assert all(second[a].get("sent", 0) == 0 for a in wanted)
    assert all(second[a]["engine_loads"] == 0 for a in wanted) and DOUBLE["backend"].loads == 1, "a run with nothing to send loads nothing"
    assert second["rewrites_medium"]["dagster/row_count"] == meta["rewrites_medium"]["dagster/row_count"]


def test_pass_rate_below_minimum_blocks_publishing(pipeline):
    defs, instance, home, configure = pipeline
    assert synthesize(defs, instance, ["rewrites_easy"]).success
    before = (home / "rewrites_easy/pt/high/current.json").read_text()
    DOUBLE["backend"] = DeterministicTestBackend(reply=lambda p: "Desculpe, não posso ajudar com isso.")
    strict = configure(seed=99, min_pass_rate=0.5)  # a new seed makes new requests, answered with refusals
    bad = synthesize(strict, instance, ["rewrites_easy"], raise_on_error=False)
    assert not bad.success
    evals = {
        ev.check_name: ev.passed for ev in (e.event_specific_data for e in bad.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION")
    }
    assert evals == {"rows_valid": True, "pass_rate": False}
    assert not bad.get_asset_materialization_events()
    assert (home / "rewrites_easy/pt/high/current.json").read_text() == before, "readers keep the previous version"
    kept = list((home / "_rejected/rewrites_easy/pt/high/v").glob("*/rejects.parquet"))
    assert len(kept) == 1
    reasons = duckdb.sql(f"select distinct reason_code from read_parquet('{kept[0]}')").fetchall()
    assert reasons == [("refusal",)]


def test_generation_is_manual_unless_configured_eager(pipeline):
    defs, _, _, configure = pipeline
    graph = defs.resolve_asset_graph()
    assert graph.get(AssetKey("rewrites_medium")).automation_condition is None
    eager = configure(automation="eager").resolve_asset_graph()
    assert eager.get(AssetKey("rewrites_medium")).automation_condition is not None
    assert eager.get(AssetKey("entigraph_corpus")).automation_condition is not None


def test_a_backfill_is_one_run_unless_configured_per_partition(pipeline):
    from dagster import BackfillPolicy

    defs, _, _, configure = pipeline
    assert defs.resolve_asset_graph().get(AssetKey("rewrites_medium")).backfill_policy == BackfillPolicy.single_run()
    per_partition = configure(backfill="per_partition").resolve_asset_graph()
    assert per_partition.get(AssetKey("entity_graphs")).backfill_policy is None  # Dagster's default: a run per partition


def test_a_run_over_several_partitions_publishes_each_with_its_own_events(pipeline):
    """A single-run backfill's step covers a range: every asset of every partition is published and checked under
    its own partition key, and their requests share one engine run."""
    defs, instance, home, _ = pipeline
    assert defs.resolve_job_def("quality_subsets_job").execute_in_process(instance=instance, partition_key="en|low").success
    synthesis = next(a for a in defs.assets if getattr(a, "node_def", None) is not None and a.node_def.name == "synthesis")
    result = materialize(
        [synthesis], instance=instance, selection=[AssetKey("rewrites_medium"), AssetKey("entity_graphs")],
        tags={"dagster/asset_partition_range_start": "pt|high", "dagster/asset_partition_range_end": "en|low"},
        resources={"pipeline": PipelineResource(), "llm": LLMWithTestDouble()}, raise_on_error=False,
    )  # fmt: skip
    failure = next(e.event_specific_data.error.to_string() for e in result.all_events if e.is_step_failure)
    assert not result.success and "2 generation step(s) failed" in failure and "pt|low: FileNotFoundError" in failure, failure
    made = {(e.asset_key.to_user_string(), e.partition) for e in result.get_asset_materialization_events()}
    # the range is every pair of its languages and qualities: pt|low and en|high too (their subsets are not made: the
    # run fails for them, the others are published)
    assert made == {(a, p) for a in ("rewrites_medium", "entity_graphs") for p in ("pt|high", "en|low")}
    checks = sorted(
        (ev.asset_key.to_user_string(), ev.partition, ev.check_name)
        for ev in (e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION")
    )
    assert checks == sorted((a, p, c) for a, p in made for c in ("pass_rate", "rows_valid"))
    assert instance.get_materialized_partitions(AssetKey("entity_graphs")) == {"pt|high", "en|low"}
    assert (home / "rewrites_medium/en/low/current.json").is_file() and (home / "entity_graphs/pt/high/current.json").is_file()
    assert not (home / "rewrites_medium/pt/low").exists()
    logs = [r.user_message for r in instance.all_logs(result.run_id) if r.user_message.startswith("joint engine run: {")]
    # one joint run for the step: 2 assets x 2 partitions ran through it, 4 documents each (3 of pt|high, 1 of en|low)
    assert len(logs) == 1 and "'joint_runs': 4," in logs[0] and "'joint_sent': 8," in logs[0], logs


def test_an_output_whose_publish_raises_fails_alone_and_the_others_are_published(pipeline, monkeypatch):
    """Storage failing while one output is published (after its rows were made): that output is neither
    published nor reported materialized, the step fails naming it, and every other output is published."""
    from synth_cpt.defs import synthesis as synthesis_defs

    defs, instance, home, _ = pipeline
    real = synthesis_defs.publish_tables

    def publish_tables(storage, asset, *args, **kwargs):
        if asset == "rewrites_medium":
            raise OSError("disk full (a test double of storage)")
        return real(storage, asset, *args, **kwargs)

    monkeypatch.setattr(synthesis_defs, "publish_tables", publish_tables)
    result = synthesize(defs, instance, ["rewrites_medium", "rewrites_distill", "entity_graphs"], raise_on_error=False)
    failure = next(e.event_specific_data.error.to_string() for e in result.all_events if e.is_step_failure)
    assert not result.success and "1 generation step(s) failed" in failure, failure
    assert "rewrites_medium pt|high: publishing: OSError: disk full" in failure, failure
    assert set(materializations(result)) == {"rewrites_distill", "entity_graphs"}
    assert (home / "rewrites_distill/pt/high/current.json").is_file() and (home / "entity_graphs/pt/high/current.json").is_file()
    assert not (home / "rewrites_medium/pt/high/current.json").exists()


def test_a_new_drop_sends_only_the_new_documents_requests(pipeline, tmp_path):
    """The cache is content-addressed: after a new drop, rematerializing a style asks only for the
    documents it has not seen (the drop, raw_corpus, tokenizer and subset all rebuilt in between)."""
    _, instance, home, configure = pipeline
    defs = configure(max_documents=None)
    first = materializations(synthesize(defs, instance, ["rewrites_medium"]))["rewrites_medium"]
    assert first["documents"] == 5 and first["sent"] == first["chunks"] >= 5
    new = [{"text": f"Documento novo {i}. {PT_TEXT} Em {1990 + i} havia {i + 7} salas.", "edu": 4.5} for i in range(2)]
    write_jsonl(tmp_path / "drops" / "2026-11-02.jsonl", new)
    instance.add_dynamic_partitions("crawl_drops", ["2026-11-02.jsonl"])
    assert defs.resolve_job_def("ingest_drop_job").execute_in_process(instance=instance, partition_key="2026-11-02.jsonl").success
    assert defs.resolve_job_def("corpus_job").execute_in_process(instance=instance, partition_key=PARTITION).success
    assert defs.resolve_job_def("tokenizer_job").execute_in_process(instance=instance).success
    assert defs.resolve_job_def("quality_subsets_job").execute_in_process(instance=instance, partition_key=PARTITION).success
    sent_before = len(DOUBLE["backend"].sent)
    second = materializations(synthesize(defs, instance, ["rewrites_medium"]))["rewrites_medium"]
    assert second["documents"] == 7 and second["sent"] == 2 and second["cache_hits"] == first["sent"]
    assert len(DOUBLE["backend"].sent) - sent_before == 2
    assert second["dagster/row_count"] == first["dagster/row_count"] + 2


def test_mix_asset_fails_up_front_on_a_shortfall_and_publishes_when_asked_to_take_what_exists(pipeline, tmp_path):
    """training_mix_wrap_1to1 through Dagster: with only rewrites_medium made, the default recipe stops
    before writing with the shortfall in tokens; with take_available it publishes, and says what was short."""
    _, instance, home, configure = pipeline
    wrap = {"components": [{"source": "originals"}, {"source": "rewrite", "styles": {"easy": 1, "medium": 1}}], "target_originals": 2}
    defs = configure(mixes={"recipes": {"wrap_1to1": wrap}})
    assert synthesize(defs, instance, ["rewrites_medium"]).success
    mix = next(a for a in defs.assets if AssetKey("training_mix_wrap_1to1") in getattr(a, "keys", ()))
    failed = materialize(
        [mix], instance=instance, partition_key=PARTITION, resources={"pipeline": PipelineResource()}, raise_on_error=False
    )
    assert not failed.success
    message = next(e.event_specific_data.error.message for e in failed.all_events if e.is_step_failure)
    assert "nothing was written" in message and "rewrite:easy: needs" in message and "short by" in message
    assert not (home / "training_mix_wrap_1to1").exists()
    lenient = configure(mixes={"recipes": {"wrap_1to1": {**wrap, "on_shortfall": "take_available"}}})
    mix = next(a for a in lenient.assets if AssetKey("training_mix_wrap_1to1") in getattr(a, "keys", ()))
    done = materialize([mix], instance=instance, partition_key=PARTITION, resources={"pipeline": PipelineResource()})
    meta = materializations(done)["training_mix_wrap_1to1"]
    assert meta["shrunk"] and "rewrite:easy" in meta["plan"]["shortfalls"] and "original" in meta["tokens_by_origin"]
    checks = [e.event_specific_data for e in done.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert [(c.check_name, c.passed) for c in checks] == [("mix_valid", True)]
