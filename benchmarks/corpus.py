"""raw_corpus dedup: the two-pass, bounded-memory `build_raw_corpus` against the one before it, same drops.

Generates ~2 GB of accepted drops straight in the published layout, through the real code path: each
drop's `docs.parquet` (the `contracts.drop_documents` schema, row groups of ~4 MB of text as
`ingest_drop` writes them) and an empty `quarantine.parquet` in a fresh version folder, its manifest
from a `DropReport`, made visible by `publish_drop`. Documents are Portuguese and English (60/40,
mixed in every drop) word salad drawn from the sample corpus' word frequencies, ~3 KB each (zstd
compresses it ~2x, about as much as web text; whole repeated paragraphs would compress far more);
quality scores are spread over both buckets and the gap between them; in every drop after the first,
~10% of the documents are copies of documents of earlier drops (same text and doc_id, half of them
scored differently).

Then partition `pt|high` is built twice, as the `raw_corpus` asset builds it (validation included),
each in its own fresh process so its peak RSS is its own:

- **old**: `benchmarks/baselines/corpus_v0.py` (the code before this change: each drop through
  `Storage.local_path`, a streaming polars query sorting and deduplicating every document of the
  language, texts included, once for the figures and once for the output);
- **new**: `synth_cpt.ingest.dedup.build_raw_corpus` (winners in DuckDB over narrow columns under a
  memory limit, then only the bucket's winners read back and streamed out).

Both must publish the same doc_ids in the same order and the same figures, or the script fails. Peak
RSS is the child's VmHWM (its ru_maxrss starts at the parent's RSS, which holds the generator).

    python benchmarks/corpus.py [--gb 2] [--root DIR]

`--root DIR` keeps the generated drops in DIR and reuses them on the next run with the same --gb.
Last line: RESULT corpus ratio=<old_s/new_s> peak_rss_mb=<new>
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.processes import measure, peak_rss_mb  # noqa: E402

DROPS = 8
LANGUAGES = {"pt": 0.6, "en": 0.4}
BATCH_TEXT_BYTES = 4 * 1024 * 1024  # a row group of docs.parquet, as ingest_drop writes them
DUPLICATES = 0.10  # of every drop after the first: copies of earlier drops' documents
RESERVOIR = 20_000  # earlier documents the copies are drawn from
SEPARATORS = [(" ", 0.85), (", ", 0.05), (". ", 0.08), (".\n\n", 0.02)]
PARTITION = ("pt", "high")


def vocabularies() -> dict[str, tuple[list[str], list[int]]]:
    """Words of the sample corpus with their counts, per language."""
    import polars as pl
    import zstandard

    drops = REPO / "synth_cpt" / "sample_corpus" / "drops"
    with gzip.open(drops / "2026-11-01_pt_gimp-help.jsonl.gz") as f:
        pt = [json.loads(line)["text"] for line in f]
    data = zstandard.ZstdDecompressor().stream_reader(open(drops / "2026-11-01_en_gimp-help.jsonl.zst", "rb")).read()
    en = [json.loads(line)["text"] for line in data.splitlines()]
    en += pl.read_parquet(drops / "2026-11-02_en_debian-edu.parquet")["text"].to_list()
    out = {}
    for lang, texts in (("pt", pt), ("en", en)):
        counts = Counter(w.strip(".,;:") for t in texts for w in t.split())
        counts.pop("", None)
        words = sorted(counts)
        out[lang] = (words, [counts[w] for w in words])
    return out


class TextMaker:
    """Documents of 150-850 words drawn by frequency, with separators (vectorized: one batch at a time)."""

    def __init__(self, words: list[str], counts: list[int], rng) -> None:
        import numpy as np

        tokens = [(w + s).encode() for w in words for s, _ in SEPARATORS]
        self.rng = rng
        self.p_word = np.array(counts, dtype=np.float64) / sum(counts)
        self.p_sep = np.array([p for _, p in SEPARATORS])
        self.tok_len = np.array([len(t) for t in tokens], dtype=np.int64)
        self.tok_start = np.concatenate([[0], np.cumsum(self.tok_len)[:-1]])
        self.tok_bytes = np.frombuffer(b"".join(tokens), dtype=np.uint8)

    def make(self, n_docs: int) -> list[bytes]:
        import numpy as np

        rng = self.rng
        n_words = rng.integers(150, 851, n_docs)
        total = int(n_words.sum())
        tokens = rng.choice(len(self.p_word), total, p=self.p_word) * len(SEPARATORS) + rng.choice(len(SEPARATORS), total, p=self.p_sep)
        lens = self.tok_len[tokens]
        ends = np.cumsum(lens)
        starts = ends - lens
        data = self.tok_bytes[np.repeat(self.tok_start[tokens] - starts, lens) + np.arange(int(ends[-1]))].tobytes()
        doc_ends = ends[np.cumsum(n_words) - 1]
        doc_starts = np.concatenate([[0], doc_ends[:-1]])
        return [data[a:b].rstrip(b" ,.\n") + b"." for a, b in zip(doc_starts.tolist(), doc_ends.tolist(), strict=True)]


def generate(root: Path, gb: float, seed: int = 0) -> dict:
    """~`gb` GB of docs.parquet over DROPS published drops under `root` (the storage root)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from synth_cpt.core import publish
    from synth_cpt.core.config import parse_config
    from synth_cpt.core.contracts import QUARANTINE, drop_documents
    from synth_cpt.core.layout import drop_prefix, version_prefix
    from synth_cpt.core.storage import LocalStorage
    from synth_cpt.ingest.drops import DropReport, publish_drop

    cfg = parse_config(json.dumps({"storage_root": str(root)}), "benchmark")
    storage = LocalStorage(root)
    schema = drop_documents(cfg)
    rng = np.random.default_rng(seed)
    makers = {lang: TextMaker(*vocab, rng) for lang, vocab in vocabularies().items()}
    per_drop = gb * 1e9 / DROPS
    reservoir: list[tuple[bytes, str, str, float]] = []  # (text, doc_id, language, quality_score)
    seen = 0
    totals = Counter()
    for d in range(DROPS):
        drop_id = f"2026-10-{d + 1:02d}_crawl.jsonl.zst"
        version = publish.new_version()
        prefix = version_prefix(drop_prefix(drop_id), version)
        fresh: list[tuple[bytes, str, str, float]] = []
        line = 0
        report = DropReport(drop_id=drop_id, source_uri=f"/drops/{drop_id}", source_version="bench", format="jsonl.zst", bytes=0)
        with storage.writing(f"{prefix}/docs.parquet") as tmp:
            with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
                while tmp.stat().st_size < per_drop:  # the writer flushes each row group to the file
                    n = BATCH_TEXT_BYTES // 3100
                    langs = rng.choice(list(LANGUAGES), n, p=list(LANGUAGES.values()))
                    texts = [b""] * n
                    for lang, maker in makers.items():
                        idx = np.flatnonzero(langs == lang)
                        for i, t in zip(idx.tolist(), maker.make(len(idx)), strict=True):
                            texts[i] = t
                    edu = np.round(rng.uniform(0, 5, n), 2)
                    stem = np.where(rng.random(n) < 0.3, np.round(rng.uniform(0, 5, n), 2), np.nan)
                    quality = np.fmax(edu, stem)
                    ids = [hashlib.sha256(t).hexdigest()[:32] for t in texts]
                    if d and reservoir:
                        for i in np.flatnonzero(rng.random(n) < DUPLICATES).tolist():
                            text, doc_id, lang, score = reservoir[int(rng.integers(len(reservoir)))]
                            texts[i], ids[i], langs[i] = text, doc_id, lang
                            if rng.random() < 0.5:
                                edu[i], stem[i], quality[i] = score, np.nan, score
                    text_arr = pa.array(texts, pa.binary()).cast(pa.string())
                    lines = np.arange(line + 1, line + n + 1)
                    table = pa.Table.from_pydict(
                        {
                            "doc_id": ids,
                            "text": text_arr,
                            "url": [f"https://example.org/{d}/{i}" for i in lines.tolist()],
                            "title": [f"Documento {i}" for i in lines.tolist()],
                            "record_id": [str(i) for i in lines.tolist()],
                            "language": langs.tolist(),
                            "language_score": np.round(rng.uniform(0.5, 1.0, n), 4),
                            "language_source": ["fasttext"] * n,
                            "score_edu": edu,
                            "score_stem": pa.array(stem, from_pandas=True),
                            "score_heuristic": np.round(rng.uniform(0, 5, n), 2),
                            "quality_score": quality,
                            "quality_score_source": ["max"] * n,
                            "n_chars": pc.utf8_length(text_arr).cast(pa.int64()),
                            "encoding_repaired": rng.random(n) < 0.01,
                            "drop_id": [drop_id] * n,
                            "source_file": [f"/drops/{drop_id}"] * n,
                            "source_line": lines,
                        },
                        schema=schema,
                    )
                    writer.write_table(table)
                    line += n
                    report.records += n
                    report.documents += n
                    report.characters += int(pc.sum(table["n_chars"]).as_py())
                    for lang in langs.tolist():
                        totals[lang] += 1
                    for i in range(0, n, 7):  # a sample of this drop, for the copies in later drops
                        fresh.append((texts[i], ids[i], str(langs[i]), float(quality[i])))
        storage.write_parquet(f"{prefix}/quarantine.parquet", QUARANTINE.empty_table())
        manifest = {**report.to_json(), "version": version}
        storage.write_json(f"{prefix}/manifest.json", manifest)
        publish_drop(storage, drop_id, version, manifest)
        for item in fresh:  # reservoir sampling over every earlier drop
            seen += 1
            if len(reservoir) < RESERVOIR:
                reservoir.append(item)
            elif (j := int(rng.integers(seen))) < RESERVOIR:
                reservoir[j] = item
        size = (root / prefix / "docs.parquet").stat().st_size
        totals["bytes"] += size
        totals["documents"] += report.documents
        totals["characters"] += report.characters
        print(f"  {drop_id}: {report.documents:,} documents, {size / 1e6:,.0f} MB", flush=True)
    return dict(totals)


def run(which: str, root: str, out: str) -> dict:
    from synth_cpt.core.config import parse_config
    from synth_cpt.core.contracts import check_corpus_file
    from synth_cpt.core.layout import RAW_CORPUS, partition_file
    from synth_cpt.core.storage import LocalStorage

    if which == "new":
        from synth_cpt.ingest.dedup import build_raw_corpus
    else:
        from benchmarks.baselines.corpus_v0 import build_raw_corpus
    cfg = parse_config(json.dumps({"storage_root": root}), "benchmark")
    storage = LocalStorage(root)
    language, quality = PARTITION
    validating = [0.0]
    before_validation = []

    def validate(path: str):
        before_validation.append(peak_rss_mb())
        t = time.perf_counter()
        outcome = check_corpus_file(path, cfg, language, quality)  # what the raw_corpus asset runs
        validating[0] += time.perf_counter() - t
        return outcome

    start = time.perf_counter()
    stats = build_raw_corpus(storage, cfg, language, quality, validate=validate)
    seconds = time.perf_counter() - start
    assert stats.outcome is not None and stats.outcome.success, stats.outcome
    os.replace(storage.path(partition_file(RAW_CORPUS, language, quality)), out)  # kept for the comparison
    figures = ("language_documents", "unique_documents", "duplicates_removed", "in_no_bucket", "documents", "characters")
    return {
        "seconds": seconds,
        "validate_s": validating[0],
        "peak_before_validation_mb": before_validation[0],
        **{k: getattr(stats, k) for k in figures},
    }


def child(which: str, root: str, out: str) -> None:
    result = run(which, root, out)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def same_output(old: Path, new: Path) -> None:
    import polars as pl

    columns = ["doc_id", "drop_id", "source_line", "quality_score", "n_chars"]
    a, b = pl.read_parquet(old, columns=columns), pl.read_parquet(new, columns=columns)
    if not a.equals(b):
        raise SystemExit(f"old and new published different documents: {a.height:,} vs {b.height:,} rows")
    if a["doc_id"].n_unique() != a.height:
        raise SystemExit("a doc_id was published twice")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="size of the accepted drops' docs.parquet files in GB (default 2)")
    parser.add_argument("--root", help="keep the generated drops here and reuse them on the next run with the same --gb")
    parser.add_argument("--child", nargs=3, metavar=("WHICH", "ROOT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory(prefix="synth-cpt-bench-corpus-") as tmp:
        root = Path(args.root) if args.root else Path(tmp, "root")
        marker = root / "_bench.json"
        if marker.exists() and json.loads(marker.read_text())["gb"] == args.gb:
            totals = json.loads(marker.read_text())["totals"]
            print(f"reusing the drops in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
            print(f"generating {args.gb:g} GB of accepted drops in {root}", flush=True)
            t = time.perf_counter()
            totals = generate(root, args.gb)
            marker.write_text(json.dumps({"gb": args.gb, "totals": totals}))
            print(f"  generated in {time.perf_counter() - t:.0f} s")
        shutil.rmtree(root / "raw_corpus", ignore_errors=True)
        print(
            f"drops: {DROPS}, {totals['bytes'] / 1e9:.2f} GB of docs.parquet, {totals['documents']:,} documents "
            f"({totals['pt']:,} pt, {totals['en']:,} en), {totals['characters'] / 1e9:.2f} G characters; partition {'|'.join(PARTITION)}",
            flush=True,
        )
        old = measure(__file__, "old", root, Path(tmp, "old.parquet"))
        new = measure(__file__, "new", root, Path(tmp, "new.parquet"))
        same_output(Path(tmp, "old.parquet"), Path(tmp, "new.parquet"))
        figures = ("language_documents", "unique_documents", "duplicates_removed", "in_no_bucket", "documents", "characters")
        if any(old[k] != new[k] for k in figures):
            raise SystemExit(f"old and new disagree on the figures: {old} vs {new}")
    print(
        f"{new['language_documents']:,} pt documents, {new['duplicates_removed']:,} duplicates removed, "
        f"{new['in_no_bucket']:,} in no bucket, {new['documents']:,} published"
    )
    print(f"{'':5} {'seconds':>9} {'of which validate':>18} {'peak RSS MB':>12} {'before validate':>16}")
    for name, r in (("old", old), ("new", new)):
        print(f"{name:5} {r['seconds']:9.1f} {r['validate_s']:18.1f} {r['peak_rss_mb']:12.0f} {r['peak_before_validation_mb']:16.0f}")
    print(f"RESULT corpus ratio={old['seconds'] / new['seconds']:.2f} peak_rss_mb={new['peak_rss_mb']:.0f}")


if __name__ == "__main__":
    main()
