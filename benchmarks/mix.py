"""Training mix: the streaming `build_mix` against the in-memory one before it, same inputs, every shard format.

Generates ~`--gb` GB of component text for partition `pt|high` in the published layout, through the
real publishing code: `quality_subsets/pt/high/part-0.parquet` (the subset's columns, row groups of
2,048 rows as `select_budgeted_file` writes them, written atomically with `Storage.writing`) and the
four WRAP styles' `rewrites_<style>` rows (the `contracts.SYNTHETIC` schema, published as a version by
`publish_tables`: one file, row groups of up to 1Mi rows). Texts are Portuguese word salad drawn from
the sample corpus' word frequencies (benchmarks/corpus.py's `TextMaker`), ~3 KB each; the originals are
1/4.6 of the text and each style 0.9/4.6, so `rewrites_1to3` (originals once, the styles at 1:3,
target 4x the originals) takes every original and ~83% of each style. The mix counts every text itself,
so the files' own `n_tokens` are left null (generation would otherwise tokenize everything once more).
The target tokenizer is a SentencePiece model (vocab 8,000) trained on the generated text and published.

Then `rewrites_1to3` (pipeline.yaml's recipe) is built with every shard format (parquet, jsonl.zst,
tokens), each side in its own fresh process so its peak RSS is its own:

- **baseline**: `benchmarks/baselines/mix_v0.py` (the code before this change: every component read whole
  into memory, texts included; a `.bin` shard encodes its texts again);
- **ours**: `synth_cpt.mix.build.build_mix` (only numbers per row in memory: token counts, spool
  positions, a lineage class; texts and lineage strings streamed in batches to a local spool, each shard
  and the repeats table gathered from it).

Both must publish the same files byte for byte (repeats.parquet: the same rows; ours writes it in row groups)
and the same manifest (but its version), or the script fails. Ours also runs on a 0.5 GB input: growth = peak RSS at `--gb` / peak RSS at 0.5 GB (or at
`--gb`/4 when `--gb` is below 2).

    python benchmarks/mix.py [--gb 2] [--root DIR]

`--root DIR` keeps the generated inputs in DIR and reuses them on the next run with the same sizes.
Last line: RESULT mix ratio=<baseline_s/ours_s> peak_rss_mb=<ours at --gb> growth=<...>
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.processes import measure, peak_rss_mb  # noqa: E402

STYLES = ("easy", "medium", "hard", "qa")
SHARES = {"original": 1.0, **{s: 0.9 for s in STYLES}}  # of the text; each style must cover 0.75 of the originals' tokens
PARTITION = ("pt", "high")
BATCH_DOCS = 2048  # a row group of the subset, as select_budgeted_file writes it
RECIPE = "rewrites_1to3"
FORMATS = ["parquet", "jsonl.zst", "tokens"]


def generate(root: Path, gb: float, seed: int = 0) -> dict:
    """~`gb` GB of component text under `root` (the storage root), with a published tokenizer."""
    import numpy as np
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks.corpus import TextMaker, vocabularies
    from synth_cpt.core.config import PipelineConfig
    from synth_cpt.core.contracts import SYNTHETIC, corpus_documents
    from synth_cpt.core.layout import partition_file
    from synth_cpt.core.storage import LocalStorage
    from synth_cpt.core.validation import Outcome
    from synth_cpt.corpus.tokenizer import build_tokenizer, train_model
    from synth_cpt.synthesis.outputs import publish_tables

    storage = LocalStorage(root)
    rng = np.random.default_rng(seed)
    maker = TextMaker(*vocabularies()["pt"], rng)
    language, quality = PARTITION
    totals: dict = {"bytes_of_text": 0, "documents": 0}
    per_share = gb * 1e9 / sum(SHARES.values())

    def texts_of(target: float) -> list[bytes]:
        out, size = [], 0
        while size < target:
            batch = maker.make(BATCH_DOCS)
            out += batch
            size += sum(map(len, batch))
        return out

    # the tokenizer: trained on a slice of the text, published by the tokenizer asset's code (as a configured model file)
    root.mkdir(parents=True, exist_ok=True)
    model_path = root.parent / f"{root.name}-tokenizer.model"
    model_path.write_bytes(train_model([t.decode() for t in maker.make(2000)], vocab_size=8000, seed=1, character_coverage=1.0))
    build_tokenizer(storage, PipelineConfig.model_validate({"tokenizer": {"model_file": str(model_path)}}), [])

    schema = corpus_documents(PipelineConfig(), with_tokens=True)
    originals = texts_of(per_share * SHARES["original"])
    with (
        storage.writing(partition_file("quality_subsets", language, quality)) as tmp,
        pq.ParquetWriter(tmp, schema, compression="zstd") as w,
    ):
        for a in range(0, len(originals), BATCH_DOCS):
            chunk = originals[a : a + BATCH_DOCS]
            n = len(chunk)
            ids = [hashlib.sha256(t).hexdigest()[:32] for t in chunk]
            columns = {
                "doc_id": ids, "text": pa.array(chunk, pa.binary()).cast(pa.string()), "language": [language] * n, "quality": [quality] * n,
                "quality_score": np.round(rng.uniform(3, 5, n), 2), "drop_id": [f"2026-10-0{1 + i % 8}_crawl.jsonl.zst" for i in range(a, a + n)],
                "drop_version": ["20261001T000000000000-bench"] * n, "n_chars": [len(t) for t in chunk],
            }  # fmt: skip
            w.write_table(pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in schema}, schema=schema))
    totals["bytes_of_text"] += sum(map(len, originals))
    totals["documents"] += len(originals)
    doc_ids = [hashlib.sha256(t).hexdigest()[:32] for t in originals]
    del originals
    for style in STYLES:
        texts = texts_of(per_share * SHARES[style])
        n = len(texts)
        docs = [doc_ids[i % len(doc_ids)] for i in range(n)]
        columns = {
            "synth_id": [hashlib.sha256(f"{style}:{d}:{i}".encode()).hexdigest()[:32] for i, d in enumerate(docs)],
            "kind": ["rewrite"] * n, "style": [style] * n, "doc_id": docs, "drop_id": ["2026-10-01_crawl.jsonl.zst"] * n,
            "drop_version": ["20261001T000000000000-bench"] * n, "request_ids": [[hashlib.sha256(f"r{style}{i}".encode()).hexdigest()] for i in range(n)],
            "prompt_sha": [hashlib.sha256(style.encode()).hexdigest()] * n, "model": ["bench-model"] * n,
            "model_fingerprint": [hashlib.sha256(b"bench-model").hexdigest()] * n,
            "text": pa.array(texts, pa.binary()).cast(pa.string()), "language": [language] * n, "chunks": [1] * n, "chunks_kept": [1] * n,
        }  # fmt: skip
        del texts
        table = pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in SYNTHETIC}, schema=SYNTHETIC)
        del columns
        publish_tables(storage, f"rewrites_{style}", language, quality, {"rows.parquet": pl.from_arrow(table)}, {"ok": Outcome(True)}, {})
        totals["bytes_of_text"] += int(pa.compute.sum(pa.compute.binary_length(table["text"])).as_py())
        totals["documents"] += n
        del table
    return totals


def run(which: str, root: str, out: str) -> dict:
    from synth_cpt.core.config import load_config
    from synth_cpt.core.storage import LocalStorage
    from synth_cpt.corpus.tokenizer import TokenCounter

    if which == "ours":
        from synth_cpt.mix.build import build_mix
    else:
        from benchmarks.baselines.mix_v0 import build_mix
    recipe = load_config(None).mixes.recipes[RECIPE].model_copy(update={"formats": tuple(FORMATS)})
    storage = LocalStorage(root)
    tokenizer = TokenCounter.from_storage(storage)
    start = time.perf_counter()
    result = build_mix(storage, RECIPE, recipe, *PARTITION, tokenizer, run_id="bench")
    seconds = time.perf_counter() - start
    assert result.outcome.success and result.pointer is not None, result.outcome.failures
    folder = storage.path(result.pointer["prefix"])
    shutil.move(str(folder), out)  # kept for the comparison
    m = result.manifest
    return {"seconds": seconds, "documents": m["documents"], "tokens": m["tokens"], "shards": len(m["shards"])}


def child(which: str, root: str, out: str) -> None:
    result = run(which, root, out)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def same_output(old: Path, new: Path) -> int:
    """Every published file byte for byte, the manifest but its version, repeats.parquet row for row;
    returns the bytes compared."""
    import pyarrow.parquet as pq

    names = sorted(p.name for p in old.iterdir())
    if names != sorted(p.name for p in new.iterdir()):
        raise SystemExit(f"baseline and ours published different files: {names} vs {sorted(p.name for p in new.iterdir())}")
    compared = 0
    for name in names:
        a, b = (old / name).read_bytes(), (new / name).read_bytes()
        if name == "manifest.json":
            a, b = ({**json.loads(x), "version": None} for x in (a, b))
        if name == "repeats.parquet":  # ours writes it in row groups as it is gathered: the same rows, other bytes
            compared += len(a)
            a, b = (pq.read_table(old / name), pq.read_table(new / name))
            if not (a.schema == b.schema and a.equals(b)):
                raise SystemExit("baseline and ours differ in the rows of repeats.parquet")
            continue
        if a != b:
            raise SystemExit(f"baseline and ours differ in {name}")
        compared += len(a) if isinstance(a, bytes) else 0
    return compared


def inputs(root: Path, gb: float) -> dict:
    marker = root / "_bench.json"
    if marker.exists() and json.loads(marker.read_text())["gb"] == gb:
        print(f"reusing the inputs in {root}")
        return json.loads(marker.read_text())["totals"]
    shutil.rmtree(root, ignore_errors=True)
    print(f"generating {gb:g} GB of component text in {root}", flush=True)
    t = time.perf_counter()
    totals = generate(root, gb)
    marker.write_text(json.dumps({"gb": gb, "totals": totals}))
    print(
        f"  generated in {time.perf_counter() - t:.0f} s: {totals['bytes_of_text'] / 1e9:.2f} GB of text, {totals['documents']:,} documents"
    )
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--gb", type=float, default=2.0, help="component text in GB (default 2); growth is measured against gb/4 (0.5 at 2)"
    )
    parser.add_argument("--root", help="keep the generated inputs under DIR (DIR/<gb>) and reuse them on the next run")
    parser.add_argument("--child", nargs=3, metavar=("WHICH", "ROOT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    small_gb = args.gb / 4
    with tempfile.TemporaryDirectory(prefix="synth-cpt-bench-mix-") as tmp:
        base = Path(args.root) if args.root else Path(tmp)
        big, small = base / f"gb-{args.gb:g}", base / f"gb-{small_gb:g}"
        totals = inputs(big, args.gb)
        inputs(small, small_gb)
        for root in (big, small):
            shutil.rmtree(root / f"training_mix_{RECIPE}", ignore_errors=True)
        print(
            f"{RECIPE}, formats {', '.join(FORMATS)}: {totals['bytes_of_text'] / 1e9:.2f} GB of text, {totals['documents']:,} documents",
            flush=True,
        )
        baseline = measure(__file__, "baseline", big, Path(tmp, "baseline"))
        print(f"  baseline: {baseline['seconds']:.1f} s, {baseline['peak_rss_mb']:,.0f} MB", flush=True)
        ours = measure(__file__, "ours", big, Path(tmp, "ours"))
        print(f"  ours:     {ours['seconds']:.1f} s, {ours['peak_rss_mb']:,.0f} MB", flush=True)
        compared = same_output(Path(tmp, "baseline"), Path(tmp, "ours"))
        shutil.rmtree(Path(tmp, "baseline"))
        ours_small = measure(__file__, "ours", small, Path(tmp, "ours-small"))
        print(f"  ours at {small_gb:g} GB: {ours_small['seconds']:.1f} s, {ours_small['peak_rss_mb']:,.0f} MB", flush=True)
    print(f"same output: {ours['shards']} shards x {len(FORMATS)} formats, repeats, inputs and manifest ({compared / 1e9:.2f} GB compared)")
    print(f"mix: {ours['documents']:,} documents, {ours['tokens']:,} tokens")
    print(f"{'':10} {'seconds':>9} {'peak RSS MB':>12}")
    for name, r in (("baseline", baseline), ("ours", ours), (f"ours/{small_gb:g}", ours_small)):
        print(f"{name:10} {r['seconds']:9.1f} {r['peak_rss_mb']:12.0f}")
    growth = ours["peak_rss_mb"] / ours_small["peak_rss_mb"]
    print(f"RESULT mix ratio={baseline['seconds'] / ours['seconds']:.2f} peak_rss_mb={ours['peak_rss_mb']:.0f} growth={growth:.2f}")


if __name__ == "__main__":
    main()
