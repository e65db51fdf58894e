"""File-level damage: every readable record is kept, the break is recorded as a row and in the
manifest (never a stack trace), and a damaged drop stays out of raw_corpus unless partial files are
accepted. Property tests cut compressed files at random bytes."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synth_cpt.core.storage import LocalStorage
from synth_cpt.ingest import quarantine as Q
from synth_cpt.ingest.drops import ingest_drop, published_prefix
from synth_cpt.ingest.sources import list_drops

from .conftest import PT_TEXT, make_config


def _records(n):
    return [{"id": str(i), "text": f"{PT_TEXT} Registro número {i}.", "language": "pt"} for i in range(n)]


def _jsonl(records) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)


def _frames(data: bytes, fmt: str) -> list[bytes]:
    if fmt == "gz":
        return [gzip.compress(data)]
    # several frames, as writers that flush periodically make them
    cctx = zstandard.ZstdCompressor()
    step = max(1, len(data) // 3)
    return [cctx.compress(data[i : i + step]) for i in range(0, len(data), step)]


def _compress(data: bytes, fmt: str) -> bytes:
    return b"".join(_frames(data, fmt))


def _ingest(tmp_path, name: str, payload: bytes, **limits):
    drops = tmp_path / "drops"
    drops.mkdir(parents=True, exist_ok=True)
    (drops / name).write_bytes(payload)
    cfg = make_config(tmp_path, limits={"batch_bytes": 4000, "workers": 1, **limits})
    source = LocalStorage(drops)
    (drop,) = [d for d in list_drops(source, cfg.drops.patterns).drops if d.relative_path == name]
    storage = LocalStorage(tmp_path / "home")
    report = ingest_drop(cfg, storage, source, drop)
    docs = storage.read_parquet(f"{published_prefix(storage, drop.key)}/docs.parquet")
    quarantine = storage.read_parquet(f"{published_prefix(storage, drop.key)}/quarantine.parquet")
    manifest = storage.read_json(f"{published_prefix(storage, drop.key)}/manifest.json")
    return report, docs, quarantine, manifest


@pytest.mark.parametrize("fmt", ["gz", "zst"])
def test_a_truncated_compressed_drop_keeps_every_readable_record_and_says_so(tmp_path, fmt):
    records = _records(300)
    whole = _compress(_jsonl(records), fmt)
    cut = whole[: int(len(whole) * 0.6)]
    report, docs, quarantine, manifest = _ingest(tmp_path, f"d.jsonl.{fmt}", cut)
    readable = _decodable_prefix(cut, fmt).count(b"\n")  # every whole line the decoder delivers
    assert readable in range(1, 300), "the cut is inside the records"
    assert docs["record_id"].to_list() == [str(i) for i in range(readable)], "a prefix, in order, nothing skipped"
    assert quarantine["reason_code"].to_list() == [Q.INVALID_JSON, Q.TRUNCATED_FILE], "the cut line, then the damage"
    assert f"records after line/row {readable} are missing" in quarantine["reason"][1]
    assert manifest["complete"] is False and manifest["accepted"] is False
    assert "stored bytes read" in manifest["damage"]
    assert manifest["quarantine_by_reason"][Q.TRUNCATED_FILE] == 1
    # the same file, accepted as partial by configuration
    report2, *_, manifest2 = _ingest(tmp_path / "partial", f"d.jsonl.{fmt}", whole[: int(len(whole) * 0.6)], accept_partial_files=True)
    assert manifest2["complete"] is False and manifest2["accepted"] is True and report2.documents == readable


@pytest.mark.parametrize("name", ["d.jsonl.zst", "d.jsonl.gz", "d.parquet"])
def test_a_file_that_is_not_what_its_name_says_is_recorded_not_raised(tmp_path, name):
    report, docs, quarantine, manifest = _ingest(tmp_path, name, b"this is plain text, not a compressed file\n" * 20)
    assert docs.height == 0 and report.records == 0
    assert quarantine["reason_code"].to_list() == [Q.UNREADABLE_FILE]
    assert quarantine["reason"][0].startswith("no record could be read from the file: ")
    assert (manifest["complete"], manifest["accepted"], manifest["damage_code"]) == (False, False, Q.UNREADABLE_FILE)
    if name != "d.parquet":
        kind = {"d.jsonl.zst": "zstd", "d.jsonl.gz": "gzip"}[name]
        assert manifest["damage"].startswith(f"not {kind}-compressed data: "), "said in words, not only the decompressor's"


@pytest.mark.parametrize("name", ["d.jsonl.zst", "d.jsonl.gz"])
def test_an_empty_compressed_file_is_unreadable_but_an_empty_jsonl_is_just_empty(tmp_path, name):
    report, docs, quarantine, manifest = _ingest(tmp_path, name, b"")
    assert quarantine["reason_code"].to_list() == [Q.UNREADABLE_FILE] and "the file is empty" in manifest["damage"]
    assert manifest["accepted"] is False
    report, docs, quarantine, manifest = _ingest(tmp_path / "plain", "d.jsonl", b"")
    assert quarantine.height == 0 and manifest["complete"] is True and manifest["accepted"] is True
    nothing = gzip.compress(b"") if name.endswith(".gz") else zstandard.ZstdCompressor().compress(b"")
    whole = _ingest(tmp_path / "whole", name, nothing)[3]  # a compressed stream of nothing: a drop with no records, not damage
    assert whole["complete"] is True and whole["records"] == 0


def test_a_damaged_parquet_row_group_loses_only_that_group(tmp_path):
    table = pa.Table.from_pylist(_records(30))
    pq.write_table(table, tmp_path / "whole.parquet", row_group_size=10)
    good = (tmp_path / "whole.parquet").read_bytes()
    meta = pq.ParquetFile(tmp_path / "whole.parquet").metadata
    start = meta.row_group(1).column(1).data_page_offset  # the text column of the middle group
    damaged = good[:start] + b"\xff" * 64 + good[start + 64 :]
    report, docs, quarantine, manifest = _ingest(tmp_path, "d.parquet", damaged)
    assert docs["record_id"].to_list() == [str(i) for i in range(10)] + [str(i) for i in range(20, 30)]
    assert quarantine["reason_code"].to_list() == [Q.UNREADABLE_FILE] and quarantine["source_line"].to_list() == [11]
    assert manifest["complete"] is False


def test_a_utf8_bom_does_not_cost_the_first_record(tmp_path):
    report, docs, quarantine, manifest = _ingest(tmp_path, "d.jsonl", b"\xef\xbb\xbf" + _jsonl(_records(3)))
    assert docs.height == 3 and quarantine.height == 0 and manifest["complete"] is True


def test_mojibake_is_repaired_before_hashing_and_language_id(tmp_path):
    clean = "O freguês não encontrou as páginas do catálogo, então pediu ajuda à atendente da loja."
    broken = clean.encode("utf-8").decode("latin-1")
    assert "Ã£" in broken
    records = [{"id": "a", "text": broken}, {"id": "b", "text": clean}]
    report, docs, quarantine, manifest = _ingest(tmp_path, "d.jsonl", _jsonl(records))
    assert docs.height == 2 and docs["text"].to_list() == [clean, clean]
    assert docs["doc_id"].n_unique() == 1, "the repaired text hashes like the clean one"
    assert docs["language"].to_list() == ["pt", "pt"]
    assert docs["encoding_repaired"].to_list() == [True, False] and manifest["encoding_repaired"] == 1


def test_letterless_texts_are_quarantined_even_with_language_and_score(tmp_path):
    records = [
        {"text": "\u200b\u2060\ufeff", "language": "pt", "edu": 4.0},
        {"text": "\U0001f600\U0001f389 \U0001f44d", "language": "pt", "edu": 4.0},
        {"text": PT_TEXT, "language": "pt", "edu": 4.0},
    ]
    report, docs, quarantine, manifest = _ingest(tmp_path, "d.jsonl", _jsonl(records))
    assert docs.height == 1
    assert sorted(quarantine["reason_code"].to_list()) == sorted([Q.EMPTY_TEXT, Q.NO_LETTERS])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(["gz", "zst", "jsonl"]), n=st.integers(1, 80), cut=st.floats(0.0, 1.0))
def test_any_cut_keeps_exactly_the_complete_records_before_it(tmp_path_factory, fmt, n, cut):
    records = _records(n)
    raw = _jsonl(records)
    frames = [raw] if fmt == "jsonl" else _frames(raw, fmt)
    payload = b"".join(frames)
    boundaries = {sum(len(f) for f in frames[: i + 1]) for i in range(len(frames))}
    at = max(1, int(len(payload) * cut))
    tmp = tmp_path_factory.mktemp("cut")
    name = "d.jsonl" if fmt == "jsonl" else f"d.jsonl.{fmt}"
    report, docs, quarantine, manifest = _ingest(tmp, name, payload[:at])
    ids = docs["record_id"].to_list()
    assert ids == [str(i) for i in range(len(ids))], "what is kept is a prefix of the records, in order"
    if at >= len(payload):
        assert len(ids) == n and manifest["complete"] is True
    elif fmt == "jsonl":
        kept = payload[:at]
        assert len(ids) == kept.count(b"\n") + kept.endswith(b"}"), "every whole line is kept (a cut just after a '}' parses too)"
    elif at not in boundaries:  # a cut exactly between two frames cannot be told from a complete file
        assert manifest["complete"] is False, "a compressed file cut inside a frame is never taken as complete"
        # one byte is not even gzip's two-byte magic number: not gzip at all; any longer cut is a truncation
        expected = Q.UNREADABLE_FILE if (fmt, at) == ("gz", 1) else Q.TRUNCATED_FILE
        assert quarantine["reason_code"].to_list()[-1] == expected
        decodable = _decodable_prefix(payload[:at], fmt)
        assert len(ids) == decodable.count(b"\n") + decodable.endswith(b"}"), "every record the decoder could deliver is kept"


def _decodable_prefix(data: bytes, fmt: str) -> bytes:
    """What a permissive decoder gets out of a cut stream."""
    if fmt == "gz":
        import zlib

        return zlib.decompressobj(wbits=31).decompress(data)
    out, dctx = b"", zstandard.ZstdDecompressor()
    while data:
        obj = dctx.decompressobj()
        try:
            out += obj.decompress(data)
        except zstandard.ZstdError:
            break
        if not obj.eof:
            break
        data = obj.unused_data
    return out
