"""What a step reads of a published Parquet file: each file is opened once (on S3 every open fetches the
footer again) and only the columns asked for are fetched, never a whole download. Measured at a real S3
API (moto in server mode on 127.0.0.1): every GET it answers is recorded with its key and the bytes sent.
Results are compared with the same step on a local folder: reading less must not change what is read.
"""

from __future__ import annotations

import random
import string
from collections import defaultdict

import polars as pl
import pyarrow.parquet as pq
import pytest

from synth_cpt.core import publish
from synth_cpt.core.layout import SYNTHETIC_ROWS, partition_file, partition_prefix, rewrite_asset, version_prefix
from synth_cpt.core.storage import LocalStorage, S3Storage, Storage
from synth_cpt.evals.scores import _sample
from synth_cpt.ingest.dedup import build_raw_corpus
from synth_cpt.ingest.drops import ingest_drop
from synth_cpt.ingest.sources import list_drops
from synth_cpt.mix.build import component_rows

from .conftest import PT_TEXT, make_config, write_jsonl

FOOTER_READ = 64 * 1024  # pyarrow fetches the last 64 KiB of an object when it opens it (the footer, and data before it)
# exact GETs of one open and its ranged reads, with pyarrow's S3 filesystem against moto (see each test)
EVAL_GETS = 9  # the footer, n_tokens of each of 6 row groups, the 2 row groups sampled
DEDUP_GETS = 4  # the footer, pass 1's narrow columns, pass 2's row group (one row group)
MIX_GETS = 1  # the footer: a component is planned from its row count; its rows are read once, with the texts


class ServerGets:
    """Every GET the moto server answers: (key, bytes sent)."""

    def __init__(self) -> None:
        self.gets: list[tuple[str, int]] = []

    def install(self, monkeypatch) -> None:
        from moto.s3.responses import S3Response

        original = S3Response.key_response
        gets = self.gets

        def key_response(self, request, full_url, headers):
            status, response_headers, body = original(self, request, full_url, headers)
            if request.method == "GET" and status in (200, 206):
                key = full_url.split("?", 1)[0].split("/", 4)[-1]
                gets.append((key, len(body) if isinstance(body, (bytes, str)) else 0))
            return status, response_headers, body

        monkeypatch.setattr(S3Response, "key_response", key_response)

    def of(self, key_part: str) -> tuple[int, int]:
        """(GETs, bytes) of the objects whose key contains `key_part`."""
        mine = [n for k, n in self.gets if key_part in k]
        return len(mine), sum(mine)


def _opens_spy(storage: Storage, monkeypatch) -> dict[str, int]:
    """How often each key is opened through `storage.parquet_file` (a spy: the real file is opened)."""
    opens: dict[str, int] = defaultdict(int)
    parquet_file = storage.parquet_file

    def counting(key):
        opens[key] += 1
        return parquet_file(key)

    monkeypatch.setattr(storage, "parquet_file", counting)
    return opens


def _words(rng: random.Random, n: int) -> str:
    """Text that compresses poorly, so a file is larger than the footer pyarrow fetches with it (64 KiB)."""
    return " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(n))


def _size(client, bucket: str, key: str) -> int:
    return int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])


@pytest.fixture
def s3(s3_bucket, monkeypatch):
    client, bucket = s3_bucket
    gets = ServerGets()
    gets.install(monkeypatch)
    return S3Storage(f"s3://{bucket}/home", client=client), gets, client, bucket


def test_eval_sample_opens_each_file_once_and_reads_row_groups_not_objects(s3, tmp_path, monkeypatch):
    storage, gets, client, bucket = s3
    rng = random.Random(7)
    frame = pl.DataFrame(
        {"doc_id": [f"d{i}" for i in range(600)], "text": [_words(rng, 60) for _ in range(600)], "n_tokens": list(range(600))}
    )
    key = "rewrites_easy/pt/high/v/x/rows.parquet"
    local = LocalStorage(tmp_path / "home")
    with local.writing(key) as tmp:
        pq.write_table(frame.to_arrow(), tmp, row_group_size=100, compression="zstd")
    storage.write_bytes(key, local.read_bytes(key))
    size = _size(client, bucket, f"home/{key}")
    opens = _opens_spy(storage, monkeypatch)
    gets.gets.clear()
    got = _sample(storage, [key], ["doc_id", "text"], limit=120, seed=3, count=len)
    n_gets, n_bytes = gets.of(key)
    print(f"\neval sample of {key}: {dict(opens)} opens, {n_gets} GETs, {n_bytes:,} bytes of {size:,}")
    expected = _sample(local, [key], ["doc_id", "text"], limit=120, seed=3, count=len)
    assert (got.rows, got.tokens) == (expected.rows, expected.tokens) == (600, sum(range(600)))
    assert got.sample.equals(expected.sample)
    assert dict(opens) == {key: 1}, f"opens {dict(opens)}"
    assert (n_gets, n_bytes < size) == (EVAL_GETS, True), f"{n_gets} GETs, {n_bytes:,} bytes of {size:,}"


def _drop(tmp_path, rng: random.Random, n: int) -> None:
    records = [{"text": f"{PT_TEXT} {_words(rng, 80)}", "edu": 3.0 + (i % 2)} for i in range(n)]
    records += [records[0], records[1]]  # two duplicates
    write_jsonl(tmp_path / "drops/2026-01-01.jsonl", records)


def test_dedup_opens_each_drop_once_and_reads_only_its_columns(s3, tmp_path, monkeypatch):
    storage, gets, client, bucket = s3
    _drop(tmp_path, random.Random(11), 300)
    cfg = make_config(tmp_path)
    source = LocalStorage(tmp_path / "drops")
    local = LocalStorage(tmp_path / "home")
    for drop in list_drops(source, cfg.drops.patterns).drops:
        ingest_drop(cfg, local, source, drop)
    for key in local.list(""):
        storage.write_bytes(key, local.read_bytes(key))
    [docs] = [k for k in local.list("") if k.endswith("/docs.parquet")]
    size = _size(client, bucket, f"home/{docs}")
    opens = _opens_spy(storage, monkeypatch)
    gets.gets.clear()
    stats = build_raw_corpus(storage, cfg, "pt", "high")
    n_gets, n_bytes = gets.of(docs)
    print(f"\ndedup of {docs}: {dict(opens)} opens, {n_gets} GETs, {n_bytes:,} bytes of {size:,}")
    expected = build_raw_corpus(local, cfg, "pt", "high")
    out = partition_file("raw_corpus", "pt", "high")
    assert (stats.language_documents, stats.duplicates_removed, stats.documents) == (302, 2, expected.documents)
    assert stats.documents > 0
    assert storage.read_parquet(out).equals(local.read_parquet(out))
    meta = pq.ParquetFile(local.path(docs)).metadata
    narrow = sum(
        meta.row_group(g).column(c).total_compressed_size
        for g in range(meta.num_row_groups)
        for c in range(meta.num_columns)
        if meta.schema.column(c).name in ("doc_id", "drop_id", "source_line", "quality_score", "language")
    )
    # the object once, plus one footer fetch and the narrow columns pass 2 reads again (before: 3 opens, 3 footers)
    bound = size + FOOTER_READ + narrow
    print(f"dedup bound: {size:,} + {FOOTER_READ:,} footer + {narrow:,} narrow columns = {bound:,}")
    assert opens[docs] == 1, f"opens {dict(opens)}"
    assert (n_gets, n_bytes <= bound) == (DEDUP_GETS, True), f"{n_gets} GETs, {n_bytes:,} bytes of {size:,} (bound {bound:,})"


def test_a_mix_opens_a_rewrite_component_for_its_footer_not_the_object(s3, tmp_path, monkeypatch):
    storage, gets, client, bucket = s3
    rng = random.Random(5)
    n = 200
    rows = pl.DataFrame(
        {
            "synth_id": [f"s{i}" for i in range(n)],
            "doc_id": [f"d{i}" for i in range(n)],
            "drop_id": ["2026-01-01.jsonl"] * n,
            "text": [_words(rng, 40) for _ in range(n)],
            "prompt_sha": ["p"] * n,
            "model_fingerprint": ["m"] * n,
            "request_ids": [[_words(rng, 150)] for _ in range(n)],  # a column the mix never reads
            "copy_similarity": [rng.random() for _ in range(n)],
        }
    )
    prefix = partition_prefix(rewrite_asset("easy"), "pt", "high")
    version = publish.new_version()
    key = f"{version_prefix(prefix, version)}/{SYNTHETIC_ROWS}"
    local = LocalStorage(tmp_path / "home")
    for target in (local, storage):
        target.write_parquet(key, rows)
        publish.publish_version(target, prefix, version, {})
    size = _size(client, bucket, f"home/{key}")
    opens = _opens_spy(storage, monkeypatch)
    gets.gets.clear()
    got = component_rows(storage, "rewrite:easy", "pt", "high")
    n_gets, n_bytes = gets.of(key)
    print(f"\nmix component {key}: {dict(opens)} opens, {n_gets} GETs, {n_bytes:,} bytes of {size:,}")
    expected = component_rows(local, "rewrite:easy", "pt", "high")
    assert got is not None and expected is not None
    assert got.pin == expected.pin and got.rows == expected.rows == n
    assert dict(opens) == {key: 1}, f"opens {dict(opens)}"
    assert (n_gets, n_bytes < size) == (MIX_GETS, True), f"{n_gets} GETs, {n_bytes:,} bytes of {size:,}"
