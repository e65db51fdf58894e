"""raw_corpus dedup and bucketing, tokenizer determinism, budgeted subsets."""

import hashlib

import polars as pl
import pytest

from synth_cpt.core.layout import TOKENIZER, TOKENIZER_INFO, TOKENIZER_MODEL, partition_file, version_prefix
from synth_cpt.core.publish import CandidateRejected
from synth_cpt.core.storage import LocalStorage
from synth_cpt.corpus.subsets import select_budgeted
from synth_cpt.corpus.tokenizer import TokenCounter, build_tokenizer, train_model
from synth_cpt.ingest.dedup import build_raw_corpus
from synth_cpt.ingest.drops import ingest_drop
from synth_cpt.ingest.sources import list_drops

from .conftest import EN_TEXT, PT_TEXT, make_config, write_jsonl


def _ingest_all(cfg, tmp_path):
    source = LocalStorage(tmp_path / "drops")
    storage = LocalStorage(tmp_path / "home")
    for drop in list_drops(source, cfg.drops.patterns).drops:
        ingest_drop(cfg, storage, source, drop)
    return storage


def test_dedup_across_drops_earliest_drop_wins_and_buckets(tmp_path):
    cfg = make_config(tmp_path)
    shared = {"text": PT_TEXT, "edu": 3.0, "url": "https://first"}
    write_jsonl(tmp_path / "drops/2026-01-01.jsonl", [shared, {"text": PT_TEXT + " Baixa.", "edu": 1.0}])
    write_jsonl(
        tmp_path / "drops/2026-02-01.jsonl",
        [
            {**shared, "url": "https://second"},  # same normalized text -> same doc_id
            {"text": PT_TEXT.replace(" ", "  ") + " Alta.", "stem": 4.0},
            {"text": PT_TEXT + " Meio.", "edu": 2.2},  # between the buckets
            {"text": EN_TEXT, "edu": 4.0},
        ],
    )
    storage = _ingest_all(cfg, tmp_path)
    high = build_raw_corpus(storage, cfg, "pt", "high")
    low = build_raw_corpus(storage, cfg, "pt", "low")
    assert (high.language_documents, high.unique_documents, high.duplicates_removed) == (5, 4, 1)
    assert high.in_no_bucket == 1 and low.in_no_bucket == 1
    assert high.documents == 2 and low.documents == 1
    frame = storage.read_parquet(partition_file("raw_corpus", "pt", "high"))
    first = frame.filter(pl.col("url").is_in(["https://first", "https://second"]))
    assert first["url"].to_list() == ["https://first"] and first["drop_id"][0] == "2026-01-01.jsonl"
    assert set(frame["quality"]) == {"high"} and set(frame["language"]) == {"pt"}
    assert high.summary.drops == ["2026-01-01.jsonl", "2026-02-01.jsonl"]
    en = build_raw_corpus(storage, cfg, "en", "high")
    assert en.documents == 1 and en.duplicates_removed == 0


def test_drop_over_quarantine_rate_is_kept_out(tmp_path):
    cfg = make_config(tmp_path, limits={"max_quarantine_rate": 0.3})
    write_jsonl(tmp_path / "drops/good.jsonl", [{"text": PT_TEXT, "edu": 4.0}])
    write_jsonl(tmp_path / "drops/bad.jsonl", [{"text": PT_TEXT + " x", "edu": 4.0}, b"{oops", b"[1]"])
    storage = _ingest_all(cfg, tmp_path)
    stats = build_raw_corpus(storage, cfg, "pt", "high")
    assert stats.rejected_drops == ["bad.jsonl"]
    assert stats.documents == 1 and stats.summary.drops == ["good.jsonl"]


def test_empty_corpus_writes_an_empty_partition(tmp_path):
    cfg = make_config(tmp_path)
    (tmp_path / "drops").mkdir()
    storage = LocalStorage(tmp_path / "home")
    stats = build_raw_corpus(storage, cfg, "pt", "low")
    assert stats.documents == 0
    assert storage.read_parquet(partition_file("raw_corpus", "pt", "low")).height == 0


@pytest.fixture(scope="module")
def counter():
    texts = [f"{PT_TEXT} {EN_TEXT} documento {i}." for i in range(50)]
    return TokenCounter(train_model(texts, vocab_size=600, seed=1, character_coverage=1.0))


def _frame(n: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "doc_id": [f"d{i:03d}" for i in range(n)],
            "text": [f"{PT_TEXT[: 40 + 7 * i]}" for i in range(n)],
            "quality_score": [float(i % 5) for i in range(n)],
        }
    )


def _longest_prefix(frame: pl.DataFrame, counter, budget: int) -> tuple[list[str], int, int]:
    """The rule, written out: the longest prefix of the ordered frame within the budget, its tokens, and
    the tokens of the first document left out."""
    ids, total = [], 0
    for doc, n in zip(frame["doc_id"], counter.count(frame["text"].to_list()), strict=True):
        if total + n > budget:
            return ids, total, n
        ids.append(doc)
        total += n
    raise AssertionError("the budget holds every document: the rule is not exercised")


def test_budgeted_selection_rule(counter):
    frame = _frame(30)
    subset, stats = select_budgeted(frame, counter, 300, "score", 1)
    ids, tokens, stopped = _longest_prefix(frame.sort(["quality_score", "doc_id"], descending=[True, False]), counter, 300)
    assert subset["doc_id"].to_list() == ids and len(ids) > 1
    assert (stats.documents, stats.tokens, stats.stopped_at_doc_tokens) == (len(ids), tokens, stopped)
    assert subset["n_tokens"].to_list() == counter.count(subset["text"].to_list())
    bigger, _ = select_budgeted(frame, counter, 600, "score", 1)
    assert set(subset["doc_id"]) < set(bigger["doc_id"]), "a larger budget is a superset"
    everything, all_stats = select_budgeted(frame, counter, None, "score", 1)
    assert everything.height == 30 and all_stats.stopped_at_doc_tokens is None


def test_random_order_is_seeded_and_independent_of_row_order(counter):
    frame = _frame(30)
    a, _ = select_budgeted(frame, counter, 250, "random", 7)
    b, _ = select_budgeted(frame.reverse(), counter, 250, "random", 7)
    c, _ = select_budgeted(frame, counter, 250, "random", 8)
    seeded = frame.with_columns(
        pl.col("doc_id").map_elements(lambda d: hashlib.sha256(f"7:{d}".encode()).hexdigest(), pl.String).alias("k")
    )
    assert a["doc_id"].to_list() == _longest_prefix(seeded.sort("k"), counter, 250)[0]
    assert a["doc_id"].to_list() == b["doc_id"].to_list()
    assert a["doc_id"].to_list() != c["doc_id"].to_list()


def test_tokenizer_is_trained_deterministically_and_hash_recorded(tmp_path):
    cfg = make_config(tmp_path, tokenizer={"vocab_size": 600, "sample_documents": 10})
    write_jsonl(tmp_path / "drops/d.jsonl", [{"text": f"{PT_TEXT} {i}", "edu": 3} for i in range(20)])
    storage = _ingest_all(cfg, tmp_path)
    build_raw_corpus(storage, cfg, "pt", "high")
    files = [partition_file("raw_corpus", "pt", "high")]
    first = build_tokenizer(storage, cfg, files)
    second = build_tokenizer(storage, cfg, files)
    same = lambda info: {k: v for k, v in info.items() if k not in ("version", "uri", "outcome")}  # noqa: E731
    assert same(first) == same(second) and first["trained_on_documents"] == 10
    assert first["version"] < second["version"]
    assert TokenCounter.from_storage(storage).sha256 == first["sha256"]


def test_configured_tokenizer_model_file(tmp_path):
    model = train_model([PT_TEXT] * 5, vocab_size=600, seed=1, character_coverage=1.0)
    (tmp_path / "t.model").write_bytes(model)
    cfg = make_config(tmp_path, tokenizer={"model_file": str(tmp_path / "t.model")})
    info = build_tokenizer(LocalStorage(tmp_path / "home"), cfg, [])
    assert info["source"] == "model_file" and info["sha256"] == TokenCounter(model).sha256
    (tmp_path / "bad.model").write_bytes(b"not a model")
    bad = make_config(tmp_path, tokenizer={"model_file": str(tmp_path / "bad.model")})
    with pytest.raises(CandidateRejected, match=r"model does not load \(.*bad.model\)"):  # a candidate, rejected like any
        build_tokenizer(LocalStorage(tmp_path / "home"), bad, [])


def test_tokenizer_model_and_info_are_one_published_version(tmp_path):
    """The pointer, written last, carries the info of the model it points at; a candidate that fails
    `check_model` is never published and readers keep the previous model."""
    from synth_cpt.corpus.tokenizer import check_model, published_tokenizer

    cfg = make_config(tmp_path, tokenizer={"vocab_size": 600, "sample_documents": 10})
    write_jsonl(tmp_path / "drops/d.jsonl", [{"text": f"{PT_TEXT} {i}", "edu": 3} for i in range(20)])
    storage = _ingest_all(cfg, tmp_path)
    build_raw_corpus(storage, cfg, "pt", "high")
    files = [partition_file("raw_corpus", "pt", "high")]
    good = build_tokenizer(storage, cfg, files, validate=check_model)
    assert good["outcome"].success
    pointer = published_tokenizer(storage)
    assert pointer["info"]["sha256"] == good["sha256"] == TokenCounter.from_storage(storage).sha256
    assert pointer["info"]["vocab_size"] == good["vocab_size"] == TokenCounter.from_storage(storage).vocab_size

    def damaged_on_the_way(s, prefix):  # the stored model is not the one made: the check reads it back
        key = f"{prefix}/{TOKENIZER_MODEL}"
        s.write_bytes(key, s.read_bytes(key)[:1000])
        return check_model(s, prefix)

    with pytest.raises(CandidateRejected, match="differs from its info's") as rejected:
        build_tokenizer(storage, cfg, files, validate=damaged_on_the_way)
    assert "does not load" in str(rejected.value)
    assert published_tokenizer(storage) == pointer, "the previous model stays published"
    assert len(list((tmp_path / "home/_rejected/tokenizer/v").iterdir())) == 1


def test_a_corrupt_model_candidate_is_rejected_and_kept(tmp_path):
    """A model that does not load goes through the check like any candidate: rejected, kept under
    _rejected/ with its info, and the published tokenizer stays."""
    from synth_cpt.core.publish import CandidateRejected
    from synth_cpt.corpus.tokenizer import published_tokenizer

    storage = LocalStorage(tmp_path / "home")
    model = train_model([PT_TEXT, EN_TEXT] * 5, vocab_size=600, seed=1, character_coverage=1.0)
    (tmp_path / "good.model").write_bytes(model)
    good = build_tokenizer(storage, make_config(tmp_path, tokenizer={"model_file": str(tmp_path / "good.model")}), [])
    pointer = published_tokenizer(storage)
    (tmp_path / "corrupt.model").write_bytes(model[: len(model) // 2])
    with pytest.raises(CandidateRejected) as rejected:
        build_tokenizer(storage, make_config(tmp_path, tokenizer={"model_file": str(tmp_path / "corrupt.model")}), [])
    assert rejected.value.check_name == "model_loads" and not rejected.value.outcome.details["loads"]["success"]
    assert published_tokenizer(storage) == pointer and TokenCounter.from_storage(storage).sha256 == good["sha256"]
    (kept,) = (tmp_path / "home/_rejected/tokenizer/v").iterdir()
    assert sorted(p.name for p in kept.iterdir()) == sorted([TOKENIZER_INFO, TOKENIZER_MODEL])
    assert (kept / TOKENIZER_MODEL).read_bytes() == model[: len(model) // 2]
    assert len(list((tmp_path / "home" / TOKENIZER / "v").iterdir())) == 1, "the rejected version left the tokenizer's folder"


def test_tokenizer_reads_only_the_columns_it_needs(tmp_path, monkeypatch):
    """Training reads doc_id and text through ranged column reads: no corpus file is copied whole (on
    S3 that was a download of every partition)."""
    import pyarrow.parquet as pq

    cfg = make_config(tmp_path, tokenizer={"vocab_size": 600, "sample_documents": 10})
    write_jsonl(tmp_path / "drops/d.jsonl", [{"text": f"{PT_TEXT} {i}", "edu": 3} for i in range(20)])
    storage = _ingest_all(cfg, tmp_path)
    build_raw_corpus(storage, cfg, "pt", "high")
    files = [partition_file("raw_corpus", "pt", "high")]
    expected = build_tokenizer(storage, cfg, files)

    def whole_copy(key):
        raise AssertionError(f"{key} copied whole")

    columns = []
    iter_batches = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        columns.append(tuple(kwargs.get("columns") or ()))
        return iter_batches(self, *args, **kwargs)

    monkeypatch.setattr(storage, "local_path", whole_copy)
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    info = build_tokenizer(storage, cfg, files)
    assert info["sha256"] == expected["sha256"] and info["trained_on_documents"] == 10 and info["corpus_documents"] == 20
    assert set(columns) == {("doc_id",), ("doc_id", "text")}


def test_a_tokenizer_superseded_by_a_newer_run_says_so(tmp_path):
    from synth_cpt.core import publish
    from synth_cpt.corpus.tokenizer import check_model, published_tokenizer

    model = train_model([PT_TEXT, EN_TEXT] * 5, vocab_size=600, seed=1, character_coverage=1.0)
    (tmp_path / "t.model").write_bytes(model)
    cfg = make_config(tmp_path, tokenizer={"model_file": str(tmp_path / "t.model")})
    storage = LocalStorage(tmp_path / "home")

    def newer_run_publishes_first(s, prefix):
        newer = publish.new_version()
        s.copy(f"{prefix}/{TOKENIZER_MODEL}", f"{version_prefix(TOKENIZER, newer)}/{TOKENIZER_MODEL}")
        publish.publish_version(s, TOKENIZER, newer, {"info": {"source": "another run"}})
        return check_model(s, prefix)

    info = build_tokenizer(storage, cfg, [], validate=newer_run_publishes_first)
    in_force = published_tokenizer(storage)
    assert in_force["info"] == {"source": "another run"}, "the newer version stays in force"
    assert info["superseded_by"] == in_force["version"] != info["version"]
    assert info["uri"] == storage.uri(in_force["prefix"], TOKENIZER_MODEL)


# -- the bounded-memory dedup against the rule it implements ------------------------------------------


def _doc(drop_id: str, line: int, doc_id: str, language: str, score: float | None) -> dict:
    return {
        "doc_id": doc_id, "text": f"texto {doc_id} de {drop_id}", "url": f"https://x/{drop_id}/{line}", "title": None,
        "record_id": str(line), "language": language, "language_score": 0.9, "language_source": "fasttext",
        "score_edu": score, "score_stem": None, "score_heuristic": 1.0, "quality_score": score, "quality_score_source": "edu",
        "n_chars": 20, "encoding_repaired": False, "drop_id": drop_id, "source_file": f"/drops/{drop_id}", "source_line": line,
    }  # fmt: skip


def _publish_docs(storage, cfg, drop_id: str, rows: list[dict], quarantine_rate: float = 0.0, without: tuple[str, ...] = ()):
    """A drop published as ingest_drop publishes one, with row groups of two rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from synth_cpt.core.contracts import drop_documents
    from synth_cpt.core.layout import drop_prefix, version_prefix
    from synth_cpt.core.publish import new_version
    from synth_cpt.ingest.drops import publish_drop

    version = new_version()
    prefix = version_prefix(drop_prefix(drop_id), version)
    table = pa.Table.from_pylist(rows, schema=drop_documents(cfg)).drop_columns(list(without))
    with storage.writing(f"{prefix}/docs.parquet") as tmp:
        pq.write_table(table, tmp, row_group_size=2, compression="zstd")
    manifest = {"drop_id": drop_id, "documents": len(rows), "quarantine_rate": quarantine_rate, "complete": True, "version": version}
    publish_drop(storage, drop_id, version, manifest)


def _reference(storage, cfg, language: str, quality: str):
    """The rule, in memory (the query raw_corpus ran before it was bounded): first occurrence of a doc_id
    in (drop_id, source_line) order over every accepted drop of the language, then the bucket."""
    from synth_cpt.core.contracts import corpus_documents
    from synth_cpt.ingest.drops import drop_accepted, ingested_drops

    accepted = [m for m in ingested_drops(storage) if drop_accepted(m, cfg) and m["documents"] > 0]
    docs = pl.concat(  # every row stamped with the version of the drop it was read from
        [storage.read_parquet(f"{m['prefix']}/docs.parquet").with_columns(pl.lit(m["version"]).alias("drop_version")) for m in accepted],
        how="diagonal_relaxed",
    )
    lang = docs.filter(pl.col("language") == language)
    unique = lang.sort("drop_id", "source_line").unique(subset="doc_id", keep="first", maintain_order=True)
    frame = unique.filter(cfg.quality.buckets[quality].expr()).with_columns(pl.lit(quality).alias("quality"))
    return frame.select(corpus_documents(cfg).names), (lang.height, unique.height, unique.filter(~cfg.quality.in_any_bucket()).height)


def _cross_drop_corpus(tmp_path):
    cfg = make_config(tmp_path)  # buckets: high > 2.5, low 0.5..2.0
    storage = LocalStorage(tmp_path / "home")
    d1, d2, d3, bad = "2026-01-01.jsonl", "2026-02-01.jsonl", "2026-03-01.jsonl", "2026-04-01.jsonl"
    # lines out of order within the file: the output still follows (drop_id, source_line)
    first = [(5, "a", "pt", 3.0), (1, "b", "pt", 1.0), (3, "c", "pt", 2.2), (2, "e", "en", 4.0), (4, "d", "pt", 0.2), (6, "n", "pt", None)]
    second = [(1, "a", "pt", 1.0), (2, "b", "pt", 4.0), (3, "f", "pt", 4.5), (4, "g", "pt", 1.5), (5, "g", "pt", 3.0), (6, "e", "en", 1.0)]
    third = [(1, "f", "pt", 1.0), (2, "i", "pt", 2.6), (3, "h", "pt", 0.5), (4, "c", "pt", 3.5)]
    _publish_docs(storage, cfg, d2, [_doc(d2, *r) for r in second])  # published out of order: ids decide
    _publish_docs(storage, cfg, d1, [_doc(d1, *r) for r in first])
    _publish_docs(storage, cfg, d3, [_doc(d3, *r) for r in third], without=("score_stem", "title"))  # older schema
    _publish_docs(storage, cfg, bad, [_doc(bad, 1, "j", "pt", 4.0)], quarantine_rate=0.9)
    return cfg, storage


def test_bounded_dedup_equals_the_rule_across_drops(tmp_path):
    cfg, storage = _cross_drop_corpus(tmp_path)
    published = {}
    for language, quality in [("pt", "high"), ("pt", "low"), ("en", "high"), ("en", "low")]:
        stats = build_raw_corpus(storage, cfg, language, quality)
        frame = storage.read_parquet(partition_file("raw_corpus", language, quality))
        expected, (n, unique, no_bucket) = _reference(storage, cfg, language, quality)
        assert frame.to_dicts() == expected.to_dicts(), f"{language}|{quality}"
        assert (stats.language_documents, stats.unique_documents, stats.in_no_bucket) == (n, unique, no_bucket)
        assert stats.duplicates_removed == n - unique and stats.documents == frame.height
        assert stats.rejected_drops == ["2026-04-01.jsonl"]
        published[language, quality] = frame
    high, low = published["pt", "high"], published["pt", "low"]
    assert high["doc_id"].to_list() == ["a", "f", "i"] and low["doc_id"].to_list() == ["b", "g", "h"]
    assert high.filter(pl.col("doc_id") == "a")["drop_id"].item() == "2026-01-01.jsonl", "the earliest drop wins"
    assert "c" not in set(high["doc_id"]) | set(low["doc_id"]), "the winner's score (between the buckets) decides"
    assert not set(high["doc_id"]) & set(low["doc_id"]), "a duplicate never lands in two buckets"
    assert high.filter(pl.col("doc_id") == "i")["title"].item() is None, "a column a drop lacks is null"


def test_bounded_dedup_is_deterministic_and_memory_limited(tmp_path, monkeypatch):
    from synth_cpt.ingest import dedup

    cfg, storage = _cross_drop_corpus(tmp_path)
    settings = {}
    connect = dedup.connect

    def spy(temp_dir):
        con = connect(temp_dir)
        query = "SELECT name, value FROM duckdb_settings() WHERE name IN ('memory_limit', 'threads', 'temp_directory')"
        settings.update(dict(con.execute(query).fetchall()))
        return con

    monkeypatch.setattr(dedup, "connect", spy)
    key = partition_file("raw_corpus", "pt", "high")
    build_raw_corpus(storage, cfg, "pt", "high")
    once = storage.read_bytes(key)
    build_raw_corpus(storage, cfg, "pt", "high")
    assert storage.read_bytes(key) == once, "a rerun writes the same bytes"
    assert settings["memory_limit"] not in ("", None) and settings["threads"] == str(dedup.DUCKDB_THREADS)
    assert "synth-cpt-dedup-" in settings["temp_directory"], "DuckDB spills to a temporary folder of its own"
    import duckdb

    limit = duckdb.connect(config={"memory_limit": dedup.DUCKDB_MEMORY_LIMIT}).execute("SELECT current_setting('memory_limit')").fetchall()
    assert settings["memory_limit"] == limit[0][0]


def test_bounded_dedup_puts_null_drop_ids_and_lines_first_like_the_rule(tmp_path):
    """Drops of an older schema lack drop_id or source_line (read as null): the rule sorts nulls first,
    so their occurrence of a doc_id wins over one with a value."""
    cfg = make_config(tmp_path)
    storage = LocalStorage(tmp_path / "home")
    _publish_docs(storage, cfg, "x1", [_doc("same", 7, "a", "pt", 3.0)], without=("source_line",))
    _publish_docs(storage, cfg, "x2", [_doc("same", 1, "a", "pt", 3.5), _doc("same", 2, "b", "pt", 4.0)])
    _publish_docs(storage, cfg, "x3", [_doc("other", 3, "b", "pt", 4.5)], without=("drop_id",))
    build_raw_corpus(storage, cfg, "pt", "high")
    frame = storage.read_parquet(partition_file("raw_corpus", "pt", "high"))
    expected, _ = _reference(storage, cfg, "pt", "high")
    assert frame.to_dicts() == expected.to_dicts()
    assert frame["url"].to_list() == ["https://x/other/3", "https://x/same/7"], "the null drop_id, then the null line, win"


def test_bounded_dedup_holds_few_files_open(tmp_path, monkeypatch):
    """Many drops must not mean as many open files (EMFILE) or S3 streams: a reader thread holds one
    file at a time and every file is closed at the end."""
    import contextlib
    import os

    from synth_cpt.ingest import dedup
    from synth_cpt.ingest.drops import published_prefix

    cfg = make_config(tmp_path)
    storage = LocalStorage(tmp_path / "home")
    for d in range(12):
        drop = f"2026-01-{d + 1:02d}.jsonl"
        _publish_docs(storage, cfg, drop, [_doc(drop, line, f"{d}-{line}", "pt", 3.0) for line in range(6)])

    def open_docs() -> int:
        count = 0
        for name in os.listdir("/proc/self/fd"):
            try:  # a descriptor closed by another thread since the listing is not open
                count += os.readlink(os.path.join("/proc/self/fd", name)).endswith("docs.parquet")
            except FileNotFoundError:
                pass
        return count

    with contextlib.closing(storage.parquet_file(f"{published_prefix(storage, '2026-01-01.jsonl')}/docs.parquet")):
        assert open_docs() == 1, "the count sees an open file"
    most, opened = [0], set()
    parquet_file = storage.parquet_file

    def counting(key):
        most[0] = max(most[0], open_docs())
        opened.add(key)
        return parquet_file(key)

    monkeypatch.setattr(storage, "parquet_file", counting)
    assert build_raw_corpus(storage, cfg, "pt", "high").documents == 72
    assert len(opened) == 12, "every drop's file is opened through the counting spy"
    assert most[0] <= dedup.READERS, f"{most[0]} docs.parquet files open at once"
    assert open_docs() == 0
