"""Every quarantine reason, and that no valid record is lost."""

import io

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synth_cpt.core.storage import LocalStorage, is_candidate
from synth_cpt.ingest import documents as D
from synth_cpt.ingest import quarantine as Q
from synth_cpt.ingest import records as R
from synth_cpt.ingest.drops import ingest_drop, published_prefix
from synth_cpt.ingest.sources import list_drops
from synth_cpt.text.heuristics import score_text
from synth_cpt.text.normalize import normalize_text

from .conftest import EN_TEXT, PT_TEXT, make_config, write_jsonl


def _run(cfg, lines: list[bytes]):
    parser = R.RecordParser(cfg)
    batches = list(R.iter_batches_jsonl(parser, io.BufferedReader(io.BytesIO(b"\n".join(lines) + b"\n")), cfg.limits.batch_bytes))
    docs, quarantine = [], []
    for b in batches:
        d, q = D.finish_batch(b, cfg, "drop-1", "file.jsonl")
        docs.append(d)
        quarantine.append(q)
    return pl.concat(docs), pl.concat(quarantine)


BAD = {
    Q.INVALID_JSON: b'{"text": "unterminated',
    Q.INVALID_UTF8: b'{"text": "caf\xe9"}',
    Q.NOT_OBJECT: b'["a", "b"]',
    Q.MISSING_TEXT: b'{"url": "https://x"}',
    Q.NULL_TEXT: b'{"text": null}',
    Q.NON_STRING_TEXT: b'{"text": 42}',
    Q.EMPTY_TEXT: b'{"text": " \\u0000\\t\\n "}',
    Q.LANGUAGE_NOT_DETECTED: b'{"text": "a1 b2 c3 d4"}',
    Q.NO_LETTERS: b'{"text": "\\u200b\\u2060 \\ud83d\\ude00\\ud83c\\udf89 1234 !!", "language": "pt", "edu": 4.5}',
    Q.BAD_SCORE: b'{"text": "x", "edu": "very"}',
}


# what each sentence must say (the language one also names the model's best guess, not asserted)
SAYS = {
    Q.INVALID_JSON: "invalid JSON: unexpected end of data",
    Q.INVALID_UTF8: "invalid UTF-8 at byte 13 (0xe9); re-encode the source as UTF-8",
    Q.NOT_OBJECT: "record is a JSON array, not an object",
    Q.MISSING_TEXT: "record has no 'text' field (fields.text)",
    Q.NULL_TEXT: "'text' is null",
    Q.NON_STRING_TEXT: "'text' is a number, not a string",
    Q.EMPTY_TEXT: "text is empty after normalization (only whitespace, control or invisible characters)",
    Q.LANGUAGE_NOT_DETECTED: "< language_id.min_confidence=0.4; add a language field or lower the threshold",
    Q.NO_LETTERS: "no letters left after normalization (only digits, symbols, emoji or punctuation): not prose",
    Q.BAD_SCORE: "score field 'edu' must be a number in 0-5, got 'very'",
}


@pytest.mark.parametrize("code", sorted(BAD))
def test_each_reason_is_quarantined_with_an_actionable_sentence(tmp_path, code):
    cfg = make_config(tmp_path)
    good = f'{{"text": {PT_TEXT!r}}}'.replace("'", '"').encode()
    docs, q = _run(cfg, [good, BAD[code], good])
    assert q["reason_code"].to_list() == [code]
    assert q["source_line"].to_list() == [2]
    assert SAYS[code] in q["reason"][0]
    assert docs.height == 2, "the valid records around a bad one are kept"


def test_reason_texts_say_what_is_wrong(tmp_path):
    cfg = make_config(tmp_path)
    _, q = _run(cfg, list(BAD.values()))
    by_code = dict(zip(q["reason_code"], q["reason"], strict=True))
    assert "byte 13 (0xe9)" in by_code[Q.INVALID_UTF8]  # {"text": "caf is 13 bytes
    assert "JSON array" in by_code[Q.NOT_OBJECT]
    assert "'text' is a number" in by_code[Q.NON_STRING_TEXT]
    assert "min_confidence" in by_code[Q.LANGUAGE_NOT_DETECTED]
    assert "'edu'" in by_code[Q.BAD_SCORE]
    assert q.height == len(BAD)


def test_oversized_record_is_quarantined_without_reading_it_whole(tmp_path):
    cfg = make_config(tmp_path, limits={"max_record_bytes": 1000})
    big = b'{"text": "' + b"a" * 50_000 + b'"}'
    good = b'{"text": "' + EN_TEXT.encode() + b'"}'
    docs, q = _run(cfg, [good, big, good])
    assert q["reason_code"].to_list() == [Q.TOO_LARGE]
    assert "50,012 bytes" in q["reason"][0]
    assert docs.height == 2 and docs["source_line"].to_list() == [1, 3]


def test_fields_mapping_languages_and_score_combination(tmp_path):
    cfg = make_config(
        tmp_path,
        fields={"text": "content", "id": "uid", "language": "lang", "scores": {"edu": "edu_int", "stem": "stem"}},
    )
    lines = [
        b'{"content": "' + PT_TEXT.encode() + b'", "uid": 7, "lang": "pt-BR", "edu_int": 1.5, "stem": 3.25}',
        b'{"content": "' + EN_TEXT.encode() + b'", "stem": 0.75}',
        b'{"content": "' + EN_TEXT.encode() + b' Again."}',
    ]
    docs, q = _run(cfg, lines)
    assert q.height == 0
    rows = docs.sort("source_line").to_dicts()
    assert rows[0]["language"] == "pt" and rows[0]["language_source"] == "record" and rows[0]["language_score"] is None
    assert rows[0]["record_id"] == "7"
    assert rows[0]["quality_score"] == 3.25 and rows[0]["quality_score_source"] == "fields"  # max(edu, stem)
    assert rows[1]["language"] == "en" and rows[1]["language_source"] == "detected" and rows[1]["language_score"] > 0.9
    assert rows[1]["quality_score"] == 0.75
    heuristic = score_text(normalize_text(EN_TEXT + " Again."))
    assert (rows[2]["quality_score_source"], rows[2]["quality_score"], rows[2]["score_heuristic"]) == ("heuristic", heuristic, heuristic)


def test_fallback_quarantine_when_scores_are_required(tmp_path):
    cfg = make_config(tmp_path, quality={"fallback": "quarantine"})
    docs, q = _run(cfg, [b'{"text": "' + EN_TEXT.encode() + b'"}', b'{"text": "' + EN_TEXT.encode() + b' 2", "edu": 4}'])
    assert q["reason_code"].to_list() == [Q.NO_SCORE]
    assert docs["quality_score"].to_list() == [4.0]


def test_mean_and_min_combination(tmp_path):
    line = b'{"text": "' + EN_TEXT.encode() + b'", "edu": 1.0, "stem": 3.0}'
    assert _run(make_config(tmp_path, quality={"combine": "mean"}), [line])[0]["quality_score"][0] == 2.0
    assert _run(make_config(tmp_path, quality={"combine": "min"}), [line])[0]["quality_score"][0] == 1.0


@pytest.mark.parametrize("fmt", ["jsonl", "gz", "zst", "parquet"])
def test_every_drop_format_gives_the_same_documents(tmp_path, fmt):
    cfg = make_config(tmp_path, limits={"batch_bytes": 300})  # several batches
    records = [{"id": str(i), "text": f"{PT_TEXT} Número {i}.", "url": f"https://x/{i}"} for i in range(12)]
    records.insert(5, {"id": "bad", "text": None})
    drops = tmp_path / "drops"
    if fmt == "parquet":
        drops.mkdir()
        pq.write_table(pa.Table.from_pylist(records), drops / "d.parquet")
    else:
        write_jsonl(drops / f"d.jsonl{'' if fmt == 'jsonl' else '.' + fmt}", records, compress=None if fmt == "jsonl" else fmt)
    source = LocalStorage(drops)
    (drop,) = list_drops(source, cfg.drops.patterns).drops
    storage = LocalStorage(tmp_path / "home")
    report = ingest_drop(cfg, storage, source, drop)
    assert (report.records, report.documents, report.quarantined) == (13, 12, 1)
    docs = storage.read_parquet(f"{published_prefix(storage, drop.key)}/docs.parquet")
    assert docs["record_id"].to_list() == [str(i) for i in range(12)]
    assert docs["source_line"].to_list() == [1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13]
    assert docs["doc_id"].n_unique() == 12
    q = storage.read_parquet(f"{published_prefix(storage, drop.key)}/quarantine.parquet")
    assert q["reason_code"].to_list() == [Q.NULL_TEXT] and q["source_line"].to_list() == [6]
    manifest = storage.read_json(f"{published_prefix(storage, drop.key)}/manifest.json")
    assert manifest["accepted"] and manifest["quarantine_by_reason"] == {Q.NULL_TEXT: 1}
    assert not [p for p in (tmp_path / "home").rglob("*") if is_candidate(p.name)], "no temporary files are left behind"


def test_blank_lines_are_not_records(tmp_path):
    cfg = make_config(tmp_path)
    docs, q = _run(cfg, [b"", b'{"text": "' + EN_TEXT.encode() + b'"}', b"   ", b""])
    assert docs.height == 1 and q.height == 0 and docs["source_line"][0] == 2


def test_worker_processes_give_the_same_drop_as_one_process(tmp_path):
    records = [{"id": str(i), "text": (PT_TEXT if i % 2 else EN_TEXT) + f" {i}"} for i in range(40)] + [{"text": 5}]
    write_jsonl(tmp_path / "drops/d.jsonl", records)
    source = LocalStorage(tmp_path / "drops")
    (drop,) = list_drops(source, ("*.jsonl",)).drops
    outputs = []
    for workers in (1, 2):
        cfg = make_config(tmp_path, limits={"batch_bytes": 2000, "workers": workers})  # drop >> 2 batches: pool path
        storage = LocalStorage(tmp_path / f"home{workers}")
        report = ingest_drop(cfg, storage, source, drop)
        outputs.append((report.documents, report.quarantined, storage.read_parquet(f"{published_prefix(storage, drop.key)}/docs.parquet")))
    (n1, q1, d1), (n2, q2, d2) = outputs
    assert (n1, q1) == (n2, q2) == (40, 1)
    assert d1.equals(d2)
    assert set(d2["language"]) == {"pt", "en"}


POOL_THREADS = """
import polars  # the parent's __main__ imports polars first: a spawned worker re-imports this module
import sys

sys.path.insert(0, {repo!r})
from synth_cpt.ingest import drops


def probe(batch, config, drop_id, uri):
    return polars.thread_pool_size()


drops.finish_batch = probe  # what each worker runs: its polars' thread count


class Batch:
    texts = ["x"]
    quarantine = []


if __name__ == "__main__":
    from pathlib import Path

    from synth_cpt.ingest.sources import DropFile
    from synth_cpt_tests.conftest import make_config

    cfg = make_config(Path({tmp!r}), limits={{"batch_bytes": 2000, "workers": 2}})
    drop = DropFile("d", "d", "d.jsonl", "v", 100_000)  # >> 2 batches: the pool path
    print(sorted({{threads for _, threads in drops._finished(iter([Batch() for _ in range(6)]), cfg, drop)}}))
    print(drops.os.environ.get("POLARS_MAX_THREADS"))
"""


def test_worker_processes_get_their_share_of_polars_threads(tmp_path):
    """Each spawned worker's polars uses cpu_count // workers threads, even when the parent's __main__
    imported polars (a spawned worker imports it again before any initializer runs); the parent's
    environment is as it was afterwards."""
    import os
    import subprocess
    import sys

    import polars

    from .conftest import REPO

    share = max(1, (os.cpu_count() or 1) // 2)
    if share == polars.thread_pool_size():
        pytest.skip("one CPU: a worker's share is polars' default")
    script = tmp_path / "main.py"
    script.write_text(POOL_THREADS.format(repo=str(REPO), tmp=str(tmp_path)))
    env = {k: v for k, v in os.environ.items() if k != "POLARS_MAX_THREADS"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:2] == [f"[{share}]", "None"]


def test_language_id_skips_records_with_a_language_and_repeats(tmp_path, monkeypatch):
    """Only records without a language field are classified, each distinct text once; duplicates get
    the same language and score as the first."""
    from synth_cpt.text import langid

    model = langid._model()
    asked: list[str] = []

    class CountingModelDouble:  # the real model, counting what it is asked
        class f:  # noqa: N801 - mirrors fastText's attribute
            @staticmethod
            def predict(line, *args):
                asked.append(line)
                return model.f.predict(line, *args)

    monkeypatch.setattr(langid, "_model", lambda: CountingModelDouble)
    cfg = make_config(tmp_path)
    pt, en = f'{{"text": "{PT_TEXT}"}}'.encode(), f'{{"text": "{EN_TEXT}"}}'.encode()
    with_language = f'{{"text": "{EN_TEXT} Outra.", "language": "pt"}}'.encode()
    docs, q = _run(cfg, [pt, en, pt, with_language, en, pt])
    assert q.height == 0 and len(asked) == 2
    rows = docs.sort("source_line").select("language", "language_score", "language_source").rows()
    assert [r[0] for r in rows] == ["pt", "en", "pt", "pt", "en", "pt"]
    assert rows[0] == rows[2] == rows[5] and rows[1] == rows[4]
    assert rows[3] == ("pt", None, "record")
