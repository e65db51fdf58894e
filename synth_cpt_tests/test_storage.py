"""Atomic writes locally and on S3; a whole drop ingested from S3 into an S3 storage root."""

import json

import polars as pl
import pytest

from synth_cpt.core.layout import partition_file
from synth_cpt.core.storage import LocalStorage, S3Storage, open_storage
from synth_cpt.ingest.dedup import build_raw_corpus
from synth_cpt.ingest.drops import ingest_drop, register_drop, resolve_drop
from synth_cpt.ingest.sources import list_drops

from .conftest import PT_TEXT, make_config


def test_local_write_is_atomic(tmp_path):
    storage = LocalStorage(tmp_path)
    with pytest.raises(RuntimeError):
        with storage.writing("a/b.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert not storage.exists("a/b.bin") and storage.list("a") == []
    storage.write_bytes("a/b.bin", b"whole")
    assert storage.read_bytes("a/b.bin") == b"whole" and storage.list("a") == ["a/b.bin"]


def test_open_storage_picks_the_backend(tmp_path):
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    assert isinstance(open_storage("s3://bucket/prefix"), S3Storage)
    with pytest.raises(ValueError, match="use a local folder, s3://bucket/prefix or package://"):
        open_storage("gs://bucket")


def test_s3_storage_and_drop_from_s3(tmp_path, isolated_env, s3_bucket, monkeypatch):
    client, bucket = s3_bucket
    lines = [json.dumps({"text": f"{PT_TEXT} {i}", "edu": 3.5}) for i in range(5)] + ["{broken"]
    client.put_object(Bucket=bucket, Key="in/d1.jsonl", Body="\n".join(lines).encode())
    root = f"s3://{bucket}/home"
    monkeypatch.setenv("SYNTH_CPT_HOME", root)
    cfg = make_config(tmp_path, drops={"location": f"s3://{bucket}/in"})
    storage = open_storage(cfg.storage_uri())
    source = S3Storage(f"s3://{bucket}/in")
    (drop,) = list_drops(source, cfg.drops.patterns).drops
    register_drop(storage, drop, f"s3://{bucket}/in")
    again_source, again_drop = resolve_drop(storage, drop.key, cfg)
    assert again_drop == drop
    report = ingest_drop(cfg, storage, again_source, again_drop)
    assert (report.documents, report.quarantined) == (5, 1)
    stats = build_raw_corpus(storage, cfg, "pt", "high")
    assert stats.documents == 5
    keys = storage.list("raw_corpus")
    assert keys == [partition_file("raw_corpus", "pt", "high")]
    assert storage.read_parquet(keys[0])["quality"].unique().to_list() == ["high"]
    listed = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="home/")["Contents"]]
    assert "home/crawl_drops/d1.jsonl/current.json" in listed
    assert len([k for k in listed if k.startswith("home/crawl_drops/d1.jsonl/v/") and k.endswith("/docs.parquet")]) == 1
    frame = pl.DataFrame({"a": [1]})
    storage.write_parquet("x/y.parquet", frame)
    assert storage.read_parquet("x/y.parquet").equals(frame)
    storage.delete_prefix("x")
    assert not storage.exists("x/y.parquet")


def test_listing_matches_the_patterns_before_refusing(tmp_path):
    """A symlink that is not a drop (by name) is skipped, not reported as refused: only what was asked
    for can be refused."""
    import os

    from .conftest import write_jsonl

    drops = tmp_path / "drops"
    write_jsonl(drops / "a.jsonl", [{"text": PT_TEXT}])
    write_jsonl(tmp_path / "elsewhere/x.jsonl", [{"text": "x"}])
    os.symlink(tmp_path / "elsewhere/x.jsonl", drops / "notes.txt")
    os.symlink(tmp_path / "elsewhere/x.jsonl", drops / "linked.jsonl")
    listing = list_drops(LocalStorage(drops), ("*.jsonl",))
    assert [d.relative_path for d in listing.drops] == ["a.jsonl"]
    assert [r.split(":")[0] for r in listing.refused] == ["linked.jsonl"]


def test_s3_parquet_files_close_their_stream_and_listing_matches_first(isolated_env, s3_bucket):
    client, bucket = s3_bucket
    storage = S3Storage(f"s3://{bucket}/home")
    storage.write_parquet("t.parquet", pl.DataFrame({"a": [1, 2]}))
    pf = storage.parquet_file("t.parquet")
    assert pf.read().num_rows == 2
    pf.close()
    assert pf.reader.closed, "closing the ParquetFile closes its S3 stream"
    with pytest.raises(FileNotFoundError):
        storage.parquet_file("gone.parquet")
    client.put_object(Bucket=bucket, Key="in/d.jsonl", Body=b'{"text": "x"}\n')
    client.put_object(Bucket=bucket, Key="in/../escape.txt", Body=b"not a drop")
    client.put_object(Bucket=bucket, Key="in/../escape.jsonl", Body=b'{"text": "x"}\n')
    listing = list_drops(S3Storage(f"s3://{bucket}/in"), ("*.jsonl",))
    assert [d.relative_path for d in listing.drops] == ["d.jsonl"]
    assert len(listing.refused) == 1 and "escape.jsonl" in listing.refused[0]
