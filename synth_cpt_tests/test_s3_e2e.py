"""S3 end to end: drops and the storage root on a real S3 API (moto server on 127.0.0.1). The sensor
picks the new object up, the whole graph (ingest, corpus, tokenizer, subsets, a rewrite with the
session's real engine, a mix, evals) publishes to S3, `synth-cpt lineage` and `synth-cpt sql` answer
from S3, and what is published equals the same graph run on a local root in the same process.

Reads are measured at the server: every GET moto answers (boto3's and pyarrow's S3 filesystem alike) is
recorded with its key and the bytes sent, per step, and printed with the objects' sizes. A step or a
query that needs one column or the footer must read fewer bytes than the object.

The engine runs once, on the S3 run; the local run answers the same request from a copy of that run's
generation cache, so every published table can be compared row by row (minus where and when it was
stored) without asserting anything about what the model wrote.
"""

import contextlib
import io
import json
import random
from collections import defaultdict
from pathlib import Path

import polars as pl
import pytest
import yaml
from dagster import AssetKey, DagsterInstance, build_sensor_context, materialize

from synth_cpt.core.storage import LocalStorage, S3Storage, Storage
from synth_cpt.defs.resources import LLM, PipelineResource

from .conftest import PT_TEXT, short_prompt_library, write_jsonl

pytestmark = pytest.mark.vllm
PARTITION = "pt|high"
DROP = "2026-11-01.jsonl"
MIX = "training_mix_e2e"


class ServerReads:
    """Every GET the moto server answers, by step: (key, bytes sent)."""

    def __init__(self) -> None:
        self.step = "setup"
        self.by_step: dict[str, list[tuple[str, int]]] = defaultdict(list)

    def install(self, monkeypatch) -> None:
        from moto.s3.responses import S3Response

        original = S3Response.key_response
        reads = self

        def key_response(self, request, full_url, headers):
            status, response_headers, body = original(self, request, full_url, headers)
            if request.method == "GET" and status in (200, 206):
                key = full_url.split("?", 1)[0].split("/", 4)[-1]
                reads.by_step[reads.step].append((key, len(body) if isinstance(body, (bytes, str)) else 0))
            return status, response_headers, body

        monkeypatch.setattr(S3Response, "key_response", key_response)

    def bytes_of(self, step: str, key_part: str) -> int:
        return sum(n for k, n in self.by_step[step] if key_part in k)


def _config(tmp_path: Path, root: str, drops: str) -> Path:
    cfg = tmp_path / f"pipeline-{root.replace('/', '_').replace(':', '')}.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "storage_root": root,
                "drops": {"location": drops, "settle_seconds": 0},
                "tokenizer": {"vocab_size": 600},
                "subsets": {"default_budget_tokens": 100000},
                "synthesis": {"max_documents": 1, "min_pass_rate": 0.0, "routing": {"high": ["medium"], "low": []}},
                "mixes": {
                    "recipes": {
                        "e2e": {
                            "components": [{"source": "originals"}, {"source": "rewrite", "styles": {"medium": 1}}],
                            "on_shortfall": "take_available",
                        }
                    }
                },
            }
        )
    )
    return cfg


def _run_graph(cfg: Path, monkeypatch, reads: ServerReads | None) -> dict[str, dict]:
    """The sensor's tick, then every job of the graph for pt|high, as the daemon would launch them."""
    from synth_cpt.defs.definitions import build_definitions
    from synth_cpt.defs.sensors import crawl_drop_sensor

    monkeypatch.setenv("SYNTH_CPT_CONFIG", str(cfg))
    monkeypatch.delenv("SYNTH_CPT_HOME", raising=False)
    monkeypatch.delenv("SYNTH_CPT_DROPS", raising=False)
    defs = build_definitions()
    meta: dict[str, dict] = {}

    def step(name: str):
        if reads is not None:
            reads.step = name
        return name

    def asset(name: str):
        return next(a for a in defs.assets if AssetKey(name) in getattr(a, "keys", ()))

    with DagsterInstance.ephemeral() as instance:
        step("sensor")
        result = crawl_drop_sensor(build_sensor_context(instance=instance, resources={"pipeline": PipelineResource(config_path=str(cfg))}))
        assert [r.partition_key for r in result.run_requests] == [DROP], "the sensor picks up the new object"
        for req in result.dynamic_partitions_requests:
            instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        step("ingest")
        assert defs.resolve_job_def("ingest_drop_job").execute_in_process(instance=instance, partition_key=DROP).success
        step("corpus")
        for key in ("pt|high",):  # the drop is Portuguese and scores high: the other partitions are empty
            assert defs.resolve_job_def("corpus_job").execute_in_process(instance=instance, partition_key=key).success
        step("tokenizer")
        assert defs.resolve_job_def("tokenizer_job").execute_in_process(instance=instance).success
        step("subsets")
        assert defs.resolve_job_def("quality_subsets_job").execute_in_process(instance=instance, partition_key=PARTITION).success
        step("synthesis")
        synthesis = next(a for a in defs.assets if getattr(a, "node_def", None) is not None and a.node_def.name == "synthesis")
        res = materialize(
            [synthesis], instance=instance, partition_key=PARTITION, selection=[AssetKey("rewrites_medium")],
            resources={"pipeline": PipelineResource(), "llm": LLM()},
        )  # fmt: skip
        assert res.success
        step("mix")
        assert materialize([asset(MIX)], instance=instance, partition_key=PARTITION, resources={"pipeline": PipelineResource()}).success
        step("evals")
        assert materialize(
            [asset("eval_scores")], instance=instance, partition_key=PARTITION, resources={"pipeline": PipelineResource()}
        ).success
        step("done")
    return meta


def _cli(*argv: str) -> str:
    from synth_cpt.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(argv)) == 0
    return out.getvalue()


# columns whose values name where or when a thing was stored, not what it is
PLACE_AND_TIME = {"drop_version", "source_file", "ingested_at", "published_at", "uri", "filename", "prefix", "version", "run_id"}


def _table(storage: Storage, key: str, drop: set[str]) -> pl.DataFrame:
    frame = storage.read_parquet(key)
    frame = frame.drop([c for c in frame.columns if c in drop])
    return frame.sort(frame.columns[0]) if frame.height else frame


def _published(storage: Storage, prefix: str, name: str, drop: set[str]) -> pl.DataFrame:
    pointer = storage.read_json(f"{prefix}/current.json")
    return _table(storage, f"{pointer['prefix']}/{name}", drop)


def test_s3_end_to_end_equals_local_and_reads_only_parts(vllm_session, tmp_path, monkeypatch, s3_bucket):
    client, bucket = s3_bucket
    # 600 distinct Portuguese documents (words of PT_TEXT in a seeded random order, plus a code each) with a
    # long random url: objects of several times pyarrow's 64 KiB footer read, so that reading one column is
    # visibly a part, while the one text sent to the model stays short
    rng = random.Random(7)
    words = PT_TEXT.split()
    docs = [
        {
            "text": f"Documento {i}. " + " ".join(rng.sample(words, len(words))) + f" Código {rng.getrandbits(64):016x}.",
            "url": f"https://exemplo.pt/{rng.getrandbits(4096):01024x}",
            "edu": 3.5,
        }
        for i in range(600)
    ]
    local_drops = write_jsonl(tmp_path / "drops" / DROP, docs).parent
    client.put_object(Bucket=bucket, Key=f"drops/{DROP}", Body=(local_drops / DROP).read_bytes())

    monkeypatch.setenv("SYNTH_CPT_PROMPTS", str(short_prompt_library(tmp_path / "prompts")))

    reads = ServerReads()
    reads.install(monkeypatch)
    _run_graph(_config(tmp_path, f"s3://{bucket}/home", f"s3://{bucket}/drops"), monkeypatch, reads)
    s3 = S3Storage(f"s3://{bucket}/home", client=client)
    local = LocalStorage(tmp_path / "home")
    # the local run answers its one request from the S3 run's generations (the engine ran once, on S3): the
    # same cache makes the same rows, so everything published can be compared, text included
    for key in s3.list("generations"):
        local.write_bytes(key, s3.read_bytes(key))
    reads.step = "local run"
    _run_graph(_config(tmp_path, str(tmp_path / "home"), str(local_drops)), monkeypatch, None)

    sizes = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="home/"):
        sizes.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    print("\nobjects published to S3:", len(sizes), "bytes:", sum(sizes.values()))
    for key, size in sorted(sizes.items()):
        if key.endswith(".parquet"):
            print(f"  {size:>9,}  {key}")
    print("GETs and bytes per step (moto server): step, GETs, bytes; then per object: GETs, bytes read of its size")
    for name, got in reads.by_step.items():
        print(f"  {name:<12} {len(got):>4} GETs {sum(n for _, n in got):>10,} bytes")
        for key in sorted({k for k, _ in got}):
            mine = [n for k, n in got if k == key]
            print(f"      {len(mine):>3} GETs {sum(mine):>9,} of {sizes.get(key, 0):>9,}  {key}")

    # the same keys are published (version folders aside) and the same rows
    def shape(keys):  # version folders and content-hash names differ by when and where: compare the rest
        def part(p):
            return "<v>" if p[:8].isdigit() and "T" in p else "<sha>.parquet" if len(p) == 72 and p.endswith(".parquet") else p

        return sorted({"/".join(part(p) for p in k.split("/")) for k in keys if "/_" not in f"/{k}"})

    assert shape(k.removeprefix("home/") for k in sizes) == shape(local.list("")), "the same outputs on both roots"
    compare = [
        (f"crawl_drops/{DROP}", "docs.parquet"),
        (f"crawl_drops/{DROP}", "quarantine.parquet"),
        ("rewrites_medium/pt/high", "rows.parquet"),
        ("rewrites_medium/pt/high", "rejects.parquet"),
        ("training_mix_e2e/pt/high", "shard-00000.parquet"),
        ("training_mix_e2e/pt/high", "repeats.parquet"),
        ("eval_scores/pt/high", "scores.parquet"),
        ("eval_scores/pt/high", "contamination.parquet"),
    ]
    for prefix, name in compare:
        a, b = _published(s3, prefix, name, PLACE_AND_TIME), _published(local, prefix, name, PLACE_AND_TIME)
        print(f"{prefix}/{name}: {a.height} rows, columns compared: {a.columns}")
        assert a.equals(b), f"{prefix}/{name}: S3 {a} != local {b}"
    for key in ("raw_corpus/pt/high/part-0.parquet", "quality_subsets/pt/high/part-0.parquet"):
        assert _table(s3, key, PLACE_AND_TIME).equals(_table(local, key, PLACE_AND_TIME)), key
    rewritten = _published(s3, "rewrites_medium/pt/high", "rows.parquet", set()).height
    rejected = _published(s3, "rewrites_medium/pt/high", "rejects.parquet", set()).height
    assert rewritten + rejected == 1, "max_documents 1: one document sent, a row or a rejection"

    # lineage and sql from S3, through the CLI
    monkeypatch.setenv("SYNTH_CPT_CONFIG", str(_config(tmp_path, f"s3://{bucket}/home", f"s3://{bucket}/drops")))
    reads.step = "lineage drop"
    answer = json.loads(_cli("lineage", "drop", DROP, "--json"))
    monkeypatch.setenv("SYNTH_CPT_CONFIG", str(_config(tmp_path, str(tmp_path / "home"), str(local_drops))))
    assert answer == json.loads(_cli("lineage", "drop", DROP, "--json")), "the same answer from S3 and from the local root"
    print("lineage drop:", answer)
    assert answer["documents"] == 600 and answer["in_raw_corpus"][0]["documents"] > 0
    docs_key = next(k for k in sizes if k.endswith("/docs.parquet"))
    lineage_bytes = reads.bytes_of("lineage drop", "/docs.parquet")
    print(f"lineage drop read {lineage_bytes:,} of {sizes[docs_key]:,} bytes of {docs_key}")
    assert 0 < lineage_bytes < sizes[docs_key], "counting a drop's documents reads its drop_id column, not the object"
    monkeypatch.setenv("SYNTH_CPT_CONFIG", str(_config(tmp_path, f"s3://{bucket}/home", f"s3://{bucket}/drops")))
    reads.step = "sql"
    out = _cli("sql", "SELECT count(DISTINCT doc_id) AS n FROM documents")
    print("sql:", out)
    raw = next(k for k in sizes if k.endswith("raw_corpus/pt/high/part-0.parquet"))
    sql_bytes = reads.bytes_of("sql", "raw_corpus/pt/high/part-0.parquet")
    print(f"sql over one column: {sql_bytes:,} of {sizes[raw]:,} bytes of {raw}")
    assert 0 < sql_bytes < sizes[raw], "one column of raw_corpus is read, not the object"
    synth_bytes = reads.bytes_of("synthesis", "quality_subsets/pt/high/part-0.parquet")
    subset = next(k for k in sizes if k.endswith("quality_subsets/pt/high/part-0.parquet"))
    print(f"synthesis read {synth_bytes:,} of {sizes[subset]:,} bytes of {subset}")
    assert 0 < synth_bytes < sizes[subset], "synthesis reads the subset's source columns (not the url), not the whole object"
