"""rewrites_medium and entity_graphs through Dagster with the real embedded model (the session's engine).

Only what the machinery guarantees is asserted, never what the model writes (greedy output differs
between CPUs): every row's lineage resolves in the cache and the subset, each document either has a
row or a rejection with a reason, and a second materialization sends zero requests.
"""

import pytest
from dagster import AssetKey, DagsterInstance, materialize

from synth_cpt.core.storage import LocalStorage
from synth_cpt.defs.resources import LLM, PipelineResource
from synth_cpt.generation.cache import GenerationCache

from .conftest import short_prompt_library
from .test_synthesis_dagster import PARTITION, materializations

pytestmark = pytest.mark.vllm
ASSETS = ["rewrites_medium", "entity_graphs"]


def test_real_engine_rewrites_and_entity_graphs_with_lineage(vllm_session, tmp_path, monkeypatch):
    from .test_synthesis_dagster import ingest_small_corpus

    backend, *_ = vllm_session
    backend.close()  # the session's engine may have been loaded by another test: this test's first run must load it
    loads_before = backend.loads
    monkeypatch.setenv("SYNTH_CPT_PROMPTS", str(short_prompt_library(tmp_path / "prompts")))
    defs, home = ingest_small_corpus(tmp_path, monkeypatch, max_documents=2)
    synthesis = next(a for a in defs.assets if getattr(a, "node_def", None) is not None and a.node_def.name == "synthesis")
    with DagsterInstance.ephemeral() as instance:

        def run():
            return materialize(
                [synthesis], instance=instance, partition_key=PARTITION, selection=[AssetKey(a) for a in ASSETS],
                resources={"pipeline": PipelineResource(), "llm": LLM()},
            )  # fmt: skip

        first = materializations(run())
        assert set(first) == set(ASSETS)
        assert first["rewrites_medium"]["sent"] > 0 and first["entity_graphs"]["sent"] > 0
        assert backend.loads == loads_before + 1
        assert (first["rewrites_medium"]["engine_loads"], first["entity_graphs"]["engine_loads"]) == (1, 1), "one load, shared"
        # rewrites_medium loads the engine: its prompt asks for speculation only when greedy, and it samples
        assert first["rewrites_medium"]["speculation"].startswith("off (auto: none of the ")
        assert first["rewrites_medium"]["speculation"].endswith("greedy-only but sampled at temperature > 0: rewrite/medium)")
        assert first["entity_graphs"]["speculation"] == first["rewrites_medium"]["speculation"], "the same engine"

        storage = LocalStorage(home)
        cache = GenerationCache(storage)
        subset = storage.read_parquet("quality_subsets/pt/high/part-0.parquet", columns=["doc_id", "drop_id", "source_line"])
        lines = {r["doc_id"]: (r["drop_id"], r["source_line"]) for r in subset.to_dicts()}
        from synth_cpt.synthesis.outputs import published_table

        rows = published_table(storage, "rewrites_medium", "pt", "high", "rows.parquet")
        rejects = published_table(storage, "rewrites_medium", "pt", "high", "rejects.parquet")
        assert rows.height + rejects.height == 2, "each document is a row or a rejection"
        assert all(r for r in rejects["reason"].to_list())
        for row in rows.to_dicts() + rejects.to_dicts():
            assert lines[row["doc_id"]] == (row["drop_id"], row["source_line"])
        every = cache.load(["request_id", "error", "prompt_sha", "model_fingerprint"])
        sent = {r["request_id"]: r for r in every.to_dicts()}
        for row in rows.to_dicts():  # an accepted row: each of its generations succeeded, with its prompt and model
            found = cache.finished(row["request_ids"])
            assert sorted(found["request_id"].to_list()) == sorted(row["request_ids"])
            assert set(found["prompt_sha"]) == {row["prompt_sha"]} and set(found["model_fingerprint"]) == {row["model_fingerprint"]}
        for row in rejects.to_dicts():  # a rejection: each generation it names is in the cache (a success or a failure)
            assert row["request_ids"] and all(rid in sent for rid in row["request_ids"])
            assert {sent[rid]["prompt_sha"] for rid in row["request_ids"]} == {row["prompt_sha"]}
        summaries = published_table(storage, "entity_graphs", "pt", "high", "summaries.parquet")
        graph_rejects = published_table(storage, "entity_graphs", "pt", "high", "rejects.parquet")
        assert summaries.height + graph_rejects.height == 2
        assert set(summaries["doc_id"]) | set(graph_rejects["doc_id"]) == set(rows["doc_id"]) | set(rejects["doc_id"])
        for row in summaries.to_dicts():
            assert lines[row["doc_id"]] == (row["drop_id"], row["source_line"])
            found = cache.finished(row["request_ids"])
            assert len(found) == len(row["request_ids"]) and set(found["model_fingerprint"]) == {row["model_fingerprint"]}
        for row in graph_rejects.to_dicts():
            assert lines[row["doc_id"]] == (row["drop_id"], row["source_line"])
            assert row["request_ids"] and all(rid in sent for rid in row["request_ids"])

        second = materializations(run())
        assert second["rewrites_medium"]["sent"] == 0 and second["entity_graphs"]["sent"] == 0
        assert (second["rewrites_medium"]["engine_loads"], second["entity_graphs"]["engine_loads"]) == (0, 0)
        assert backend.loads == loads_before + 1
