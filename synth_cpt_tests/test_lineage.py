"""Lineage answers on a materialized fixture: documents, published synthetic rows, a generation cache, a mix."""

import polars as pl
import pytest

from synth_cpt.core.layout import partition_file
from synth_cpt.core.publish import published
from synth_cpt.core.validation import Outcome
from synth_cpt.generation.cache import GenerationCache
from synth_cpt.generation.engine import GenerationEngine
from synth_cpt.generation.requests import ChatRequest, Sampling
from synth_cpt.lineage import queries
from synth_cpt.lineage.catalog import VIEWS, Catalog
from synth_cpt.mix.build import build_mix
from synth_cpt.synthesis.outputs import publish_tables

from .doubles import DeterministicTestBackend
from .test_mix_build import corpus, recipe, tokenizer  # noqa: F401  (fixture)


@pytest.fixture
def materialized(tmp_path, tokenizer):  # noqa: F811
    storage, originals, rows = corpus(tmp_path)
    # raw_corpus with the drop lines, and generations the synthetic rows point at
    storage.write_parquet(
        partition_file("raw_corpus", "pt", "high"),
        originals.with_columns(
            pl.lit("pt").alias("language"),
            pl.lit("high").alias("quality"),
            pl.lit("a.jsonl").alias("source_file"),
            pl.int_range(0, 10).alias("source_line"),
        ),  # fmt: skip
    )
    engine = GenerationEngine(DeterministicTestBackend(), GenerationCache(storage), model="double", model_fingerprint="fp")
    requests = [ChatRequest.chat([{"role": "user", "content": f"r{i}"}], Sampling(max_tokens=8)) for i in range(rows.height)]
    engine.run(requests, scope="rewrites_easy/pt/high")
    synthetic = rows.with_columns(
        pl.Series("request_ids", [[rid] for rid in engine.request_ids(requests)]), pl.lit("rewrite").alias("kind"),
        pl.lit("easy").alias("style"), pl.lit(10).alias("n_tokens"),
    )  # fmt: skip
    publish_tables(storage, "rewrites_easy", "pt", "high", {"rows.parquet": synthetic}, {"ok": Outcome(True)}, {})
    mix = build_mix(storage, "demo", recipe(), "pt", "high", tokenizer, run_id="run-123")
    assert mix.outcome.success
    return storage, tmp_path / "home" / mix.pointer["prefix"]


def test_lineage_of_a_document_a_shard_and_a_drop(materialized):
    storage, folder = materialized
    catalog = Catalog(storage)
    answer = queries.doc(catalog, "d3")
    assert answer["doc_id"] == "d3" and answer["source"]["drop_id"] == "drop-a" and answer["source"]["source_line"] == 3
    assert {r["synth_id"] for r in answer["synthetic"]} == {"s3"}, "d3's rewrites (s3; s13 does not exist in 12 rows)"
    assert answer["shards"] and all(r["mix"] == "demo" for r in answer["shards"])
    total = catalog.sql("SELECT count(*) FROM shards WHERE doc_id = 'd3'")[1][0][0]
    assert sum(r["copies"] for r in answer["shards"]) == total
    every = [(r["mix"], r["version"], r["current"], r["shard"], r["origin"], r["copies"]) for r in answer["shards_of_every_version"]]
    assert every == [(r["mix"], folder.name, True, r["shard"], r["origin"], r["copies"]) for r in answer["shards"]], (
        "one version, the current"
    )

    # a shard that holds rewrites, so the trace through synthetic rows and generations is tested
    name = next(p.name for p in sorted(folder.glob("shard-*.parquet")) if (pl.read_parquet(p)["origin"] != "original").any())
    shard = queries.shard(catalog, str(folder / name))
    frame = pl.read_parquet(folder / name)
    rewrites = frame.filter(pl.col("origin") == "rewrite:easy")
    assert shard["mix"] == "demo" and shard["mix_run"] == "run-123" and shard["seed"] == 7 and shard["is_current"] is True
    assert shard["version"] == shard["current_version"] == folder.name
    assert {r["origin"]: r["tokens"] for r in shard["by_origin"]} == dict(
        frame.group_by("origin").agg(pl.col("n_tokens").sum()).iter_rows()
    )
    assert set(shard["drops"]) == set(frame["drop_id"]) and shard["documents"] == frame["doc_id"].n_unique()
    version = published(storage, "rewrites_easy/pt/high")["version"]
    assert shard["made_by"] == [{"prompt_sha": "p-easy", "model_fingerprint": "fp", "asset": "rewrites_easy", "version": version,
                                 "rows": rewrites["synth_id"].n_unique()}]  # fmt: skip
    assert shard["generations"]["generations"] == rewrites["synth_id"].n_unique(), "one generation per rewrite row"
    bin_answer = queries.shard(catalog, str(folder / name.replace(".parquet", ".bin")))
    assert {**bin_answer, "shard": None} == {**shard, "shard": None}, "any format of the shard gets the same answer"

    drop = queries.drop(catalog, "drop-b")
    assert drop["in_raw_corpus"] == [{"language": "pt", "quality": "high", "documents": 5}]
    assert drop["synthetic"] == [], "drop-b made no rewrites"
    everything = pl.concat([pl.read_parquet(p) for p in sorted(folder.glob("shard-*.parquet"))]).filter(pl.col("drop_id") == "drop-b")
    assert everything.height > 0 and [(r["origin"], r["rows"]) for r in drop["shards"]] == [("original", everything.height)]
    assert sum(r["tokens"] for r in drop["shards"]) == everything["n_tokens"].sum()
    with pytest.raises(LookupError):
        queries.doc(catalog, "nope")


def test_sql_over_every_view(materialized):
    storage, _ = materialized
    catalog = Catalog(storage)
    manifest = storage.read_json(f"{published(storage, 'training_mix_demo/pt/high')['prefix']}/manifest.json")
    counts = {"drops": 0, "quarantine": 0, "documents": 10, "subsets": 10, "generations": 12, "synthetic": 12, "rejects": 0,
              "shards": manifest["documents"], "manifests": 1, "mix_versions": 1, "all_shards": manifest["documents"], "all_synthetic": 24,  # corpus() published a first version
              "pinned_subsets": 10}  # fmt: skip
    assert set(counts) == set(VIEWS)
    assert {view: catalog.sql(f"SELECT count(*) FROM {view}")[1][0][0] for view in VIEWS} == counts
    cols, rows = catalog.sql("SELECT mix, sum(n_tokens) FROM shards GROUP BY 1")
    assert cols[0] == "mix" and rows == [("demo", manifest["tokens"])]
    joined = catalog.sql("SELECT count(*) FROM synthetic y, unnest(y.request_ids) u(rid) JOIN generations g ON g.request_id = u.rid")[1][0][
        0
    ]
    assert joined == 12, "every synthetic row resolves to its generation"


def test_the_catalog_reads_s3_the_same_way(materialized, s3_bucket, tmp_path):
    """The same outputs under an s3:// root (moto in server mode): the same answers, read through pyarrow."""
    from synth_cpt.core.storage import S3Storage

    client, bucket = s3_bucket
    local, _ = materialized
    for key in local.list(""):
        client.put_object(Bucket=bucket, Key=f"home/{key}", Body=local.read_bytes(key))
    remote = Catalog(S3Storage(f"s3://{bucket}/home"))
    here = Catalog(local)
    assert queries.doc(remote, "d3")["shards"] == queries.doc(here, "d3")["shards"]
    assert queries.drop(remote, "drop-b") == queries.drop(here, "drop-b")
    shard_key = next(k for k in local.list("") if k.endswith("shard-00000.parquet"))
    answer = queries.shard(remote, f"s3://{bucket}/home/{shard_key}")
    local_answer = queries.shard(here, str(local.path(shard_key)))
    different = {"shard", "uri"}  # where the files are
    assert {k: v for k, v in answer.items() if k not in different} == {k: v for k, v in local_answer.items() if k not in different}
    assert answer["uri"] == f"s3://{bucket}/home/{shard_key.rsplit('/', 1)[0]}"
