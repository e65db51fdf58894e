"""raw_corpus dedup and bucketing, tokenizer determinism, budgeted subsets."""

import polars as pl
import pytest

from synth_cpt.core.layout import partition_file
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


def test_budgeted_selection_rule(counter):
    frame = _frame(30)
    subset, stats = select_budgeted(frame, counter, 300, "score", 1)
    assert stats.tokens == subset["n_tokens"].sum() <= 300
    assert stats.stopped_at_doc_tokens is not None and stats.tokens + stats.stopped_at_doc_tokens > 300
    assert subset["quality_score"].to_list() == sorted(subset["quality_score"].to_list(), reverse=True)
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
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        build_tokenizer(LocalStorage(tmp_path / "home"), bad, [])


def test_tokenizer_model_and_info_are_one_published_version(tmp_path):
    """The pointer, written last, carries the info of the model it points at; a candidate that fails
    `check_model` is never published and readers keep the previous model."""
    from synth_cpt.core.publish import CandidateRejected
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
    with pytest.raises(CandidateRejected, match="does not load"):
        build_tokenizer(storage, cfg, files, validate=lambda model, info: check_model(model[: len(model) // 2], info))
    assert published_tokenizer(storage) == pointer, "the previous model stays published"
    assert len(list((tmp_path / "home/_rejected/tokenizer/v").iterdir())) == 1
